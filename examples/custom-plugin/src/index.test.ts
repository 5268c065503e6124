import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, PluginHost, StateWriter, StateReader, createHooks, tapOnly, silentLogger, type MachineApi } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter, { type CounterApi } from './index.js';

/** mov rcx, rdx; L: out 0xe0, al; dec rcx; jnz L; mov al, 7; out 0xf4, al; jmp $ */
const guest = new Uint8Array([0x48, 0x89, 0xd1, 0xe6, 0xe0, 0x48, 0xff, 0xc9, 0x75, 0xf9, 0xb0, 0x07, 0xe6, 0xf4, 0xeb, 0xfe]);

const exitPort = {
  name: 'exit', version: '1.0.0',
  apply(m: MachineApi) { m.hooks.devices.tap('exit', (r) => r.addPio(0xf4, 1, { read() {}, write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0]! }) }, 'exit')); },
};

describe('counter plugin (unit)', () => {
  it('validates its options with coded errors', () => {
    const host = new PluginHost('0.1.0');
    expect(() => host.register(counter({ port: 0x10000 }))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => host.register(counter({ fastPath: 'yes' } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => host.register(counter({ port: 0x80 }))).not.toThrow();
  });

  it('saves and restores its count through the state hooks', async () => {
    const hooks = createHooks();
    const provided = new Map<string, unknown>();
    const api = { hooks: tapOnly(hooks), provide: (k: string, v: unknown) => provided.set(k, v), use: (k: string) => provided.get(k) } as unknown as MachineApi;
    await counter().apply(api, { log: silentLogger(), options: {} });
    const w = new StateWriter();
    await hooks.saveState.promise(w);
    expect(w.sections.get('counter')).toEqual({ version: 1, data: { count: 0 } });
    await hooks.restoreState.promise(new StateReader(new Map([['counter', { version: 1, data: { count: 41 } }]])));
    expect((provided.get('counter') as CounterApi).value()).toBe(41);
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
