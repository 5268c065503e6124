import { describe, it, expect } from 'vitest';
import { DeviceRegistry, GuestMemory, MmioBus, PioBus, StateReader, StateWriter, createHooks, defaultMemoryLayout, silentLogger, tapOnly, type MachineApi, type Vm } from '@kvmkit/kernel';
import { MMIO, VIRTIO_F, VIRTIO_MMIO_INT, VirtioMmioTransport, VirtioTestDriver, VIRTIO_STATUS as S, bit } from '@kvmkit/virtio';
import virtioRng, { VirtioRng, TURN_CHAINS } from './index.js';

function fakeMachine() {
  const hooks = createHooks();
  const provided = new Map<string, unknown>();
  const machine = { name: 't', hooks: tapOnly(hooks), log: silentLogger(), provide: (n: string, a: unknown) => provided.set(n, a) } as unknown as MachineApi;
  const mem = GuestMemory.anonymous(1 << 20);
  const mmio = new MmioBus();
  const vm = { hasIrqchip: false, ioeventfd() { throw new Error('no kvm'); }, irqfd() {}, irqLine() {} } as unknown as Vm;
  const layout = defaultMemoryLayout(64);
  const reg = new DeviceRegistry(new PioBus(), mmio, mem, vm, layout, silentLogger());
  return { hooks, machine, mem, mmio, reg };
}

describe('virtio-rng', () => {
  it('registers on the MMIO bus and fills guest buffers with host entropy', async () => {
    const f = fakeMachine();
    const p = virtioRng({ source: (b) => b.fill(0xa5) });
    p.validateOptions!(p.options);
    await p.apply(f.machine, { log: silentLogger(), options: p.options });
    await f.hooks.devices.promise(f.reg);
    const base = Number(f.mmio.list()[0]!.base);
    expect(f.reg.cmdlineParts).toEqual([`virtio_mmio.device=4K@0x${base.toString(16)}:5`]);
    const port = { read: (o: number, d: Uint8Array) => f.mmio.read(base + o, d), write: (o: number, d: Uint8Array) => f.mmio.write(base + o, d) };
    const drv = new VirtioTestDriver(port, f.mem, 0x1000n);
    expect(drv.r32(MMIO.DEVICE_ID)).toBe(4);
    expect(drv.init() & S.DRIVER_OK).toBe(S.DRIVER_OK);
    const { addrs } = drv.add(0, [{ len: 16, write: true }, { len: 8, write: true }]);
    drv.kick(0);
    expect(drv.takeUsed(0)).toEqual([{ id: 0, len: 24 }]);
    expect([...f.mem.read(addrs[0]!, 16)].every((b) => b === 0xa5)).toBe(true);
    expect(drv.interruptStatus() & VIRTIO_MMIO_INT.VRING).toBe(VIRTIO_MMIO_INT.VRING);
  });

  it('uses real randomness by default, caps requests at maxRequest, completes read-only chains with 0', () => {
    const mem = GuestMemory.anonymous(1 << 20);
    const dev = new VirtioRng({ maxRequest: 100 });
    const t = new VirtioMmioTransport(dev, { memory: mem });
    const drv = new VirtioTestDriver(t, mem, 0x1000n);
    drv.init();
    const a = drv.add(0, [{ len: 4096, write: true }]);
    const b = drv.add(0, [{ len: 8, data: new Uint8Array(8) }]);
    drv.kick(0);
    expect(drv.takeUsed(0)).toEqual([{ id: a.head, len: 100 }, { id: b.head, len: 0 }]);
    const got = mem.read(a.addrs[0]!, 100);
    expect(new Set(got).size).toBeGreaterThan(30); // 100 random bytes: many distinct values
    expect([...mem.read(a.addrs[0]! + 100n, 16)].every((x) => x === 0)).toBe(true);
  });

  it('fills guest memory in place (the source sees the guest buffers, capped across them at maxRequest); a ring fuller than one turn completes over two turns, one interrupt each', async () => {
    const mem = GuestMemory.anonymous(4 << 20);
    const seen: Uint8Array[] = [];
    let irqs = 0;
    const dev = new VirtioRng({ queueSize: 512, maxRequest: 20, source: (b) => (seen.push(b), b.fill(0x5a)) });
    const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
    const drv = new VirtioTestDriver(t, mem, 0x1000n);
    drv.init({ want: bit(VIRTIO_F.VERSION_1) }); // no EVENT_IDX: every turn that completes something interrupts
    const a = drv.add(0, [{ len: 16, write: true }, { len: 16, write: true }]);
    drv.kick(0);
    expect(drv.takeUsed(0)).toEqual([{ id: a.head, len: 20 }]);
    // no bounce buffer: the source wrote guest memory itself (16 bytes, then 4)
    expect(seen.map((b) => b.length)).toEqual([16, 4]);
    expect(seen[0]!.buffer).toBe(mem.range(a.addrs[0]!, 1).buffer);
    expect([...mem.read(a.addrs[1]!, 6)]).toEqual([0x5a, 0x5a, 0x5a, 0x5a, 0, 0]);
    irqs = 0;
    const total = TURN_CHAINS + 40;
    for (let i = 0; i < total; i++) drv.add(0, [{ len: 8, write: true }]);
    drv.kick(0);
    expect(drv.takeUsed(0)).toHaveLength(TURN_CHAINS);
    expect(irqs).toBe(1);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(drv.takeUsed(0)).toHaveLength(total - TURN_CHAINS);
    expect(irqs).toBe(2);
    expect(dev.requests).toBe(total + 1);
    await t.close();
  });

  it('saves and restores device and queue state', async () => {
    const f = fakeMachine();
    const p = virtioRng();
    await p.apply(f.machine, { log: silentLogger(), options: {} });
    await f.hooks.devices.promise(f.reg);
    const base = Number(f.mmio.list()[0]!.base);
    const port = { read: (o: number, d: Uint8Array) => f.mmio.read(base + o, d), write: (o: number, d: Uint8Array) => f.mmio.write(base + o, d) };
    const drv = new VirtioTestDriver(port, f.mem, 0x1000n);
    drv.init();
    drv.add(0, [{ len: 32, write: true }]);
    drv.kick(0);
    const w = new StateWriter();
    await f.hooks.saveState.promise(w);
    const s = w.sections.get('virtio-rng')!.data as { queues: Array<{ usedIdx: number }>; device: { bytesServed: number } };
    expect(s.queues[0]!.usedIdx).toBe(1);
    expect(s.device.bytesServed).toBe(32);

    const g = fakeMachine();
    g.mem.write(0, f.mem.read(0, 1 << 20));
    const p2 = virtioRng();
    await p2.apply(g.machine, { log: silentLogger(), options: {} });
    await g.hooks.devices.promise(g.reg);
    await g.hooks.restoreState.promise(new StateReader(w.sections));
    const w2 = new StateWriter();
    await g.hooks.saveState.promise(w2);
    expect(w2.sections.get('virtio-rng')!.data).toEqual(s);
  });

  it('rejects bad options with coded errors', () => {
    for (const o of [{ queueSize: 3 }, { maxRequest: 0 }, { irq: 'x' }, { bogus: 1 }, { source: 5 }]) {
      const p = virtioRng(o as never);
      expect(() => p.validateOptions!(p.options)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    }
  });
});
