/**
 * The I/O thread facility on a fake VM (real eventfds, no /dev/kvm needed): QueueNotify writes reach the worker
 * through the queue's eventfd, completions come back through the shared guest RAM and the shared ISR word.
 * Needs the package built (the worker runs dist/iothread-worker.js and dist/iothread-echo.test-util.js).
 */
import { describe, it, expect, afterEach } from 'vitest';
import { EventFd, GuestMemory, silentLogger } from '@kvmkit/kernel';
import { VirtioMmioTransport, type VirtioVm } from './mmio.js';
import { VirtioTestDriver } from './driver.js';
import { EchoDevice } from './testdevice.test-util.js';
import { MMIO, VIRTIO_STATUS, VIRTIO_MMIO_INT } from './constants.js';
import type { IoThreadSpec } from './iothread.js';
import type { EchoWorkerData } from './iothread-echo.test-util.js';

const echoModule = new URL('../dist/iothread-echo.test-util.js', import.meta.url).href;
const S = VIRTIO_STATUS;

class ThreadedEcho extends EchoDevice {
  constructor(
    private readonly data: EchoWorkerData = {},
    private readonly pollUs = 0,
  ) {
    super([8, 16]);
  }
  override ioThread(): IoThreadSpec {
    return { module: echoModule, data: this.data, pollUs: this.pollUs, ...(this.data.fds ? { fds: this.data.fds } : {}) };
  }
}

const fakeVm: VirtioVm = { hasIrqchip: true, ioeventfd() {}, irqfd() {} };
const open: VirtioMmioTransport[] = [];

function sharedMemory(size = 1 << 20, slot = 0): GuestMemory {
  return new GuestMemory([{ gpa: 0n, size, bytes: new Uint8Array(new SharedArrayBuffer(size)), hva: 0n, slot, name: 'ram' }]);
}

function setup(opts: { data?: EchoWorkerData; pollUs?: number; mem?: GuestMemory } = {}) {
  const mem = opts.mem ?? sharedMemory();
  const dev = new ThreadedEcho(opts.data, opts.pollUs);
  const t = new VirtioMmioTransport(dev, { memory: mem, log: silentLogger() });
  t.attachKvm(fakeVm, 0xd0000000n, 5);
  open.push(t);
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  return { mem, dev, t, drv };
}

async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function usedIdx(mem: GuestMemory, drv: VirtioTestDriver, q: number): number {
  return mem.readU16(drv.queues[q]!.used + 2n);
}

/** Adds an echo chain: `len` readable bytes (first byte `tag`) and a writable buffer of the same size. */
function addEcho(drv: VirtioTestDriver, q: number, tag: number, len = 16): { head: number; addrs: bigint[] } {
  const data = new Uint8Array(len).fill(tag);
  return drv.add(q, [{ len, data }, { len, write: true }], { indirect: true });
}

afterEach(async () => {
  for (const t of open.splice(0)) await t.close();
});

describe('virtio I/O thread (fake VM, real eventfds)', () => {
  it('serves the queues in the worker: data, used ring, ISR bit; the main-thread processQueue is never called', async () => {
    const { mem, dev, t, drv } = setup();
    expect(t.wiring).toEqual({ ioeventfds: 2, irqfd: true });
    expect(t.ioThread?.alive).toBe(true);
    expect(drv.init() & S.DRIVER_OK).toBeTruthy();
    const chains = [1, 2, 3].map((tag) => addEcho(drv, 0, tag));
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 3, 5000, 'three completions');
    const used = drv.takeUsed(0);
    expect(used.map((u) => u.id)).toEqual(chains.map((c) => c.head));
    expect(used.every((u) => u.len === 16)).toBe(true);
    chains.forEach((c, i) => expect([...mem.read(c.addrs[1]!, 16)]).toEqual(new Array(16).fill(i + 1)));
    expect(drv.interruptStatus() & VIRTIO_MMIO_INT.VRING).toBeTruthy();
    expect(dev.processed).toBe(0);
    // Second queue too, notified after the first went idle (the worker was asleep in poll()).
    addEcho(drv, 1, 9);
    drv.kick(1);
    await until(() => usedIdx(mem, drv, 1) === 1, 5000, 'queue 1 completion');
    expect(t.ioThread!.counters.sessions).toBe(1);
  });

  it('saveState while the worker is busy takes the rings back with exact indexes (mid-chain stop), then the worker goes on', async () => {
    const { mem, t, drv } = setup({ data: { slowMs: 5 } });
    drv.init();
    for (let i = 0; i < 7; i++) addEcho(drv, 0, 10 + i);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) >= 1, 5000, 'first completion');
    const s = t.saveState(); // not paused: the worker stops after the chain it serves, and is restarted
    expect(s.queues[0]!.usedIdx).toBeLessThan(7);
    // Nothing popped beyond what completed (each chain is served fully before the next pop).
    expect(s.queues[0]!.lastAvail).toBe(s.queues[0]!.usedIdx);
    expect(t.ioThread!.running).toBe(true);
    await until(() => usedIdx(mem, drv, 0) === 7, 5000, 'the rest');
    expect(t.ioThread!.counters.sessions).toBe(2);
  });

  it('EVENT_IDX: after serving a full ring (the device stops at its limit, not at an empty pop) avail_event is re-armed before sleeping', async () => {
    const { mem, drv } = setup();
    drv.init();
    expect(drv.features & (1n << 29n)).toBe(1n << 29n);
    for (let i = 0; i < 8; i++) addEcho(drv, 0, i); // queue 0 has 8 entries: exactly one ring's worth
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 8, 5000, 'eight completions');
    await until(() => drv.availEvent(0) === 8, 5000, 'avail_event = 8');
  });

  it('pause serves what was notified before it, then hands back exact indexes; save/restore with chains pending completes each once', async () => {
    const { mem, t, drv } = setup({ data: { slowMs: 5 } });
    drv.init();
    for (let i = 0; i < 4; i++) addEcho(drv, 0, 10 + i);
    drv.kick(0);
    await t.pause(); // right after the kick: the worker may not even have woken yet
    expect(usedIdx(mem, drv, 0)).toBe(4);
    // Paused: made available and notified, remembered but not served.
    for (let i = 4; i < 7; i++) addEcho(drv, 0, 10 + i);
    drv.kick(0);
    await new Promise((r) => setTimeout(r, 30));
    expect(usedIdx(mem, drv, 0)).toBe(4);
    const s = t.saveState();
    expect(s.queues[0]).toMatchObject({ usedIdx: 4, lastAvail: 4 });
    // Restore into a fresh transport (same memory) and resume: the rest completes once.
    await t.close();
    const dev2 = new ThreadedEcho();
    const t2 = new VirtioMmioTransport(dev2, { memory: mem, log: silentLogger() });
    t2.attachKvm(fakeVm, 0xd0000000n, 5);
    open.push(t2);
    t2.restoreState(s);
    expect(t2.isPaused).toBe(true);
    t2.resume();
    await until(() => usedIdx(mem, drv, 0) === 7, 5000, 'the remaining completions');
    const used = drv.takeUsed(0);
    expect(used).toHaveLength(7);
    expect(new Set(used.map((u) => u.id)).size).toBe(7);
    await t2.pause();
    expect(t2.saveState().queues[0]).toMatchObject({ lastAvail: 7, usedIdx: 7 });
  });

  it('device reset while the worker is busy: the STATUS write returns only after the worker let go; no ring access after it', async () => {
    const { mem, t, drv } = setup({ data: { slowMs: 20 } });
    drv.init();
    for (let i = 0; i < 6; i++) addEcho(drv, 0, 20 + i);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) >= 1, 5000, 'first completion');
    drv.w32(MMIO.STATUS, 0);
    expect(t.ioThread!.running).toBe(false);
    const after = usedIdx(mem, drv, 0);
    expect(after).toBeLessThan(6);
    await new Promise((r) => setTimeout(r, 80));
    expect(usedIdx(mem, drv, 0)).toBe(after);
    // The device comes back to life after re-initialisation.
    drv.init();
    addEcho(drv, 0, 42);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'completion after reset');
  });

  it('queue disable while busy stops the worker for that queue; the other queue keeps being served', async () => {
    const { mem, t, drv } = setup({ data: { slowMs: 10 } });
    drv.init();
    for (let i = 0; i < 5; i++) addEcho(drv, 0, 30 + i);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) >= 1, 5000, 'first completion');
    drv.w32(MMIO.QUEUE_SEL, 0);
    drv.w32(MMIO.QUEUE_READY, 0);
    const frozen = usedIdx(mem, drv, 0);
    expect(t.queues[0]!.ready).toBe(false);
    expect(t.ioThread!.running).toBe(true); // restarted for queue 1
    addEcho(drv, 1, 1);
    drv.kick(1);
    await until(() => usedIdx(mem, drv, 1) === 1, 5000, 'queue 1 completion');
    expect(usedIdx(mem, drv, 0)).toBe(frozen);
  });

  it('a malformed chain found in the worker sets DEVICE_NEEDS_RESET (config interrupt); the VMM goes on; reset recovers', async () => {
    const { mem, t, drv } = setup();
    drv.init();
    // Head index out of range on the avail ring.
    const dq = drv.queues[0]!;
    mem.writeU16(dq.avail + 4n, 200);
    mem.writeU16(dq.avail + 2n, 1);
    dq.availIdx = 1;
    drv.kick(0);
    await until(() => (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) !== 0, 5000, 'NEEDS_RESET');
    expect(t.needsResetCount).toBe(1);
    expect(drv.interruptStatus() & VIRTIO_MMIO_INT.CONFIG).toBeTruthy();
    expect(t.ioThread!.running).toBe(false);
    drv.init();
    addEcho(drv, 0, 5);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'completion after reset');
  });

  it('garbage rings and descriptor tables (fuzz): every round ends in completions or NEEDS_RESET, never a crash', async () => {
    const { mem, t, drv } = setup();
    let seed = 12345;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0), seed);
    let resets = 0;
    for (let round = 0; round < 40; round++) {
      drv.init({ queueSizes: [8, 16] });
      const dq = drv.queues[0]!;
      // Random descriptor table and avail ring contents, then a random avail idx (≤ size, else that is an error too).
      for (let i = 0; i < 16 * dq.size; i += 4) mem.writeU32(dq.desc + BigInt(i), rnd() % 4 === 0 ? rnd() : rnd() % 0x3000);
      for (let i = 0; i < dq.size; i++) mem.writeU16(dq.avail + 4n + BigInt(2 * i), rnd() % (dq.size + 2));
      mem.writeU16(dq.avail + 2n, rnd() % (dq.size + 3));
      drv.kick(0);
      // avail idx 0: nothing to serve. Otherwise the first chain either completes or is refused (NEEDS_RESET).
      if (mem.readU16(dq.avail + 2n) === 0) continue;
      await until(() => (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) !== 0 || usedIdx(mem, drv, 0) > 0, 2000, 'a reaction');
      await new Promise((r) => setTimeout(r, 2));
      if (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) resets++;
    }
    expect(resets).toBeGreaterThan(0);
    expect(t.ioThread?.alive).toBe(true);
    drv.init();
    addEcho(drv, 0, 7);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'completion after the fuzz');
  });

  it('close() with the worker blocked in poll() returns promptly', async () => {
    const { t, drv } = setup();
    drv.init();
    await new Promise((r) => setTimeout(r, 50)); // the worker is asleep in poll() now
    const io = t.ioThread!;
    expect(io.running).toBe(true);
    const t0 = performance.now();
    await t.close();
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(io.alive).toBe(false);
  });

  it('a worker crash puts the device in NEEDS_RESET; after the reset the main thread serves the queues', async () => {
    const { mem, t, dev, drv } = setup({ data: { crashOn: 0xee } });
    drv.init();
    addEcho(drv, 0, 0xee);
    drv.kick(0);
    await until(() => (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) !== 0, 5000, 'NEEDS_RESET after the crash');
    expect(t.ioThread).toBeUndefined();
    drv.init();
    addEcho(drv, 0, 0xee);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'main-thread completion');
    expect(dev.processed).toBe(1);
  });

  it('a worker that cannot load its module: logged, the queues are served on the main thread (after a reset)', async () => {
    const mem = sharedMemory();
    class Broken extends EchoDevice {
      override ioThread(): IoThreadSpec {
        return { module: new URL('./no-such-module.js', import.meta.url).href };
      }
    }
    const dev = new Broken([8, 16]);
    const t = new VirtioMmioTransport(dev, { memory: mem, log: silentLogger() });
    t.attachKvm(fakeVm, 0xd0000000n, 5);
    open.push(t);
    await until(() => t.ioThread === undefined, 5000, 'the thread to die');
    const drv = new VirtioTestDriver(t, mem, 0x1000n);
    drv.init();
    addEcho(drv, 0, 3);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'main-thread completion');
    expect(dev.processed).toBe(1);
  });

  it('a device error thrown in the worker is contained (NEEDS_RESET, logged, thread alive)', async () => {
    const { t, drv } = setup({ data: { throwOn: 0x66 } });
    drv.init();
    addEcho(drv, 0, 0x66);
    drv.kick(0);
    await until(() => (drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET) !== 0, 5000, 'NEEDS_RESET');
    expect(t.ioThread?.alive).toBe(true);
  });

  it('pages the worker writes land in the shared host dirty log', async () => {
    const mem = sharedMemory(1 << 20, 3);
    const { drv } = setup({ mem });
    drv.init();
    mem.setHostTracking(3, true);
    const c = addEcho(drv, 0, 0x55, 64);
    mem.takeHostDirty(3); // what the driver (this test) wrote
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'completion');
    const bm = mem.takeHostDirty(3)!;
    const dirty = (gpa: bigint) => {
      const p = Number(gpa >> 12n);
      return (bm[p >> 3]! & (1 << (p & 7))) !== 0;
    };
    expect(dirty(c.addrs[1]!)).toBe(true); // the device-written buffer
    expect(dirty(drv.queues[0]!.used)).toBe(true); // the used ring
  });

  it('extra host fds (a NIC\'s TAP, say): fdReadable runs in the worker; a device can set an fd aside until the next notification', async () => {
    const efd = new EventFd();
    const counters = new SharedArrayBuffer(4);
    const c = new Int32Array(counters);
    const { mem, t, drv } = setup({ data: { fds: [efd.fd], counters, fdMode: 'drain' } });
    drv.init();
    await until(() => t.ioThread!.counters.sessions === 1, 5000, 'session');
    efd.signal(1);
    await until(() => Atomics.load(c, 0) === 1, 5000, 'fdReadable');
    efd.signal(1);
    await until(() => Atomics.load(c, 0) === 2, 5000, 'fdReadable again');
    await t.close();
    efd.close();
    // setAside: the fd stays readable but the worker does not spin on it; a queue notification re-arms it.
    const efd2 = new EventFd();
    const counters2 = new SharedArrayBuffer(4);
    const c2 = new Int32Array(counters2);
    const s2 = setup({ data: { fds: [efd2.fd], counters: counters2, fdMode: 'setAside' } });
    s2.drv.init();
    await until(() => s2.t.ioThread!.counters.sessions === 1, 5000, 'session');
    efd2.signal(1);
    await until(() => Atomics.load(c2, 0) === 1, 5000, 'fdReadable');
    const w0 = s2.t.ioThread!.counters.wakeups;
    await new Promise((r) => setTimeout(r, 50));
    expect(Atomics.load(c2, 0)).toBe(1);
    expect(s2.t.ioThread!.counters.wakeups).toBe(w0);
    addEcho(s2.drv, 0, 1);
    s2.drv.kick(0);
    await until(() => usedIdx(s2.mem, s2.drv, 0) === 1, 5000, 'completion');
    await until(() => Atomics.load(c2, 0) >= 2, 5000, 'fdReadable after the notification');
    void mem;
    efd2.close();
  });

  it('busy-polling (pollUs) serves chains published without a notification', async () => {
    const { mem, t, drv } = setup({ pollUs: 200_000 });
    drv.init();
    addEcho(drv, 0, 1);
    drv.kick(0);
    await until(() => usedIdx(mem, drv, 0) === 1, 5000, 'first completion');
    // No kick: the worker is polling the avail ring (NO_NOTIFY set in used.flags meanwhile).
    await until(() => (mem.readU16(drv.queues[0]!.used) & 1) === 1, 5000, 'NO_NOTIFY while polling');
    addEcho(drv, 0, 2);
    await until(() => usedIdx(mem, drv, 0) === 2, 5000, 'completion found by polling');
    expect(t.ioThread!.counters.pollHits).toBeGreaterThan(0);
  });
});
