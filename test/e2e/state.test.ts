import { describe, it, expect } from 'vitest';
import { Machine, silentLogger, type Plugin, type StateSection } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter, { type CounterApi } from 'kvmkit-plugin-example-counter';
// @ts-expect-error plain ESM helper without types
import { pioLoop } from '../../bench/guests.mjs';
import { hasKvm, exitPort } from './helpers.js';

const log = silentLogger();

/** A restore plugin: answers `boot` first (no loader runs) and, before the vCPUs start, puts RAM and state back. */
function restoreFrom(ram: Uint8Array[], sections: Map<string, StateSection>, machine: () => Machine): Plugin {
  return {
    name: 'test-restore', version: '1.0.0',
    apply(m) {
      m.hooks.boot.tapPromise({ name: 'test-restore', stage: -100 }, async () => ({ loader: 'restore', vcpus: [] }));
      m.hooks.beforeRun.tapPromise('test-restore', async () => {
        m.memory!.regions.forEach((r, i) => r.bytes.set(ram[i]!));
        await machine().restoreState(sections);
      });
    },
  };
}

describe.skipIf(!hasKvm)('machine state save/restore', () => {
  it('a paused guest continues in a new machine from where it was', async () => {
    const n = 100_000;
    const a = new Machine({ config: { name: 'src', memory: 8, cpus: 2 }, plugins: [exitPort(), counter(), bootFlat({ image: pioLoop(), ring: 3, arg: n })], log });
    await a.start();
    await new Promise((r) => setTimeout(r, 150));
    await a.pause();
    const sections = await a.saveState();
    const ram = a.memory!.regions.map((r) => r.bytes.slice());
    const countAtSave = a.api.use<CounterApi>('counter')!.value();
    const kernel = sections.get('kernel')!.data as { vcpus: Array<{ regs: { rcx: bigint }; msrs: unknown[] }> };
    expect(kernel.vcpus).toHaveLength(2);
    expect(kernel.vcpus[0]!.msrs.length).toBeGreaterThan(5);
    const remaining = kernel.vcpus.reduce((s, v) => s + Number(v.regs.rcx), 0);
    await a.stop();
    expect(countAtSave).toBeGreaterThan(0);
    expect(countAtSave).toBeLessThan(2 * n);

    let b!: Machine;
    b = new Machine({ config: { name: 'dst', memory: 8, cpus: 2 }, plugins: [restoreFrom(ram, sections, () => b), exitPort(), counter(), bootFlat({ image: new Uint8Array([0x0f, 0x0b]) })], log });
    await b.start();
    const r = await b.waitForStop();
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    // The counter's own state was restored, and the loop ran exactly its remaining iterations.
    expect(b.api.use<CounterApi>('counter')!.value()).toBe(2 * n);
    // RCX counts the iterations left; a vCPU paused between its `out` and `dec rcx` has one counted already.
    expect(countAtSave + remaining - 2 * n).toBeGreaterThanOrEqual(0);
    expect(countAtSave + remaining - 2 * n).toBeLessThanOrEqual(2);
  });

  it('refuses state from a machine of another shape, naming the mismatch', async () => {
    const a = new Machine({ config: { name: 'src2', memory: 8, cpus: 1 }, plugins: [bootFlat({ image: new Uint8Array([0xeb, 0xfe]) })], log });
    await a.start();
    await a.pause();
    const sections = await a.saveState();
    const ram = a.memory!.regions.map((r) => r.bytes.slice());
    await a.stop();
    let b!: Machine;
    b = new Machine({ config: { name: 'dst2', memory: 16, cpus: 1 }, plugins: [restoreFrom(ram, sections, () => b), bootFlat({ image: new Uint8Array([0xeb, 0xfe]) })], log });
    await expect(b.start()).rejects.toMatchObject({ code: 'KVMKIT_ERR_STATE_FORMAT', message: expect.stringMatching(/memory/) });
  });
});
