/**
 * Property/fuzz test: random and adversarial descriptor tables fed to the queue code through the
 * virtio-mmio transport, checked against an independent reference walker.
 * Properties: nothing escapes the transport; the device completes exactly the valid prefix of the
 * available chains (same heads, same lengths); it enters DEVICE_NEEDS_RESET (with a config interrupt)
 * exactly when the reference finds a spec violation; it writes no guest byte outside the used ring and
 * the writable buffers of valid chains.
 */
import { describe, it, expect } from 'vitest';
import { GuestMemory } from '@kvmkit/kernel';
import { MMIO, VIRTIO_F, VIRTIO_STATUS as S, VIRTIO_MMIO_INT, VIRTQ_DESC_F as F, bit } from './constants.js';
import { VirtioMmioTransport } from './mmio.js';
import { EchoDevice } from './testdevice.test-util.js';

const ITER = Number(process.env.VIRTIO_FUZZ_ITER ?? 100_000);
const MEM = 0x4000;
const DESC = 0x0;
const AVAIL = 0x600;
const USED = 0x800;
const IND = 0x1000; // indirect tables live in [0x1000, 0x2000)
const DATA = 0x2000; // data buffers in [0x2000, 0x4000)

// xorshift32: deterministic, seeded
function rng(seed: number) {
  let s = seed >>> 0 || 1;
  const next = () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
  return { next, int: (n: number) => next() % n, pick: <T>(a: readonly T[]) => a[next() % a.length]! };
}

interface Buf {
  addr: bigint;
  len: number;
}
type Walk = { ok: true; r: Buf[]; w: Buf[] } | { ok: false };

/** Independent reference: visited-set loop detection, recursion for indirect tables. */
function refWalk(mem: GuestMemory, size: number, indirectOk: boolean, head: number): Walk {
  const r: Buf[] = [];
  const w: Buf[] = [];
  const inMem = (a: bigint, l: number) => a >= 0n && a + BigInt(l) <= BigInt(MEM);
  const rd = (base: bigint, i: number) => {
    const d = base + BigInt(16 * i);
    return { addr: mem.readU64(d), len: mem.readU32(d + 8n), flags: mem.readU16(d + 12n), next: mem.readU16(d + 14n) };
  };
  const walkTable = (base: bigint, n: number, start: number, nested: boolean): boolean => {
    const seen = new Set<number>();
    let i = start;
    for (;;) {
      if (i >= n || seen.has(i)) return false;
      seen.add(i);
      const d = rd(base, i);
      if (d.flags & F.INDIRECT) {
        if (!indirectOk || nested || d.flags & F.NEXT) return false;
        if (d.len === 0 || d.len % 16 !== 0 || !inMem(d.addr, d.len)) return false;
        return walkTable(d.addr, d.len / 16, 0, true);
      }
      if (!inMem(d.addr, d.len)) return false;
      if (d.flags & F.WRITE) w.push({ addr: d.addr, len: d.len });
      else {
        if (w.length) return false;
        r.push({ addr: d.addr, len: d.len });
      }
      if (!(d.flags & F.NEXT)) return true;
      i = d.next;
    }
  };
  if (head >= size) return { ok: false };
  return walkTable(BigInt(DESC), size, head, false) ? { ok: true, r, w } : { ok: false };
}

function w32(t: VirtioMmioTransport, off: number, v: number) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v >>> 0, true);
  t.write(off, b);
}
function r32(t: VirtioMmioTransport, off: number) {
  const b = new Uint8Array(4);
  t.read(off, b);
  return new DataView(b.buffer).getUint32(0, true);
}

describe('virtqueue fuzz', () => {
  it(`survives ${ITER} random/adversarial descriptor tables and matches the reference`, () => {
    const R = rng(0x5eed1234);
    const mem = GuestMemory.anonymous(MEM);
    const bytes = mem.range(0, MEM);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const dev = new EchoDevice([64]);
    let irqs = 0;
    const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
    const stats = { valid: 0, needsReset: 0, chains: 0, weak: 0, overflowIdx: 0 };
    const t0 = Date.now();
    for (let it = 0; it < ITER; it++) {
      const size = 1 << R.int(7); // 1..64
      const indirect = R.int(2) === 1;
      const eventIdx = R.int(2) === 1;
      // random guest memory: metadata region random, data region random
      for (let i = 0; i < 0x2000; i += 64) dv.setUint32(i + (R.next() & 60), R.next(), true);
      const genAddr = (): bigint => {
        switch (R.int(16)) {
          case 0: return BigInt(MEM - R.int(64)); // straddles the end
          case 1: return BigInt(MEM + R.int(0x10000)); // past RAM
          case 2: return 0xffff_ffff_ffff_ffffn - BigInt(R.int(0x100)); // wraps
          case 3: return BigInt(R.int(DATA)); // metadata region (rings/tables)
          default: return BigInt(DATA + R.int(DATA - 0x100));
        }
      };
      const genLen = (): number => {
        switch (R.int(16)) {
          case 0: return 0;
          case 1: return 0xffff_ffff - R.int(4);
          case 2: return 0x100000 + R.int(0x1000);
          default: return R.int(0x100);
        }
      };
      const writeDesc = (base: number, i: number, indirectTable: boolean) => {
        const d = base + 16 * i;
        const flagsRoll = R.int(20);
        let flags = (R.int(3) === 0 ? F.NEXT : 0) | (R.int(2) ? F.WRITE : 0);
        if (flagsRoll === 0) flags = R.next() & 0xffff;
        else if (flagsRoll < 3 || (indirectTable && flagsRoll === 3)) flags |= F.INDIRECT;
        let addr = genAddr();
        let len = genLen();
        if (flags & F.INDIRECT && R.int(3) > 0) {
          addr = BigInt(IND + 16 * R.int(60));
          len = 16 * (1 + R.int(8)) + (R.int(10) === 0 ? R.int(16) : 0);
        }
        const nextMax = indirectTable ? 10 : size + 2;
        dv.setBigUint64(d, addr, true);
        dv.setUint32(d + 8, len, true);
        dv.setUint16(d + 12, flags, true);
        dv.setUint16(d + 14, R.int(nextMax), true);
      };
      for (let i = 0; i < size; i++) writeDesc(DESC, i, false);
      for (let i = 0; i < 64; i++) writeDesc(IND, i, true);
      const lastAvail = R.int(4) === 0 ? 0xffff - R.int(size + 1) : R.int(0x10000);
      const pending = R.int(12) === 0 ? size + 1 + R.int(0x8000) : R.int(size + 1);
      const availIdx = (lastAvail + pending) & 0xffff;
      mem.writeU16(AVAIL + 2, availIdx);
      for (let i = 0; i < size; i++) mem.writeU16(AVAIL + 4 + 2 * i, R.int(10) === 0 ? R.int(0x10000) : R.int(size));
      mem.writeU16(AVAIL, R.int(2)); // NO_INTERRUPT sometimes

      // program the device through its registers
      w32(t, MMIO.STATUS, 0);
      w32(t, MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
      const feats = bit(VIRTIO_F.VERSION_1) | (indirect ? bit(VIRTIO_F.RING_INDIRECT_DESC) : 0n) | (eventIdx ? bit(VIRTIO_F.RING_EVENT_IDX) : 0n);
      w32(t, MMIO.DRIVER_FEATURES_SEL, 0);
      w32(t, MMIO.DRIVER_FEATURES, Number(feats & 0xffff_ffffn));
      w32(t, MMIO.DRIVER_FEATURES_SEL, 1);
      w32(t, MMIO.DRIVER_FEATURES, Number(feats >> 32n));
      w32(t, MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
      w32(t, MMIO.QUEUE_SEL, 0);
      w32(t, MMIO.QUEUE_NUM, size);
      w32(t, MMIO.QUEUE_DESC_LOW, DESC);
      w32(t, MMIO.QUEUE_DRIVER_LOW, AVAIL);
      w32(t, MMIO.QUEUE_DEVICE_LOW, USED);
      w32(t, MMIO.QUEUE_READY, 1);
      if (r32(t, MMIO.QUEUE_READY) !== 1) throw new Error(`iteration ${it}: queue not ready`);
      t.queues[0]!.lastAvail = lastAvail;
      t.queues[0]!.usedIdx = lastAvail;
      t.queues[0]!.signalledUsed = lastAvail;
      mem.writeU16(USED + 2, lastAvail);

      // reference expectation
      const expected: Array<{ id: number; len: number; w: Buf[] }> = [];
      let bad = pending > size;
      let weak = false;
      if (!bad) {
        for (let k = 0; k < pending; k++) {
          const head = mem.readU16(AVAIL + 4 + 2 * ((lastAvail + k) % size));
          const res = refWalk(mem, size, indirect, head);
          if (!res.ok) {
            bad = true;
            break;
          }
          const rl = res.r.reduce((a, b) => a + b.len, 0);
          const wl = res.w.reduce((a, b) => a + b.len, 0);
          // Writes into the metadata region change later chains: only the safety properties are checked then.
          if (res.w.some((b) => b.len > 0 && b.addr < BigInt(DATA))) weak = true;
          expected.push({ id: head, len: Math.min(rl, wl), w: res.w });
        }
      }
      const before = Buffer.from(bytes);
      w32(t, MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK); // kicks the queue
      w32(t, MMIO.QUEUE_NOTIFY, 0);

      const status = r32(t, MMIO.STATUS);
      const nr = (status & S.DEVICE_NEEDS_RESET) !== 0;
      if (nr && !(r32(t, MMIO.INTERRUPT_STATUS) & VIRTIO_MMIO_INT.CONFIG)) throw new Error(`iteration ${it}: needs-reset without config interrupt`);
      if (weak) {
        stats.weak++;
        continue;
      }
      if (nr !== bad) throw new Error(`iteration ${it}: needs-reset=${nr}, reference says bad=${bad} (${String(t.lastError)})`);
      const usedIdx = mem.readU16(USED + 2);
      const done = (usedIdx - lastAvail) & 0xffff;
      if (done !== expected.length) throw new Error(`iteration ${it}: completed ${done}, reference ${expected.length}`);
      for (let k = 0; k < done; k++) {
        const e = USED + 4 + 8 * ((lastAvail + k) % size);
        if (dv.getUint32(e, true) !== expected[k]!.id || dv.getUint32(e + 4, true) !== expected[k]!.len) {
          throw new Error(`iteration ${it}: used[${k}] = ${dv.getUint32(e, true)}/${dv.getUint32(e + 4, true)}, reference ${expected[k]!.id}/${expected[k]!.len}`);
        }
      }
      // no write outside the used ring and the writable buffers of valid chains
      const allowed: Array<[number, number]> = [[USED, USED + 6 + 8 * size]];
      for (const e of expected) for (const b of e.w) allowed.push([Number(b.addr), Number(b.addr) + b.len]);
      allowed.sort((a, b) => a[0] - b[0]);
      let pos = 0;
      for (const [a, b] of [...allowed, [MEM, MEM] as [number, number]]) {
        if (a > pos && buf.compare(before, pos, a, pos, a) !== 0) throw new Error(`iteration ${it}: guest memory written outside allowed areas in [0x${pos.toString(16)}, 0x${a.toString(16)})`);
        pos = Math.max(pos, b);
      }
      if (bad) stats.needsReset++;
      else stats.valid++;
      if (pending > size) stats.overflowIdx++;
      stats.chains += done;
    }
    const ms = Date.now() - t0;
    console.log(`virtio fuzz: ${ITER} iterations in ${ms} ms`, stats, 'irqs', irqs);
    // the generator must actually exercise both outcomes
    expect(stats.valid).toBeGreaterThan(ITER / 20);
    expect(stats.needsReset).toBeGreaterThan(ITER / 20);
    expect(stats.chains).toBeGreaterThan(ITER / 10);
  }, 120_000);
});
