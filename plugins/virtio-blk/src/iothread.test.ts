/**
 * virtio-blk served by its I/O thread (the default), on a fake VM with real eventfds: the transport hands the
 * queue to the worker (dist/worker.js of this package, so build first), QueueNotify writes reach it through the
 * queue's eventfd. Same request semantics as the main-thread paths (index.test.ts), plus what only a worker
 * has: hand-over on pause/reset, garbage in the worker, close while it sleeps, one thread per disk.
 */
import { describe, it, expect, beforeAll, afterAll, afterEach } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { GuestMemory, silentLogger } from '@kvmkit/kernel';
import { VirtioMmioTransport, VirtioTestDriver, VIRTIO_STATUS as S, MMIO, type VirtioVm } from '@kvmkit/virtio';
import { VirtioBlk, VIRTIO_BLK_T as T, VIRTIO_BLK_S as ST } from './index.js';
import { submit as submitReq } from './requests.test-util.js';

const MiB = 1 << 20;
let dir: string;
const fakeVm: VirtioVm = { hasIrqchip: true, ioeventfd() {}, irqfd() {} };
const open: VirtioMmioTransport[] = [];

beforeAll(() => {
  // tmpfs when available (the worker's synchronous I/O is then a memory copy), else the OS temp dir.
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  dir = fs.mkdtempSync(path.join(base, 'kvmkit-blk-io-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
afterEach(async () => {
  for (const t of open.splice(0)) await t.close();
});

function image(name: string, size: number): string {
  const p = path.join(dir, name);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 512) b.writeUInt32LE(i / 512, i); // sector number at the start of each sector
  fs.writeFileSync(p, b);
  return p;
}

function sharedMemory(size = 16 * MiB, slot = 0): GuestMemory {
  return new GuestMemory([{ gpa: 0n, size, bytes: new Uint8Array(new SharedArrayBuffer(size)), hva: 0n, slot, name: 'ram' }]);
}

async function disk(p: string, o: { readOnly?: boolean; mem?: GuestMemory; init?: boolean } = {}) {
  const d = await VirtioBlk.open({ path: p, readOnly: o.readOnly ?? false, direct: false, serial: 'disk-io', queueSize: 64, sizeMax: MiB, segMax: 62, maxDiscardSectors: 1 << 22, log: silentLogger() });
  const mem = o.mem ?? sharedMemory();
  const t = new VirtioMmioTransport(d, { memory: mem, log: silentLogger() });
  t.attachKvm(fakeVm, 0xd0000000n, 5);
  open.push(t);
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  if (o.init !== false) expect(drv.init() & S.DRIVER_OK).toBe(S.DRIVER_OK);
  return { d, mem, t, drv };
}

function submit(drv: VirtioTestDriver, type: number, sector: bigint | number, o: { out?: Uint8Array; inLen?: number; inSegs?: number } = {}) {
  return submitReq(drv, type, sector, { ...o, indirect: true });
}

const usedIdx = (mem: GuestMemory, drv: VirtioTestDriver) => mem.readU16(drv.queues[0]!.used + 2n);

async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe('virtio-blk on its I/O thread', () => {
  it('serves every request type in the worker (the main thread never runs a request); stats are shared', async () => {
    const p = image('all.img', MiB);
    const { d, mem, t, drv } = await disk(p);
    expect(t.ioThread?.alive).toBe(true);
    let mainCalls = 0;
    const orig = d.processQueue.bind(d);
    d.processQueue = (q: number) => {
      mainCalls++;
      orig(q);
    };
    const payload = Buffer.alloc(1024, 0x5a);
    const reqs = [
      submit(drv, T.IN, 3, { inLen: 1024, inSegs: 2 }),
      submit(drv, T.OUT, 7, { out: payload }),
      submit(drv, T.FLUSH, 0),
      submit(drv, T.GET_ID, 0, { inLen: 20 }),
      submit(drv, T.WRITE_ZEROES, 0, { out: Buffer.from(new Uint32Array([20, 0, 2, 0]).buffer) }),
      submit(drv, T.DISCARD, 0, { out: Buffer.from(new Uint32Array([40, 0, 8, 0]).buffer) }),
      submit(drv, 99, 0),
      submit(drv, T.IN, 2047, { inLen: 1024 }), // past the end
    ];
    drv.kick(0);
    await until(() => usedIdx(mem, drv) === reqs.length, 5000, 'all completions');
    const st = reqs.map((r) => mem.readU8(r.status));
    expect(st).toEqual([ST.OK, ST.OK, ST.OK, ST.OK, ST.OK, ST.OK, ST.UNSUPP, ST.IOERR]);
    expect(mem.read(reqs[0]!.data[0]!, 4)).toEqual(Uint8Array.of(3, 0, 0, 0));
    expect(mem.read(reqs[0]!.data[1]!, 4)).toEqual(Uint8Array.of(4, 0, 0, 0));
    expect(Buffer.from(mem.read(reqs[3]!.data[0]!, 7)).toString()).toBe('disk-io');
    const img = fs.readFileSync(p);
    expect(img.subarray(7 * 512, 9 * 512).every((b) => b === 0x5a)).toBe(true);
    expect(img.subarray(20 * 512, 22 * 512).every((b) => b === 0)).toBe(true);
    expect(d.stats).toMatchObject({ reads: 1, writes: 1, flushes: 1, getIds: 1, writeZeroes: 1, discards: 1, unsupported: 1, errors: 1, bytesRead: 1024, bytesWritten: 1024 });
    expect(d.inflightCount).toBe(0);
    expect(mainCalls).toBe(0);
  });

  it('adjacent requests are merged in the worker too; used lengths and data are right', async () => {
    const p = image('merge.img', MiB);
    const { mem, drv } = await disk(p);
    const rs = [0, 2, 4, 6].map((s) => submit(drv, T.IN, s, { inLen: 1024 }));
    drv.kick(0);
    await until(() => usedIdx(mem, drv) === 4, 5000, 'reads');
    const used = drv.takeUsed(0);
    expect(used.every((u) => u.len === 1025)).toBe(true);
    rs.forEach((r, i) => expect(mem.readU32(r.data[0]!)).toBe(2 * i));
  });

  it('pause mid-traffic serves what was notified, save → restore into a new device → resume: every request once, image right', async () => {
    const p = image('pause.img', 4 * MiB);
    const mem = sharedMemory();
    const a = await disk(p, { mem });
    const first: ReturnType<typeof submit>[] = [];
    for (let i = 0; i < 24; i++) first.push(submit(a.drv, T.OUT, i * 64, { out: Buffer.alloc(32 * 1024, i + 1) }));
    a.drv.kick(0);
    await a.t.pause();
    expect(usedIdx(mem, a.drv)).toBe(24);
    const late: ReturnType<typeof submit>[] = [];
    for (let i = 24; i < 30; i++) late.push(submit(a.drv, T.OUT, i * 64, { out: Buffer.alloc(32 * 1024, i + 1) }));
    a.drv.kick(0); // remembered, not served
    const s = a.t.saveState();
    expect(s.queues[0]).toMatchObject({ usedIdx: 24, lastAvail: 24 });
    expect(a.d.stats.writes).toBe(24);
    await a.t.close();
    open.splice(open.indexOf(a.t), 1);
    const b = await disk(p, { mem, init: false });
    b.t.restoreState(s);
    b.t.resume();
    await until(() => usedIdx(mem, a.drv) === 30, 5000, 'the late writes');
    const used = a.drv.takeUsed(0);
    expect(new Set(used.map((u) => u.id)).size).toBe(30);
    expect([...first, ...late].every((r) => mem.readU8(r.status) === ST.OK)).toBe(true);
    expect(b.d.stats.writes).toBe(30); // restored 24 + 6
    const img = fs.readFileSync(p);
    for (let i = 0; i < 30; i++) expect(img[i * 64 * 512 + 100]).toBe(i + 1);
  });

  it('device reset while the worker is busy: no ring or buffer access after the STATUS write returns', async () => {
    const p = image('reset.img', 8 * MiB);
    const { mem, t, drv } = await disk(p);
    const rs: ReturnType<typeof submit>[] = [];
    for (let i = 0; i < 30; i++) rs.push(submit(drv, T.IN, (i % 15) * 1024, { inLen: 512 * 1024, inSegs: 2 }));
    drv.kick(0);
    await until(() => usedIdx(mem, drv) >= 1, 5000, 'first completion');
    drv.w32(MMIO.STATUS, 0);
    expect(t.ioThread!.running).toBe(false);
    const frozenUsed = usedIdx(mem, drv);
    const lastStatus = rs[rs.length - 1]!.status;
    const before = mem.readU8(lastStatus);
    await new Promise((r) => setTimeout(r, 50));
    expect(usedIdx(mem, drv)).toBe(frozenUsed);
    expect(mem.readU8(lastStatus)).toBe(before);
  });

  it('garbage in the worker (fuzz): random headers on valid chains complete with a status; random rings end in NEEDS_RESET; the VMM goes on', async () => {
    const p = image('fuzz.img', MiB);
    const { d, mem, t, drv } = await disk(p, { readOnly: false });
    let seed = 0xc0ffee;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0), seed);
    // 1. Valid chains, garbage requests.
    const reqs: ReturnType<typeof submit>[] = [];
    for (let i = 0; i < 40; i++) {
      const types = [T.IN, T.OUT, T.FLUSH, T.GET_ID, T.DISCARD, T.WRITE_ZEROES, rnd() & 0xffff];
      const type = types[rnd() % types.length]!;
      const sector = rnd() % 4 === 0 ? BigInt(rnd()) << 32n : BigInt(rnd() % 2100);
      const len = [0, 1, 16, 100, 512, 4096, 1536][rnd() % 7]!;
      reqs.push(submit(drv, type, sector, type === T.IN || type === T.GET_ID ? { inLen: len || 512 } : len ? { out: new Uint8Array(len) } : {}));
      if (i % 8 === 7) {
        drv.kick(0);
        await until(() => usedIdx(mem, drv) === i + 1, 5000, 'garbage requests served');
      }
    }
    expect(reqs.every((r) => [ST.OK, ST.IOERR, ST.UNSUPP].includes(mem.readU8(r.status) as 0 | 1 | 2))).toBe(true);
    expect(drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET).toBe(0);
    // 2. Garbage rings.
    let resets = 0;
    for (let round = 0; round < 20; round++) {
      drv.init();
      const dq = drv.queues[0]!;
      for (let i = 0; i < 16 * dq.size; i += 4) mem.writeU32(dq.desc + BigInt(i), rnd() % 3 === 0 ? rnd() : rnd() % 0x20000);
      for (let i = 0; i < dq.size; i++) mem.writeU16(dq.avail + 4n + BigInt(2 * i), rnd() % (dq.size + 2));
      mem.writeU16(dq.avail + 2n, 1 + (rnd() % (dq.size + 3)));
      drv.kick(0);
      await until(() => (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) !== 0 || usedIdx(mem, drv) > 0, 3000, 'a reaction');
      if (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) resets++;
    }
    expect(resets).toBeGreaterThan(0);
    expect(t.ioThread?.alive).toBe(true);
    drv.init();
    const ok = submit(drv, T.IN, 1, { inLen: 512 });
    drv.kick(0);
    await until(() => usedIdx(mem, drv) === 1, 5000, 'a good read after the fuzz');
    expect(mem.readU32(ok.data[0]!)).toBe(1);
    expect(d.inflightCount).toBe(0);
  });

  it('close() while the worker sleeps in poll() is prompt; two disks get two threads', async () => {
    const a = await disk(image('a.img', MiB));
    const b = await disk(image('b.img', MiB), { mem: sharedMemory() });
    expect(a.t.ioThread).toBeDefined();
    expect(b.t.ioThread).toBeDefined();
    expect(a.t.ioThread).not.toBe(b.t.ioThread);
    const r = submit(b.drv, T.IN, 5, { inLen: 512 });
    b.drv.kick(0);
    await until(() => usedIdx(b.mem, b.drv) === 1, 5000, 'disk b');
    expect(b.mem.readU32(r.data[0]!)).toBe(5);
    await new Promise((res) => setTimeout(res, 30));
    const t0 = performance.now();
    await a.t.close();
    await b.t.close();
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it('pages filled by reads in the worker are in the shared host dirty log', async () => {
    const mem = sharedMemory(16 * MiB, 2);
    const { drv } = await disk(image('dirty.img', MiB), { mem });
    mem.setHostTracking(2, true);
    const r = submit(drv, T.IN, 9, { inLen: 8192, inSegs: 2 });
    mem.takeHostDirty(2);
    drv.kick(0);
    await until(() => usedIdx(mem, drv) === 1, 5000, 'read');
    const bm = mem.takeHostDirty(2)!;
    const dirty = (gpa: bigint) => {
      const pg = Number(gpa >> 12n);
      return (bm[pg >> 3]! & (1 << (pg & 7))) !== 0;
    };
    expect(r.data.every(dirty)).toBe(true);
    expect(dirty(r.status)).toBe(true);
    expect(dirty(drv.queues[0]!.used)).toBe(true);
  });
});
