import { existsSync } from 'node:fs';
import { describe, it, expect, afterEach } from 'vitest';
import { Machine } from '../machine.js';
import { silentLogger } from '../logger.js';
import type { Plugin, MachineApi } from '../plugin.js';
import { prespawnVcpuWorkers, prespawnedCount, discardPrespawned, takePrespawned, workerFailure } from './pool.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('pool.test: /dev/kvm missing, Machine adoption tests skipped');

/** Real-mode `hlt` at 0x1000 on every vCPU: with no irqchip the VM stops with reason 'halt'. */
function hltGuest(): Plugin {
  let api!: MachineApi;
  return {
    name: 'hlt-guest', version: '0.1.0', provides: ['firmware'],
    apply(m) {
      api = m;
      m.hooks.boot.tapPromise('hlt-guest', async (ctx) => {
        ctx.memory.write(0x1000, new Uint8Array([0xf4]));
        return {
          loader: 'test',
          vcpus: api.vcpus.map((v) => {
            const cs = v.getSregs().cs;
            return { sregs: { cs: { ...cs, selector: 0, base: 0n } }, regs: { rip: 0x1000n, rflags: 2n } };
          }),
        };
      });
    },
  };
}

afterEach(async () => {
  await discardPrespawned();
});

describe('vCPU worker pool', () => {
  it('pre-spawns up to the count asked, hands them out in order and discards the rest', async () => {
    prespawnVcpuWorkers(2);
    prespawnVcpuWorkers(1); // never shrinks, never doubles
    expect(prespawnedCount()).toBe(2);
    const w = takePrespawned()!;
    expect(w).toBeDefined();
    expect(prespawnedCount()).toBe(1);
    expect(workerFailure(w)).toBeUndefined();
    await w.terminate();
    await discardPrespawned();
    expect(prespawnedCount()).toBe(0);
    expect(takePrespawned()).toBeUndefined();
  });

  it.skipIf(!hasKvm)('a Machine adopts pre-spawned workers and spawns the ones it lacks', async () => {
    prespawnVcpuWorkers(1);
    const m = new Machine({ config: { name: 'pool', memory: 2, cpus: 2 }, plugins: [hltGuest()], log: silentLogger() });
    await m.start();
    expect(prespawnedCount()).toBe(0);
    const r = await m.waitForStop();
    await m.stop();
    expect(r).toMatchObject({ reason: 'halt', exitCode: 0 });
    expect(m.vcpuThreadIds).toHaveLength(2);
  });

  it.skipIf(!hasKvm)('workers the Machine does not need stay in the pool', async () => {
    prespawnVcpuWorkers(3);
    const m = new Machine({ config: { name: 'pool1', memory: 2, cpus: 1 }, plugins: [hltGuest()], log: silentLogger() });
    await m.start();
    expect(prespawnedCount()).toBe(2);
    expect(await m.waitForStop()).toMatchObject({ reason: 'halt' });
    await m.stop();
  });

  it('remembers why a pre-spawned worker died (Machine.start reports it as KVMKIT_ERR_VCPU_WORKER)', async () => {
    prespawnVcpuWorkers(1);
    const w = takePrespawned()!;
    await w.terminate();
    expect(workerFailure(w)?.message).toMatch(/exited/);
  });
});
