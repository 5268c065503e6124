import { describe, it, expect } from 'vitest';
import { PluginHost, StateWriter, StateReader, type Plugin, type Vm } from '@kvmkit/kernel';
import { pluginHarness } from '@kvmkit/testkit';
import platformPc, { TSS_ADDR, IDENTITY_MAP_ADDR, type PlatformPcApi, type PlatformPcState } from './index.js';

/** A fake VM that records the platform ioctls and keeps irqchip/PIT/clock blobs. */
function fakeVm() {
  const calls: string[] = [];
  const chips = [new Uint8Array(512).fill(1), new Uint8Array(512).fill(2), new Uint8Array(512).fill(3)];
  let pitState = new Uint8Array(112).fill(7);
  let clock = 123_456_789n;
  let irqchip = false;
  let pit = false;
  const vm = {
    get hasIrqchip() { return irqchip; },
    get hasPit() { return pit; },
    setTssAddr: (a: number) => calls.push(`tss:${a.toString(16)}`),
    setIdentityMapAddr: (a: bigint) => calls.push(`idmap:${a.toString(16)}`),
    createIrqchip: () => { calls.push('irqchip'); irqchip = true; },
    createPit2: (dummy: boolean) => { calls.push(`pit2:${dummy}`); pit = true; },
    getIrqchip: (i: number) => chips[i]!.slice(),
    setIrqchip: (i: number, s: Uint8Array) => { calls.push(`setIrqchip:${i}`); chips[i] = s.slice(); },
    getPit2: () => pitState.slice(),
    setPit2: (s: Uint8Array) => { calls.push('setPit2'); pitState = s.slice(); },
    getClock: () => ({ clock, flags: 0 }),
    setClock: (c: bigint) => { calls.push(`setClock:${c}`); clock = c; },
  };
  return { vm: vm as unknown as Vm, calls, chips };
}

function harness(plugin: Plugin) {
  const f = fakeVm();
  const h = pluginHarness(plugin, { vm: f.vm, config: { memory: 256, cpus: 2 } });
  return { ...h, f, get claimed() { return h.registry.claimedIrqs().map((x) => x.irq); } };
}

describe('platform-pc plugin', () => {
  it('creates TSS, identity map, irqchip and PIT (speaker dummy) in vmCreated', async () => {
    const h = harness(platformPc());
    await h.start();
    expect(h.f.calls).toEqual([`tss:${TSS_ADDR.toString(16)}`, `idmap:${IDENTITY_MAP_ADDR.toString(16)}`, 'irqchip', 'pit2:true']);
    expect(h.claimed.sort((a, b) => a - b)).toEqual([1, 8]);
  });

  it('irqchip/pit can be turned off; then port 0x61 is emulated in userspace', async () => {
    const h = harness(platformPc({ irqchip: false, pit: false }));
    await h.start();
    expect(h.f.calls).not.toContain('irqchip');
    expect(h.f.calls.some((c) => c.startsWith('pit2'))).toBe(false);
    expect(h.pio.find(0x61)?.name).toBe('port-b');
    expect(h.inb(0x61) & 0x20).toBe(0x20);
    const with_ = harness(platformPc());
    await with_.start();
    expect(with_.pio.find(0x61)).toBeUndefined(); // KVM's PIT answers 0x61
  });

  it('PIT without irqchip is an options error', async () => {
    const h = harness(platformPc({ irqchip: false }));
    await expect(h.hooks.vmCreated.promise(h.f.vm)).rejects.toMatchObject({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' });
  });

  it('debug-exit stops the machine with value & 0xff', async () => {
    const h = harness(platformPc());
    await h.start();
    h.out(0xf4, 0x05);
    h.out(0xf4, 0x01, 0x02, 0x00, 0x00);
    expect(h.stops.map((s) => [s.reason, s.exitCode])).toEqual([['guest-exit', 5], ['guest-exit', 1]]);
  });

  it('boot-timer marks are published through the API', async () => {
    const h = harness(platformPc());
    await h.start();
    const before = performance.now();
    h.out(0xf5, 1);
    h.out(0xf5, 2);
    const t = h.machine.use<PlatformPcApi>('platform-pc')!.bootTimes();
    expect(t.map((x) => x.value)).toEqual([1, 2]);
    expect(t[0]!.ms).toBeGreaterThanOrEqual(Math.floor(before));
    expect(t[1]!.ms).toBeGreaterThanOrEqual(t[0]!.ms);
  });

  it('i8042 reset requests a machine reset; self-test answers 0x55; IRQ 1 follows the output buffer', async () => {
    const h = harness(platformPc());
    await h.start();
    h.out(0x64, 0xaa);
    expect(h.inb(0x64) & 1).toBe(1);
    expect(h.inb(0x60)).toBe(0x55);
    expect(h.irqs).toEqual([[1, true], [1, false]]);
    h.out(0x64, 0xfe);
    expect(h.resets).toEqual(['i8042']);
  });

  it('CMOS answers at 0x70/0x71 and POST writes are swallowed', async () => {
    const h = harness(platformPc());
    await h.start();
    h.out(0x70, 0x0d);
    expect(h.inb(0x71)).toBe(0x80);
    h.out(0x70, 0x09);
    const yy = h.inb(0x71);
    expect((yy >> 4) * 10 + (yy & 15)).toBe(new Date().getUTCFullYear() % 100);
    expect(h.out(0x80, 0x12)).toBe(true);
  });

  it('devices can be left out', async () => {
    const h = harness(platformPc({ i8042: false, rtc: false, debugExit: false, bootTimer: false, post: false }));
    await h.start();
    for (const p of [0x60, 0x64, 0x70, 0x80, 0xf4, 0xf5]) expect(h.pio.find(p)).toBeUndefined();
  });

  it('rejects unknown or mistyped options', () => {
    expect(() => new PluginHost('0.1.0').register(platformPc({ pit: 'yes' } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => new PluginHost('0.1.0').register(platformPc({ hpet: true } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
  });

  it('saves irqchip, PIT, clock, CMOS and i8042 as section platform-pc v1 and restores them', async () => {
    const h = harness(platformPc());
    await h.start();
    h.out(0x70, 0x40);
    h.out(0x71, 0x77);
    h.out(0x64, 0x60);
    h.out(0x60, 0x47);
    const w = new StateWriter();
    await h.hooks.saveState.promise(w);
    const sec = w.sections.get('platform-pc')!;
    expect(sec.version).toBe(1);
    const data = sec.data as PlatformPcState;
    expect(data.irqchip?.map((c) => c[0])).toEqual([1, 2, 3]);
    expect(data.pit?.[0]).toBe(7);
    expect(data.clock).toBe(123_456_789n);

    const h2 = harness(platformPc());
    await h2.start();
    await h2.hooks.restoreState.promise(new StateReader(w.sections));
    expect(h2.f.calls.slice(-5)).toEqual(['setIrqchip:0', 'setIrqchip:1', 'setIrqchip:2', 'setPit2', 'setClock:123456789']);
    expect(h2.f.chips[2]![0]).toBe(3);
    h2.out(0x70, 0x40);
    expect(h2.inb(0x71)).toBe(0x77);
    h2.out(0x64, 0x20);
    expect(h2.inb(0x60)).toBe(0x47);
  });

  it('restoring an irqchip into a machine without one is KVMKIT_ERR_STATE_FORMAT', async () => {
    const h = harness(platformPc());
    await h.start();
    const w = new StateWriter();
    await h.hooks.saveState.promise(w);
    const h2 = harness(platformPc({ irqchip: false, pit: false }));
    await h2.start();
    await expect(h2.hooks.restoreState.promise(new StateReader(w.sections))).rejects.toMatchObject({ code: 'KVMKIT_ERR_STATE_FORMAT' });
    const bad = new Map([['platform-pc', { version: 1, data: { irqchip: null, pit: null, clock: -1n, cmos: null, i8042: null } }]]);
    await expect(h2.hooks.restoreState.promise(new StateReader(bad))).rejects.toMatchObject({ code: 'KVMKIT_ERR_STATE_FORMAT' });
  });
});
