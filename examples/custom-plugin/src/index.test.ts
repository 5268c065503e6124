import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, PluginHost, StateWriter, StateReader, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import { debugExitPlugin, pluginHarness } from '@kvmkit/testkit';
import counter, { type CounterApi } from './index.js';

/** mov rcx, rdx; L: out 0xe0, al; dec rcx; jnz L; mov al, 7; out 0xf4, al; jmp $ */
const guest = new Uint8Array([0x48, 0x89, 0xd1, 0xe6, 0xe0, 0x48, 0xff, 0xc9, 0x75, 0xf9, 0xb0, 0x07, 0xe6, 0xf4, 0xeb, 0xfe]);

const exitPort = debugExitPlugin();

describe('counter plugin (unit)', () => {
  it('validates its options with coded errors', () => {
    const host = new PluginHost('0.1.0');
    expect(() => host.register(counter({ port: 0x10000 }))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => host.register(counter({ fastPath: 'yes' } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => host.register(counter({ port: 0x80 }))).not.toThrow();
  });

  it('saves and restores its count through the state hooks', async () => {
    // testkit's harness: real hooks, a fake machine API and a real device registry, no KVM.
    const h = pluginHarness(counter());
    await h.start();
    expect(h.pio.find(0xe0)?.name).toBe('counter');
    const w = new StateWriter();
    await h.hooks.saveState.promise(w);
    expect(w.sections.get('counter')).toEqual({ version: 1, data: { count: 0 } });
    await h.hooks.restoreState.promise(new StateReader(new Map([['counter', { version: 1, data: { count: 41 } }]])));
    expect(h.machine.use<CounterApi>('counter')!.value()).toBe(41);
    h.out(0xe0, 1);
    expect(h.machine.use<CounterApi>('counter')!.value()).toBe(42);
  });
});

describe.skipIf(!existsSync('/dev/kvm'))('counter plugin on /dev/kvm', () => {
  for (const fastPath of [true, false]) {
    it(`counts guest port writes (${fastPath ? 'vCPU-thread fast path' : 'main-thread device'})`, async () => {
      const m = new Machine({ config: { name: 'counter', memory: 8, cpus: 1 }, plugins: [exitPort, counter({ fastPath }), bootFlat({ image: guest, ring: 3, arg: 1000 })], log: silentLogger() });
      await m.start();
      const r = await m.waitForStop();
      expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 7 });
      expect(m.api.use<CounterApi>('counter')!.value()).toBe(1000);
      const main = m.exitCounts().main[0] ?? 0;
      if (fastPath) expect(main).toBeLessThan(10);
    });
  }
});
