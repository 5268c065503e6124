import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import * as fs from 'node:fs';
import nodeFs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { DeviceRegistry, GuestMemory, MmioBus, PioBus, PluginHost, StateReader, StateWriter, createHooks, defaultMemoryLayout, silentLogger, tapOnly, type MachineApi, type Vm, type Logger } from '@kvmkit/kernel';
import { VirtioMmioTransport, VirtioTestDriver, VIRTIO_STATUS as S, MMIO, bit } from '@kvmkit/virtio';
import virtioBlk, { VirtioBlk, VIRTIO_BLK_T as T, VIRTIO_BLK_S as ST, VIRTIO_BLK_F, BLK_CFG, validateBlkOptions, isMemoryBacked, type VirtioBlkApi } from './index.js';
import { hdr, submit } from './requests.test-util.js';

let dir: string;
const MiB = 1 << 20;

function image(name: string, size: number, fill?: (b: Buffer) => void): string {
  const p = path.join(dir, name);
  const b = Buffer.alloc(size);
  if (fill) fill(b);
  else for (let i = 0; i < size; i += 512) b.writeUInt32LE(i / 512, i); // sector number at the start of each sector
  fs.writeFileSync(p, b);
  return p;
}

function capturingLog(): { log: Logger; warnings: string[] } {
  const warnings: string[] = [];
  const log = silentLogger();
  const l = Object.assign(Object.create(log), { warn: (_o: unknown, msg?: string) => warnings.push(String(msg ?? _o)), child: () => l }) as Logger;
  return { log: l, warnings };
}

async function dev(p: string, o: { readOnly?: boolean; direct?: boolean; serial?: string; sizeMax?: number; segMax?: number; syncIo?: boolean; pollUs?: number; log?: Logger } = {}) {
  const log = o.log ?? silentLogger();
  const d = await VirtioBlk.open({ path: p, readOnly: o.readOnly ?? false, direct: o.direct ?? false, serial: o.serial ?? 'disk0', queueSize: 64, sizeMax: o.sizeMax ?? MiB, segMax: o.segMax ?? 62, maxDiscardSectors: 1 << 22, syncIo: o.syncIo, pollUs: o.pollUs, log });
  const mem = GuestMemory.anonymous(16 * MiB);
  let irqs = 0;
  const t = new VirtioMmioTransport(d, { memory: mem, raiseIrq: () => irqs++ });
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  expect(drv.init() & S.DRIVER_OK).toBe(S.DRIVER_OK);
  return { d, mem, t, drv, irqs: () => irqs };
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmkit-blk-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('virtio-blk device', () => {
  it('config space: capacity, limits, features (rw vs ro)', async () => {
    const p = image('cfg.img', 2 * MiB);
    const { drv, d } = await dev(p, { sizeMax: 65536, segMax: 8 });
    const cfg = Buffer.from(drv.readConfig(0, 60));
    expect(cfg.readBigUInt64LE(BLK_CFG.capacity)).toBe(4096n);
    expect(cfg.readUInt32LE(BLK_CFG.size_max)).toBe(65536);
    expect(cfg.readUInt32LE(BLK_CFG.seg_max)).toBe(8);
    expect(cfg.readUInt32LE(BLK_CFG.blk_size)).toBe(512);
    const f = drv.deviceFeatures();
    expect(f & bit(VIRTIO_BLK_F.FLUSH)).not.toBe(0n);
    expect(f & bit(VIRTIO_BLK_F.DISCARD)).not.toBe(0n);
    expect(f & bit(VIRTIO_BLK_F.RO)).toBe(0n);
    await d.close();
    const ro = await dev(p, { readOnly: true });
    const fr = ro.drv.deviceFeatures();
    expect(fr & bit(VIRTIO_BLK_F.RO)).not.toBe(0n);
    expect(fr & bit(VIRTIO_BLK_F.WRITE_ZEROES)).toBe(0n);
    await ro.d.close();
  });

  it('IN / OUT / FLUSH / GET_ID with correct status and used lengths', async () => {
    const p = image('rw.img', MiB);
    const { drv, mem, t, d } = await dev(p, { serial: 'serial-xyz' });
    // read sectors 3..4 into two segments
    const r = submit(drv, T.IN, 3, { inLen: 1024, inSegs: 2 });
    drv.kick(0);
    expect(drv.takeUsed(0)).toEqual([]); // asynchronous: nothing completed synchronously
    await t.quiesce();
    expect(drv.takeUsed(0)).toEqual([{ id: r.head, len: 1025 }]);
    expect(mem.readU8(r.status)).toBe(ST.OK);
    expect(mem.readU32(r.data[0]!)).toBe(3);
    expect(mem.readU32(r.data[1]!)).toBe(4);
    // write sector 7
    const payload = Buffer.alloc(512, 0x5a);
    const w = submit(drv, T.OUT, 7, { out: payload });
    drv.kick(0);
    await t.quiesce();
    expect(drv.takeUsed(0)).toEqual([{ id: w.head, len: 1 }]);
    expect(mem.readU8(w.status)).toBe(ST.OK);
    const f = submit(drv, T.FLUSH, 0);
    drv.kick(0);
    await t.quiesce();
    expect(mem.readU8(f.status)).toBe(ST.OK);
    expect(fs.readFileSync(p).subarray(7 * 512, 8 * 512).equals(payload)).toBe(true);
    const id = submit(drv, T.GET_ID, 0, { inLen: 20 });
    drv.kick(0);
    await t.quiesce();
    expect(drv.takeUsed(0).at(-1)).toEqual({ id: id.head, len: 21 });
    expect(Buffer.from(mem.read(id.data[0]!, 20)).toString('latin1').replace(/\0+$/, '')).toBe('serial-xyz');
    expect(d.stats).toMatchObject({ reads: 1, writes: 1, flushes: 1, getIds: 1, errors: 0 });
    await t.close();
  });

  it('IOERR for out-of-range, non-512 lengths, short headers; UNSUPP for unknown types', async () => {
    const p = image('err.img', 64 * 512);
    const { drv, mem, t, d } = await dev(p);
    const cases = [
      submit(drv, T.IN, 63, { inLen: 1024 }), // runs past the end
      submit(drv, T.IN, 0xffff_ffff_ffff_ffffn, { inLen: 512 }), // wraps
      submit(drv, T.OUT, 64, { out: new Uint8Array(512) }), // starts at the end
      submit(drv, T.IN, 0, { inLen: 100 }), // not a multiple of 512
      submit(drv, T.OUT, 0, { out: new Uint8Array(700) }),
    ];
    const shortHdr = drv.add(0, [{ len: 8, data: new Uint8Array(8) }, { len: 1, write: true, data: Uint8Array.of(0xff) }]);
    const unk = submit(drv, 99, 0);
    drv.kick(0);
    await t.quiesce();
    for (const c of cases) expect(mem.readU8(c.status)).toBe(ST.IOERR);
    expect(mem.readU8(shortHdr.addrs[1]!)).toBe(ST.IOERR);
    expect(mem.readU8(unk.status)).toBe(ST.UNSUPP);
    expect(drv.takeUsed(0)).toHaveLength(7);
    expect(d.stats.errors).toBe(6);
    expect(t.status & S.DEVICE_NEEDS_RESET).toBe(0);
    await t.close();
  });

  it('enforces seg_max and size_max', async () => {
    const p = image('seg.img', MiB);
    const { drv, mem, t } = await dev(p, { sizeMax: 1024, segMax: 2 });
    const a = submit(drv, T.IN, 0, { inLen: 2048, inSegs: 1 }); // segment > size_max
    const b = submit(drv, T.IN, 0, { inLen: 1536, inSegs: 3 }); // 3 segments > seg_max
    const c = submit(drv, T.IN, 0, { inLen: 2048, inSegs: 2 }); // fine
    drv.kick(0);
    await t.quiesce();
    expect([mem.readU8(a.status), mem.readU8(b.status), mem.readU8(c.status)]).toEqual([ST.IOERR, ST.IOERR, ST.OK]);
    await t.close();
  });

  it('DISCARD punches a hole: the image keeps its size and the host frees the blocks', async () => {
    const p = image('discard.img', MiB, (b) => b.fill(0xab));
    const before = fs.statSync(p);
    const { drv, mem, t } = await dev(p);
    const seg = Buffer.alloc(16);
    seg.writeBigUInt64LE(256n, 0); // 128 KiB in
    seg.writeUInt32LE(512, 8); // 256 KiB
    const dc = submit(drv, T.DISCARD, 0, { out: seg });
    drv.kick(0);
    await t.quiesce();
    expect(mem.readU8(dc.status)).toBe(ST.OK);
    await t.close();
    const after = fs.statSync(p);
    expect(after.size).toBe(before.size);
    const img = fs.readFileSync(p);
    expect(img[256 * 512 - 1]).toBe(0xab);
    expect(img[(256 + 512) * 512]).toBe(0xab);
    // Filesystems without hole punching keep the data (allowed); where holes work, blocks are freed and read 0.
    if (img[256 * 512] === 0) expect(after.blocks).toBeLessThan(before.blocks);
    else expect(img[256 * 512]).toBe(0xab);
  });

  it('WRITE_ZEROES zeroes, DISCARD succeeds, flags are checked; read-only refuses all writes with IOERR', async () => {
    const p = image('wz.img', MiB, (b) => b.fill(0xee));
    const { drv, mem, t } = await dev(p);
    const seg = (sector: number, num: number, flags = 0) => {
      const b = Buffer.alloc(16);
      b.writeBigUInt64LE(BigInt(sector), 0);
      b.writeUInt32LE(num, 8);
      b.writeUInt32LE(flags, 12);
      return b;
    };
    const wz = submit(drv, T.WRITE_ZEROES, 0, { out: seg(10, 4) });
    const dc = submit(drv, T.DISCARD, 0, { out: seg(20, 8) });
    const dcUnmap = submit(drv, T.DISCARD, 0, { out: seg(20, 8, 1) });
    const wzBad = submit(drv, T.WRITE_ZEROES, 0, { out: seg(2047, 4) });
    drv.kick(0);
    await t.quiesce();
    expect([wz, dc, dcUnmap, wzBad].map((x) => mem.readU8(x.status))).toEqual([ST.OK, ST.OK, ST.UNSUPP, ST.IOERR]);
    const img = fs.readFileSync(p);
    expect(img.subarray(10 * 512, 14 * 512).every((x) => x === 0)).toBe(true);
    expect(img[9 * 512 + 511]).toBe(0xee);
    expect(img[14 * 512]).toBe(0xee);
    await t.close();

    const ro = await dev(p, { readOnly: true });
    const w = submit(ro.drv, T.OUT, 0, { out: new Uint8Array(512) });
    const z = submit(ro.drv, T.WRITE_ZEROES, 0, { out: seg(0, 1) });
    const rd = submit(ro.drv, T.IN, 10, { inLen: 512 });
    const fl = submit(ro.drv, T.FLUSH, 0);
    ro.drv.kick(0);
    await ro.t.quiesce();
    expect(ro.mem.readU8(w.status)).toBe(ST.IOERR);
    expect(ro.mem.readU8(z.status)).toBe(ST.UNSUPP); // WRITE_ZEROES is not offered read-only
    expect(ro.mem.readU8(rd.status)).toBe(ST.OK);
    expect(ro.mem.readU8(fl.status)).toBe(ST.OK);
    expect(fs.readFileSync(p)[0]).toBe(0xee);
    await ro.t.close();
  });

  it('syncIo: IN/OUT/FLUSH complete during the notification, one interrupt decision per batch; errors and other types unchanged', async () => {
    const p = image('sync.img', MiB);
    const { drv, mem, t, d, irqs } = await dev(p, { syncIo: true, serial: 'sync-disk' });
    expect(d.syncIo).toBe(true);
    const r = submit(drv, T.IN, 3, { inLen: 1536, inSegs: 3 });
    const payload = Buffer.alloc(1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
    // OUT payload split over two readable descriptors, the first one also holding the header
    const hdrAndData = Buffer.concat([Buffer.from(hdr(T.OUT, 9)), payload.subarray(0, 100)]);
    const w = drv.add(0, [{ len: hdrAndData.length, data: hdrAndData }, { len: 924, data: payload.subarray(100) }, { len: 1, write: true, data: Uint8Array.of(0xff) }]);
    const f = submit(drv, T.FLUSH, 0);
    const bad = submit(drv, T.IN, 2047, { inLen: 1024 }); // past the end
    const odd = submit(drv, T.OUT, 0, { out: new Uint8Array(700) }); // not a multiple of 512
    const id = submit(drv, T.GET_ID, 0, { inLen: 20 }); // asynchronous path
    const before = irqs();
    drv.kick(0);
    // synchronous: everything but GET_ID is on the used ring before any await
    expect(drv.takeUsed(0)).toEqual([
      { id: r.head, len: 1537 },
      { id: w.head, len: 1 },
      { id: f.head, len: 1 },
      { id: bad.head, len: 1 },
      { id: odd.head, len: 1 },
    ]);
    expect(irqs() - before).toBe(1);
    expect(mem.readU16(drv.queues[0]!.used)).toBe(0); // NO_NOTIFY (set while serving) is cleared again
    expect([r, f, bad, odd].map((x) => mem.readU8(x.status))).toEqual([ST.OK, ST.OK, ST.IOERR, ST.IOERR]);
    expect(mem.readU8(w.addrs[2]!)).toBe(ST.OK);
    expect([0, 1, 2].map((i) => mem.readU32(r.data[i]!))).toEqual([3, 4, 5]);
    expect(fs.readFileSync(p).subarray(9 * 512, 11 * 512).equals(payload)).toBe(true);
    await t.quiesce();
    expect(drv.takeUsed(0)).toEqual([{ id: id.head, len: 21 }]);
    expect(d.stats).toMatchObject({ reads: 1, writes: 1, flushes: 1, getIds: 1, errors: 2 });
    await t.close();
    // read-only: the synchronous path refuses writes too
    const ro = await dev(p, { syncIo: true, readOnly: true });
    const rw = submit(ro.drv, T.OUT, 0, { out: new Uint8Array(512) });
    ro.drv.kick(0);
    expect(ro.mem.readU8(rw.status)).toBe(ST.IOERR);
    expect(fs.readFileSync(p)[0]).toBe(0);
    await ro.t.close();
  });

  it('syncIo merges adjacent requests into one preadv/pwritev; a FLUSH ends a group; a failing merged call is retried request by request', async () => {
    const p = image('merge.img', MiB);
    const { drv, mem, t, d } = await dev(p, { syncIo: true });
    const calls: number[] = [];
    const realReadv = nodeFs.readvSync;
    const realWritev = nodeFs.writevSync;
    let failMerged = false;
    nodeFs.readvSync = ((fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => {
      calls.push(-bufs.length);
      if (failMerged && bufs.length > 1) throw Object.assign(new Error('EIO (test)'), { code: 'EIO' });
      return realReadv(fd, bufs, pos);
    }) as typeof nodeFs.readvSync;
    nodeFs.writevSync = ((fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => {
      calls.push(bufs.length);
      return realWritev(fd, bufs, pos);
    }) as typeof nodeFs.writevSync;
    syncBuiltinESMExports();
    try {
      // 3 adjacent writes (sectors 100.., 102.., 104..; the second in two segments), a FLUSH, then 2 adjacent
      // reads of the same range and a read elsewhere.
      const pay = (v: number, n = 1024) => Buffer.alloc(n, v);
      const w1 = submit(drv, T.OUT, 100, { out: pay(1) });
      const hdrW2 = Buffer.from(hdr(T.OUT, 102));
      const w2 = drv.add(0, [{ len: 16, data: hdrW2 }, { len: 512, data: pay(2, 512) }, { len: 512, data: pay(3, 512) }, { len: 1, write: true, data: Uint8Array.of(0xff) }]);
      const w3 = submit(drv, T.OUT, 104, { out: pay(4) });
      const f = submit(drv, T.FLUSH, 0);
      const r1 = submit(drv, T.IN, 100, { inLen: 2048 });
      const r2 = submit(drv, T.IN, 104, { inLen: 1024, inSegs: 2 });
      const r3 = submit(drv, T.IN, 500, { inLen: 512 });
      drv.kick(0);
      expect(calls).toEqual([4, -3]); // one pwritev of 4 views, one preadv of 3 views; r3 alone (one view: plain pread)
      expect(drv.takeUsed(0).map((u) => u.id)).toEqual([w1.head, w2.head, w3.head, f.head, r1.head, r2.head, r3.head]);
      for (const st of [w1.status, w2.addrs[3]!, w3.status, f.status, r1.status, r2.status, r3.status]) expect(mem.readU8(st)).toBe(ST.OK);
      const img = fs.readFileSync(p);
      expect(img.subarray(100 * 512, 102 * 512).every((x) => x === 1)).toBe(true);
      expect(img.subarray(102 * 512, 103 * 512).every((x) => x === 2)).toBe(true);
      expect(img.subarray(103 * 512, 104 * 512).every((x) => x === 3)).toBe(true);
      expect(img.subarray(104 * 512, 106 * 512).every((x) => x === 4)).toBe(true);
      expect(mem.read(r1.data[0]!, 2048).every((x, i) => x === (i < 1024 ? 1 : i < 1536 ? 2 : 3))).toBe(true);
      expect(mem.read(r2.data[0]!, 512).every((x) => x === 4) && mem.read(r2.data[1]!, 512).every((x) => x === 4)).toBe(true);
      expect(mem.readU32(r3.data[0]!)).toBe(500);
      expect(d.stats).toMatchObject({ reads: 3, writes: 3, flushes: 1, bytesRead: 3584, bytesWritten: 3072, errors: 0 });
      // merged call fails: each request is retried alone (and succeeds here)
      calls.length = 0;
      failMerged = true;
      const a = submit(drv, T.IN, 0, { inLen: 512 });
      const b = submit(drv, T.IN, 1, { inLen: 512 });
      drv.kick(0);
      expect(calls).toEqual([-2]);
      expect(drv.takeUsed(0).map((u) => u.id)).toEqual([a.head, b.head]);
      expect([mem.readU8(a.status), mem.readU8(b.status)]).toEqual([ST.OK, ST.OK]);
      expect([mem.readU32(a.data[0]!), mem.readU32(b.data[0]!)]).toEqual([0, 1]);
    } finally {
      nodeFs.readvSync = realReadv;
      nodeFs.writevSync = realWritev;
      syncBuiltinESMExports();
    }
    await t.close();
  });

  it('syncIo with pollUs: serves, polls, leaves used.flags NO_NOTIFY cleared; a full ring of big reads completes without another notification', async () => {
    const p = image('poll.img', 8 * MiB);
    const { drv, mem, t } = await dev(p, { syncIo: true, pollUs: 300 });
    const usedFlags = () => mem.readU16(drv.queues[0]!.used);
    const a = submit(drv, T.IN, 1, { inLen: 512 });
    const t0 = performance.now();
    drv.kick(0);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(0.25); // it polled the (empty) ring ~300 µs
    expect(drv.takeUsed(0)).toEqual([{ id: a.head, len: 513 }]);
    expect(usedFlags()).toBe(0);
    // 12 requests of 3 x 128 KiB (60 of the 64 descriptors): may take more than one turn's budget (1 ms); the
    // rest continues from a macrotask, no further notification needed.
    const reqs = [];
    for (let i = 0; i < 12; i++) reqs.push(submit(drv, T.IN, i * 768, { inLen: 384 * 1024, inSegs: 3 }));
    drv.kick(0);
    for (let i = 0; i < 200 && mem.readU16(drv.queues[0]!.used + 2n) !== 13; i++) await new Promise((r) => setImmediate(r));
    const used = drv.takeUsed(0);
    expect(used).toHaveLength(12);
    expect(used.every((u) => u.len === 384 * 1024 + 1)).toBe(true);
    for (const [i, r] of reqs.entries()) expect(mem.readU32(r.data[0]!)).toBe(i * 768);
    expect(usedFlags()).toBe(0);
    await t.close();
    expect(() => validateBlkOptions({ path: p, pollUs: 5000 })).toThrow(/pollUs/);
  });

  it('syncIo defaults: on for tmpfs images, off on other filesystems and with O_DIRECT; false forces the threadpool', async () => {
    const onDisk = image('auto.img', MiB);
    const a = await dev(onDisk);
    expect(isMemoryBacked(onDisk)).toBe(false); // os.tmpdir() is not tmpfs on the CI hosts
    expect(a.d.syncIo).toBe(false);
    await a.t.close();
    const shm = '/dev/shm';
    if (!fs.existsSync(shm) || !isMemoryBacked(shm)) {
      console.warn('[virtio-blk test] /dev/shm is not tmpfs here: auto syncIo on tmpfs not checked');
      return;
    }
    const tdir = fs.mkdtempSync(path.join(shm, 'kvmkit-blk-'));
    try {
      const p = path.join(tdir, 'shm.img');
      fs.writeFileSync(p, Buffer.alloc(MiB));
      const b = await dev(p);
      expect(b.d.syncIo).toBe(true);
      const r = submit(b.drv, T.IN, 0, { inLen: 4096 });
      b.drv.kick(0);
      expect(b.drv.takeUsed(0)).toEqual([{ id: r.head, len: 4097 }]);
      await b.t.close();
      const c = await dev(p, { syncIo: false });
      expect(c.d.syncIo).toBe(false);
      const r2 = submit(c.drv, T.IN, 0, { inLen: 4096 });
      c.drv.kick(0);
      expect(c.drv.takeUsed(0)).toEqual([]);
      await c.t.quiesce();
      expect(c.drv.takeUsed(0)).toEqual([{ id: r2.head, len: 4097 }]);
      await c.t.close();
    } finally {
      fs.rmSync(tdir, { recursive: true, force: true });
    }
  });

  it('completes requests in the order their I/O finishes (a fast GET_ID overtakes a big read)', async () => {
    const p = image('order.img', 8 * MiB);
    const { drv, t } = await dev(p);
    const big = submit(drv, T.IN, 0, { inLen: 8 * MiB - 4096, inSegs: 8 });
    const id = submit(drv, T.GET_ID, 0, { inLen: 20 });
    drv.kick(0);
    await t.quiesce();
    const used = drv.takeUsed(0).map((u) => u.id);
    expect(used).toEqual([id.head, big.head]);
    await t.close();
  });

  it('direct: true uses O_DIRECT on ext4 and falls back with a warning on tmpfs', async () => {
    const p = image('direct.img', MiB);
    const a = await dev(p, { direct: true });
    expect(a.d.direct).toBe(true);
    const r = submit(a.drv, T.IN, 5, { inLen: 4096 });
    const w = submit(a.drv, T.OUT, 100, { out: Buffer.alloc(1024, 7) });
    a.drv.kick(0);
    await a.t.quiesce();
    expect(a.mem.readU8(r.status)).toBe(ST.OK);
    expect(a.mem.readU32(r.data[0]!)).toBe(5);
    expect(a.mem.readU8(w.status)).toBe(ST.OK);
    expect(fs.readFileSync(p)[100 * 512]).toBe(7);
    await a.t.close();
    // O_DIRECT refusing a request (EINVAL, e.g. 512-byte I/O on a 4Kn host disk): retried through the page cache
    {
      const c = await dev(p, { direct: true });
      const fhAny = (c.d as unknown as { fh: { read: (...a: unknown[]) => Promise<unknown> } }).fh;
      fhAny.read = async () => {
        throw Object.assign(new Error('EINVAL'), { code: 'EINVAL' });
      };
      const r3 = submit(c.drv, T.IN, 100, { inLen: 512 });
      c.drv.kick(0);
      await c.t.quiesce();
      expect(c.mem.readU8(r3.status)).toBe(ST.OK);
      expect(c.mem.readU8(r3.data[0]!)).toBe(7);
      expect(c.d.stats.directFallbacks).toBe(1);
      await c.t.close();
    }
    // tmpfs rejects O_DIRECT with EINVAL on kernels before 6.6; simulate that filesystem to test the fallback.
    const realOpen = VirtioBlk.fsOpen;
    VirtioBlk.fsOpen = async (file, flags) => {
      if (flags & fs.constants.O_DIRECT) throw Object.assign(new Error('EINVAL: invalid argument, open'), { code: 'EINVAL' });
      return realOpen(file, flags);
    };
    try {
      const { log, warnings } = capturingLog();
      const b = await dev(p, { direct: true, log });
      expect(b.d.direct).toBe(false);
      expect(warnings.some((x) => /O_DIRECT/.test(x))).toBe(true);
      const r2 = submit(b.drv, T.IN, 100, { inLen: 512 });
      b.drv.kick(0);
      await b.t.quiesce();
      expect(b.mem.readU8(r2.status)).toBe(ST.OK);
      expect(b.mem.readU8(r2.data[0]!)).toBe(7);
      await b.t.close();
    } finally {
      VirtioBlk.fsOpen = realOpen;
    }
  });

  it('save/restore mid-traffic: pause completes in-flight requests before the state is written', async () => {
    const p = image('snap.img', 8 * MiB);
    const a = await dev(p);
    const reqs = [];
    for (let i = 0; i < 20; i++) reqs.push(submit(a.drv, i % 2 ? T.OUT : T.IN, i * 64, i % 2 ? { out: Buffer.alloc(32 * 1024, i) } : { inLen: 32 * 1024 }));
    a.drv.kick(0);
    expect(a.d.inflightCount).toBe(20);
    await a.t.pause();
    expect(a.d.inflightCount).toBe(0);
    // more work arrives while paused: remembered, not processed
    const late = submit(a.drv, T.IN, 0, { inLen: 512 });
    a.drv.kick(0);
    expect(a.d.inflightCount).toBe(0);
    const saved = a.t.saveState();
    expect(saved.queues[0]!.usedIdx).toBe(20);
    expect(saved.queues[0]!.lastAvail).toBe(20);
    for (const r of reqs) expect(a.mem.readU8(r.status)).toBe(ST.OK);
    // restore into a fresh device on a copy of guest memory
    const w = new StateWriter();
    w.write('virtio-blk', 1, saved);
    const d2 = await VirtioBlk.open({ path: p, readOnly: false, direct: false, serial: 'x', queueSize: 64, sizeMax: MiB, segMax: 62, maxDiscardSectors: 1 << 22, log: silentLogger() });
    const mem2 = GuestMemory.anonymous(16 * MiB);
    mem2.write(0, a.mem.read(0, 16 * MiB));
    const t2 = new VirtioMmioTransport(d2, { memory: mem2 });
    await t2.pause();
    t2.restoreState(new StateReader(w.sections).read('virtio-blk', 1));
    expect(d2.stats.writes).toBe(10);
    t2.resume(); // picks up the request made available while paused
    await t2.quiesce();
    expect(mem2.readU8(late.status)).toBe(ST.OK);
    expect(mem2.readU16(a.drv.queues[0]!.used + 2n)).toBe(21);
    await t2.close();
    await a.t.close();
    // a state for another image size is refused
    const other = image('other.img', MiB);
    const d3 = await VirtioBlk.open({ path: other, readOnly: false, direct: false, serial: 'x', queueSize: 64, sizeMax: MiB, segMax: 62, maxDiscardSectors: 1 << 22, log: silentLogger() });
    expect(() => d3.restoreState(saved.device)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    await d3.close();
  });
});

describe('virtio-blk plugin', () => {
  it('rejects bad options and images with coded errors', () => {
    const notMult = image('odd.img', 1000);
    const empty = image('empty.img', 0);
    const cases: Array<[unknown, string]> = [
      [{}, 'KVMKIT_ERR_PLUGIN_OPTIONS'],
      [{ path: path.join(dir, 'missing.img') }, 'KVMKIT_ERR_VIRTIO_BLK_FILE'],
      [{ path: dir }, 'KVMKIT_ERR_VIRTIO_BLK_FILE'],
      [{ path: notMult }, 'KVMKIT_ERR_VIRTIO_BLK_SIZE'],
      [{ path: empty }, 'KVMKIT_ERR_VIRTIO_BLK_SIZE'],
      [{ path: notMult, id: 'bad id!' }, 'KVMKIT_ERR_PLUGIN_OPTIONS'],
      [{ path: image('q.img', 512), queueSize: 100 }, 'KVMKIT_ERR_PLUGIN_OPTIONS'],
      [{ path: image('q2.img', 512), bogus: true }, 'KVMKIT_ERR_PLUGIN_OPTIONS'],
    ];
    for (const [o, code] of cases) expect(() => validateBlkOptions(o), JSON.stringify(o)).toThrow(expect.objectContaining({ code }));
    // through the plugin host, the image error keeps its own code
    const host = new PluginHost('0.1.0');
    expect(() => host.register(virtioBlk({ path: notMult }))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_VIRTIO_BLK_SIZE' }));
  });

  it('several disks per VM: distinct names, windows, IRQs and cmdline entries', async () => {
    const hooks = createHooks();
    const provided = new Map<string, unknown>();
    const machine = { name: 't', hooks: tapOnly(hooks), log: silentLogger(), provide: (n: string, a: unknown) => provided.set(n, a) } as unknown as MachineApi;
    const mem = GuestMemory.anonymous(4 * MiB);
    const mmio = new MmioBus();
    const vm = { hasIrqchip: false, ioeventfd() { throw new Error('no kvm'); }, irqfd() {}, irqLine() {} } as unknown as Vm;
    const reg = new DeviceRegistry(new PioBus(), mmio, mem, vm, defaultMemoryLayout(64), silentLogger());
    const host = new PluginHost('0.1.0');
    const a = host.register(virtioBlk({ path: image('a.img', MiB), id: 'a' }));
    const b = host.register(virtioBlk({ path: image('b.img', 2 * MiB), id: 'b', readOnly: true }));
    expect([a.name, b.name]).toEqual(['virtio-blk-a', 'virtio-blk-b']);
    for (const p of [a, b]) await p.apply(machine, { log: silentLogger(), options: p.options });
    await hooks.devices.promise(reg);
    expect(mmio.list().map((e) => e.name)).toEqual(['virtio-blk-a', 'virtio-blk-b']);
    expect(reg.cmdlineParts).toHaveLength(2);
    expect(reg.cmdlineParts[0]).toMatch(/^virtio_mmio\.device=4K@0x[0-9a-f]+:5$/);
    expect(reg.cmdlineParts[1]).toMatch(/^virtio_mmio\.device=4K@0x[0-9a-f]+:6$/);
    const apiB = provided.get('virtio-blk-b') as VirtioBlkApi;
    expect(apiB.device!.capacity).toBe(4096n);
    const base = Number(mmio.list()[1]!.base);
    const drv = new VirtioTestDriver({ read: (o, d) => mmio.read(base + o, d), write: (o, d) => mmio.write(base + o, d) }, mem, 0x1000n);
    expect(drv.r32(MMIO.DEVICE_ID)).toBe(2);
    const w = new StateWriter();
    await hooks.saveState.promise(w);
    expect([...w.sections.keys()]).toEqual(['virtio-blk-a', 'virtio-blk-b']);
    await hooks.afterStop.promise(machine);
  });
});
