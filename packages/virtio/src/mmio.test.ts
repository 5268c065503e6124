import { describe, it, expect } from 'vitest';
import { GuestMemory, StateReader, StateWriter } from '@kvmkit/kernel';
import { MMIO, VIRTIO_F, VIRTIO_STATUS as S, VIRTIO_MMIO_MAGIC, bit, VIRTIO_MMIO_INT } from './constants.js';
import { VirtioMmioTransport } from './mmio.js';
import { VirtioTestDriver } from './driver.js';
import { EchoDevice, setup } from './testdevice.test-util.js';

const enc = (s: string) => new TextEncoder().encode(s);

describe('virtio-mmio transport', () => {
  it('exposes the identification registers and features', () => {
    const { drv } = setup();
    expect(drv.r32(MMIO.MAGIC_VALUE)).toBe(VIRTIO_MMIO_MAGIC);
    expect(drv.r32(MMIO.VERSION)).toBe(2);
    expect(drv.r32(MMIO.DEVICE_ID)).toBe(0x7f);
    const f = drv.deviceFeatures();
    expect(f & bit(VIRTIO_F.VERSION_1)).not.toBe(0n);
    expect(f & bit(VIRTIO_F.RING_EVENT_IDX)).not.toBe(0n);
    expect(f & bit(VIRTIO_F.RING_INDIRECT_DESC)).not.toBe(0n);
    expect(f & (1n << 5n)).not.toBe(0n);
    drv.w32(MMIO.QUEUE_SEL, 1);
    expect(drv.r32(MMIO.QUEUE_NUM_MAX)).toBe(16);
    drv.w32(MMIO.QUEUE_SEL, 2);
    expect(drv.r32(MMIO.QUEUE_NUM_MAX)).toBe(0);
    // non-32-bit register accesses read 0 and are ignored
    const b = new Uint8Array(2);
    drv.port.read(MMIO.MAGIC_VALUE, b);
    expect([...b]).toEqual([0, 0]);
  });

  it('negotiates features and runs the status state machine', () => {
    const { drv, t } = setup();
    const status = drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_EVENT_IDX) });
    expect(status).toBe(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    expect(t.driverFeatures).toBe(bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_EVENT_IDX));
    // features are frozen after FEATURES_OK
    drv.w32(MMIO.DRIVER_FEATURES_SEL, 0);
    drv.w32(MMIO.DRIVER_FEATURES, 0);
    expect(t.driverFeatures).toBe(bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_EVENT_IDX));
    // clearing bits without a reset is ignored
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE);
    expect(drv.r32(MMIO.STATUS)).toBe(status);
    // the driver cannot set DEVICE_NEEDS_RESET
    drv.w32(MMIO.STATUS, status | S.DEVICE_NEEDS_RESET);
    expect(drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET).toBe(0);
    // reset
    drv.w32(MMIO.STATUS, 0);
    expect(drv.r32(MMIO.STATUS)).toBe(0);
    expect(t.driverFeatures).toBe(0n);
    drv.w32(MMIO.QUEUE_SEL, 0);
    expect(drv.r32(MMIO.QUEUE_READY)).toBe(0);
  });

  it('refuses FEATURES_OK without VERSION_1 or with unoffered bits, and DRIVER_OK without FEATURES_OK', () => {
    const { drv } = setup();
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
    drv.w32(MMIO.DRIVER_FEATURES_SEL, 0);
    drv.w32(MMIO.DRIVER_FEATURES, 1 << 5); // no VERSION_1
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(drv.r32(MMIO.STATUS) & S.FEATURES_OK).toBe(0);
    drv.w32(MMIO.DRIVER_FEATURES_SEL, 1);
    drv.w32(MMIO.DRIVER_FEATURES, 1 | (1 << 20)); // VERSION_1 + unoffered bit 52
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(drv.r32(MMIO.STATUS) & S.FEATURES_OK).toBe(0);
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK);
    expect(drv.r32(MMIO.STATUS) & S.DRIVER_OK).toBe(0);
    drv.w32(MMIO.DRIVER_FEATURES, 1);
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    expect(drv.r32(MMIO.STATUS) & S.FEATURES_OK).toBe(S.FEATURES_OK);
  });

  it('processes a notified queue: chains, used ring, interrupt status and ack', () => {
    const { drv, dev, irqs } = setup();
    drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_INDIRECT_DESC) });
    const { addrs } = drv.add(0, [{ len: 5, data: enc('hello') }, { len: 3, write: true }, { len: 4, write: true }]);
    drv.kick(0);
    expect(dev.processed).toBe(1);
    expect(drv.takeUsed(0)).toEqual([{ id: 0, len: 5 }]);
    expect(new TextDecoder().decode(drv.mem.read(addrs[1]!, 3))).toBe('hel');
    expect(new TextDecoder().decode(drv.mem.read(addrs[2]!, 2))).toBe('lo');
    expect(irqs()).toBe(1);
    expect(drv.interruptStatus()).toBe(VIRTIO_MMIO_INT.VRING);
    drv.ack(VIRTIO_MMIO_INT.VRING);
    expect(drv.interruptStatus()).toBe(0);
    // indirect chain
    const r = drv.add(1, [{ len: 2, data: enc('ab') }, { len: 2, write: true }], { indirect: true });
    drv.kick(1);
    expect(drv.takeUsed(1)).toEqual([{ id: 0, len: 2 }]);
    expect(new TextDecoder().decode(drv.mem.read(r.addrs[1]!, 2))).toBe('ab');
  });

  it('vCPU-thread handler: answers InterruptStatus/InterruptACK from the shared word, passes every other access on', async () => {
    const { drv, t } = setup();
    drv.init({ want: bit(VIRTIO_F.VERSION_1) });
    const spec = t.workerHandler();
    expect(spec.shared).toBeInstanceOf(SharedArrayBuffer);
    // the module the vCPU worker imports (built dist), called as the worker would
    const mod = (await import(spec.module)) as { default: (shared: unknown, ctx: unknown) => { read(o: number, d: Uint8Array): boolean; write(o: number, d: Uint8Array): boolean } };
    const h = mod.default(structuredClone(spec.shared), { vcpu: 0, kind: 'mmio', base: 0 });
    const r32 = (off: number) => {
      const d = new Uint8Array(4);
      return { handled: h.read(off, d), v: new DataView(d.buffer).getUint32(0, true) };
    };
    const w32 = (off: number, v: number) => {
      const d = new Uint8Array(4);
      new DataView(d.buffer).setUint32(0, v, true);
      return h.write(off, d);
    };
    expect(r32(MMIO.INTERRUPT_STATUS)).toEqual({ handled: true, v: 0 });
    drv.add(0, [{ len: 2, data: enc('ab') }, { len: 2, write: true }]);
    drv.kick(0); // main thread raises the used-buffer interrupt
    expect(r32(MMIO.INTERRUPT_STATUS)).toEqual({ handled: true, v: VIRTIO_MMIO_INT.VRING });
    t.configChanged();
    expect(r32(MMIO.INTERRUPT_STATUS).v).toBe(VIRTIO_MMIO_INT.VRING | VIRTIO_MMIO_INT.CONFIG);
    expect(w32(MMIO.INTERRUPT_ACK, VIRTIO_MMIO_INT.VRING)).toBe(true);
    expect(t.interruptStatus).toBe(VIRTIO_MMIO_INT.CONFIG); // the main thread sees the worker's ack
    expect(drv.interruptStatus()).toBe(VIRTIO_MMIO_INT.CONFIG);
    drv.ack(VIRTIO_MMIO_INT.CONFIG); // and the worker sees the main thread's
    expect(r32(MMIO.INTERRUPT_STATUS).v).toBe(0);
    // everything else goes to the main thread: other registers, other widths
    expect(r32(MMIO.STATUS).handled).toBe(false);
    expect(r32(MMIO.MAGIC_VALUE).handled).toBe(false);
    expect(h.read(MMIO.INTERRUPT_STATUS, new Uint8Array(2))).toBe(false);
    expect(w32(MMIO.QUEUE_NOTIFY, 0)).toBe(false);
    expect(w32(MMIO.STATUS, 0)).toBe(false);
    expect(h.write(MMIO.INTERRUPT_ACK, new Uint8Array(1))).toBe(false);
    // a restore writes the shared word too
    const saved = t.saveState();
    t.restoreState({ ...saved, interruptStatus: 3 });
    expect(r32(MMIO.INTERRUPT_STATUS).v).toBe(3);
  });

  it('rejects indirect descriptors when INDIRECT_DESC was not negotiated (DEVICE_NEEDS_RESET + config irq)', () => {
    const { drv, t, irqs } = setup();
    drv.init({ want: bit(VIRTIO_F.VERSION_1) });
    drv.add(0, [{ len: 2, data: enc('ab') }], { indirect: true });
    drv.kick(0);
    expect(drv.r32(MMIO.STATUS) & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
    expect(drv.interruptStatus() & VIRTIO_MMIO_INT.CONFIG).toBe(VIRTIO_MMIO_INT.CONFIG);
    expect(irqs()).toBe(1);
    expect(t.needsResetCount).toBe(1);
    // further notifications are ignored until reset; reset recovers
    drv.kick(0);
    expect(t.needsResetCount).toBe(1);
    expect(drv.init({ want: bit(VIRTIO_F.VERSION_1) }) & S.DRIVER_OK).toBe(S.DRIVER_OK);
    drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
    drv.kick(0);
    expect(drv.takeUsed(0)).toEqual([{ id: 0, len: 1 }]);
  });

  it('suppresses interrupts with EVENT_IDX (used_event) and publishes avail_event', () => {
    const { drv, irqs } = setup();
    drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_EVENT_IDX) });
    drv.setUsedEvent(0, 2); // interrupt only when used idx passes 2 (i.e. after the 3rd buffer)
    for (let i = 0; i < 2; i++) {
      drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
      drv.kick(0);
    }
    expect(irqs()).toBe(0);
    expect(drv.availEvent(0)).toBe(2);
    drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
    drv.kick(0);
    expect(irqs()).toBe(1);
    expect(drv.takeUsed(0)).toHaveLength(3);
  });

  it('suppresses interrupts with VIRTQ_AVAIL_F_NO_INTERRUPT when EVENT_IDX is off', () => {
    const { drv, irqs } = setup();
    drv.init({ want: bit(VIRTIO_F.VERSION_1) });
    drv.setAvailFlags(0, 1);
    drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
    drv.kick(0);
    expect(irqs()).toBe(0);
    expect(drv.takeUsed(0)).toHaveLength(1);
  });

  it('config space reads, and configChanged bumps the generation with a config interrupt', () => {
    const { drv, dev, irqs } = setup();
    drv.init();
    expect([...drv.readConfig(2, 4)]).toEqual([3, 4, 5, 6]);
    expect([...drv.readConfig(6, 4)]).toEqual([7, 8, 0, 0]);
    const g = drv.r32(MMIO.CONFIG_GENERATION);
    dev.config[0] = 9;
    dev.ctx.configChanged();
    expect(drv.r32(MMIO.CONFIG_GENERATION)).toBe(g + 1);
    expect(drv.interruptStatus() & VIRTIO_MMIO_INT.CONFIG).toBe(VIRTIO_MMIO_INT.CONFIG);
    expect(irqs()).toBe(1);
  });

  it('rejects bad queue programming (size, alignment, outside RAM)', () => {
    const { drv, t } = setup({ memSize: 0x20000 });
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
    drv.w32(MMIO.DRIVER_FEATURES_SEL, 1);
    drv.w32(MMIO.DRIVER_FEATURES, 1);
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    drv.w32(MMIO.QUEUE_SEL, 0);
    drv.w32(MMIO.QUEUE_NUM, 6); // not a power of two
    drv.w32(MMIO.QUEUE_READY, 1);
    expect(drv.r32(MMIO.QUEUE_READY)).toBe(0);
    expect(t.status & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
    drv.w32(MMIO.STATUS, 0);
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
    drv.w32(MMIO.DRIVER_FEATURES_SEL, 1);
    drv.w32(MMIO.DRIVER_FEATURES, 1);
    drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    drv.w32(MMIO.QUEUE_NUM, 8);
    drv.w32(MMIO.QUEUE_DESC_LOW, 0x1ffc0); // ring runs past the end of RAM
    drv.w32(MMIO.QUEUE_DRIVER_LOW, 0x2000);
    drv.w32(MMIO.QUEUE_DEVICE_LOW, 0x3000);
    drv.w32(MMIO.QUEUE_READY, 1);
    expect(drv.r32(MMIO.QUEUE_READY)).toBe(0);
    drv.w32(MMIO.QUEUE_DESC_HIGH, 0xffffffff);
    expect(t.queues[0]!.desc).toBe(0xffffffff0001ffc0n);
    drv.w32(MMIO.QUEUE_DESC_HIGH, 0);
    drv.w32(MMIO.QUEUE_DESC_LOW, 0x1008); // misaligned descriptor table
    drv.w32(MMIO.QUEUE_READY, 1);
    expect(drv.r32(MMIO.QUEUE_READY)).toBe(0);
    drv.w32(MMIO.QUEUE_DESC_LOW, 0x1000);
    drv.w32(MMIO.QUEUE_READY, 1);
    expect(drv.r32(MMIO.QUEUE_READY)).toBe(1);
  });

  it('save/restore round-trips transport, queue indexes and device state', async () => {
    const a = setup();
    a.drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_F.RING_EVENT_IDX) });
    for (let i = 0; i < 3; i++) {
      a.drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
      a.drv.kick(0);
    }
    await a.t.pause();
    // a buffer made available while paused is processed after restore+resume
    a.drv.add(0, [{ len: 1, data: enc('y') }, { len: 1, write: true }]);
    a.drv.kick(0);
    expect(a.dev.processed).toBe(3);
    const w = new StateWriter();
    w.write('echo', 1, a.t.saveState());
    // new machine: same memory contents, fresh device
    const mem2 = GuestMemory.anonymous(1 << 20);
    mem2.write(0, a.mem.read(0, 1 << 20));
    const dev2 = new EchoDevice();
    const t2 = new VirtioMmioTransport(dev2, { memory: mem2 });
    t2.restoreState(new StateReader(w.sections).read('echo', 1));
    expect(t2.isPaused).toBe(true); // nothing is processed until resume (memory may still be loading)
    expect(dev2.activations).toBe(1);
    expect(t2.status).toBe(a.t.status);
    expect(t2.queues[0]!.lastAvail).toBe(3);
    expect(t2.queues[0]!.usedIdx).toBe(3);
    expect(dev2.processed).toBe(3);
    t2.resume();
    expect(dev2.processed).toBe(4);
    expect(mem2.readU16(a.drv.queues[0]!.used + 2n)).toBe(4);
  });

  it('rejects a saved state of another shape with a coded error', () => {
    const { t, drv } = setup();
    drv.init();
    const good = t.saveState();
    const bad: unknown[] = [
      { queues: [] },
      null,
      { ...good, driverFeatures: 5 },
      { ...good, status: -1 },
      { ...good, queues: [{ ...good.queues[0], lastAvail: 70000 }, good.queues[1]] },
      { ...good, queues: [{ ...good.queues[0], desc: 'x' }, good.queues[1]] },
    ];
    for (const b of bad) expect(() => t.restoreState(b as never), JSON.stringify(b, (_k, v) => (typeof v === 'bigint' ? String(v) : v))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    // a ring that no longer fits guest memory is a guest problem: DEVICE_NEEDS_RESET, not an exception
    t.restoreState({ ...good, queues: [{ ...good.queues[0]!, desc: 1n << 40n }, good.queues[1]!] });
    expect(t.status & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
  });

  it('async processQueue: errors become DEVICE_NEEDS_RESET; quiesce waits', async () => {
    const mem = GuestMemory.anonymous(1 << 20);
    class Slow extends EchoDevice {
      override async processQueue(q: number): Promise<void> {
        await new Promise((r) => setTimeout(r, 10));
        if (q === 1) throw new Error('backend failed');
        super.processQueue(q);
      }
    }
    const dev = new Slow();
    const t = new VirtioMmioTransport(dev, { memory: mem });
    const drv = new VirtioTestDriver(t, mem, 0x1000n);
    drv.init();
    drv.add(0, [{ len: 1, data: enc('x') }, { len: 1, write: true }]);
    drv.kick(0);
    expect(dev.processed).toBe(0);
    await t.quiesce();
    expect(dev.processed).toBe(1);
    drv.kick(1);
    await t.quiesce();
    expect(t.status & S.DEVICE_NEEDS_RESET).toBe(S.DEVICE_NEEDS_RESET);
  });
});
