/** Test helpers shared by this package's tests (not part of the build's public API). */
import type { VirtioTestDriver } from '@kvmkit/virtio';

/** A virtio-blk request header (type, reserved, sector). */
export function hdr(type: number, sector: bigint | number): Uint8Array {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(type, 0);
  b.writeBigUInt64LE(BigInt(sector), 8);
  return b;
}

/**
 * Submits a request: header (+ out data) readable, (in data in `inSegs` pieces +) status writable, optionally
 * through an indirect table. Returns the head and the status/data addresses.
 */
export function submit(
  drv: VirtioTestDriver,
  type: number,
  sector: bigint | number,
  o: { out?: Uint8Array; inLen?: number; inSegs?: number; indirect?: boolean } = {},
) {
  const bufs: { len: number; data?: Uint8Array; write?: boolean }[] = [{ len: 16, data: hdr(type, sector) }];
  if (o.out) bufs.push({ len: o.out.length, data: o.out });
  const segs = o.inSegs ?? 1;
  if (o.inLen) for (let i = 0; i < segs; i++) bufs.push({ len: o.inLen / segs, write: true });
  bufs.push({ len: 1, write: true, data: Uint8Array.of(0xff) });
  const { head, addrs } = drv.add(0, bufs, o.indirect ? { indirect: true } : {});
  return { head, status: addrs[addrs.length - 1]!, data: addrs.slice(o.out ? 2 : 1, -1) };
}
