import { describe, it, expect } from 'vitest';
import { Machine, silentLogger, isKvmkitError, type Plugin, type StopReason } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter, { type CounterApi } from 'kvmkit-plugin-example-counter';
// @ts-expect-error plain ESM helper without types
import { pioLoop, mmioLoop, spin } from '../../bench/guests.mjs';
import { runToStop } from '@kvmkit/testkit';
import { hasKvm, exitPort } from './helpers.js';

const log = silentLogger();


describe.skipIf(!hasKvm)('Machine on /dev/kvm', () => {
  it('runs 2 vCPUs in ring 3 and dispatches PIO on the vCPU threads (fast path)', async () => {
    const n = 20_000;
    const m = new Machine({ config: { name: 'smp', memory: 16, cpus: 2 }, plugins: [exitPort(), counter(), bootFlat({ image: pioLoop(), ring: 3, arg: n })], log });
    const r = await runToStop(m);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(m.api.use<CounterApi>('counter')!.value()).toBe(2 * n);
    expect(m.state).toBe('stopped');
  });

  it.each(['waitAsync', 'eventfd'] as const)('hands exits to main-thread devices through the mailbox (PIO and MMIO, wake by %s)', async (mailboxWake) => {
    for (const image of [pioLoop(), mmioLoop()]) {
      const n = 2_000;
      const m = new Machine({ config: { name: 'main', memory: 16, cpus: 2 }, plugins: [exitPort(), counter({ fastPath: false }), bootFlat({ image, ring: 3, arg: n })], log, mailboxWake });
      const r = await runToStop(m);
      expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
      expect(m.api.use<CounterApi>('counter')!.value()).toBe(2 * n);
      expect(m.stats.mainExits).toBeGreaterThanOrEqual(2 * n);
    }
  });

  it('pauses every vCPU, exposes registers while paused, resumes and stops', async () => {
    const m = new Machine({ config: { name: 'pause', memory: 16, cpus: 2 }, plugins: [bootFlat({ image: spin(), ring: 3 })], log });
    await m.start();
    expect(m.state).toBe('running');
    for (let i = 0; i < 5; i++) {
      await m.pause();
      expect(m.state).toBe('paused');
      for (const v of m.vcpus) expect(v.getRegs().rip).toBe(0x100000n);
      await m.resume();
      expect(m.state).toBe('running');
    }
    await m.pause();
    await m.stop();
    await m.stop(); // idempotent
    expect(m.state).toBe('stopped');
    expect((await m.waitForStop()).reason).toBe('user');
  });

  it('reports a triple fault as a coded stop reason with registers logged', async () => {
    // ud2 with no IDT: #UD → #DF → triple fault.
    const m = new Machine({ config: { name: 'tf', memory: 16, cpus: 1 }, plugins: [bootFlat({ image: new Uint8Array([0x0f, 0x0b]) })], log });
    const r = await runToStop(m);
    expect(r.reason).toBe('triple-fault');
    expect(r.exitCode).not.toBe(0);
    expect(r.error?.code).toBe('KVMKIT_ERR_GUEST_SHUTDOWN');
    expect((r.error?.details as { regs?: { rip?: string } }).regs?.rip).toBe('0x100000');
  });

  it('stops with halt when every vCPU halts (no irqchip)', async () => {
    const m = new Machine({ config: { name: 'hlt', memory: 16, cpus: 2 }, plugins: [bootFlat({ image: new Uint8Array([0xf4, 0xeb, 0xfd]) })], log });
    const r = await runToStop(m);
    expect(r).toMatchObject({ reason: 'halt', exitCode: 0 });
  });

  it('fails start() with coded errors and releases everything', async () => {
    const noFw = new Machine({ config: { name: 'nofw', memory: 16, cpus: 1 }, plugins: [], log });
    await expect(noFw.start()).rejects.toMatchObject({ code: 'KVMKIT_ERR_NO_FIRMWARE' });
    expect(noFw.state).toBe('stopped');
    expect((await noFw.waitForStop()).error?.code).toBe('KVMKIT_ERR_NO_FIRMWARE');

    const thrower: Plugin = { name: 'thrower', version: '1.0.0', apply(mm) { mm.hooks.devices.tap('thrower', () => { throw new Error('boom'); }); } };
    const bad = new Machine({ config: { name: 'throw', memory: 16, cpus: 1 }, plugins: [thrower, bootFlat({ image: spin() })], log });
    const err = await bad.start().catch((e: unknown) => e);
    expect(isKvmkitError(err, 'KVMKIT_ERR_PLUGIN_HOOK')).toBe(true);
    expect((err as Error).message).toMatch(/devices.*boom/);

    const noKvm = new Machine({ config: { name: 'nokvm', memory: 16, cpus: 1 }, plugins: [bootFlat({ image: spin() })], log, kvmPath: '/nonexistent/kvm' });
    await expect(noKvm.start()).rejects.toMatchObject({ code: 'KVMKIT_ERR_KVM_UNAVAILABLE' });
  });

  it('a device that throws stops the VM with a coded error instead of crashing', async () => {
    const badDev: Plugin = { name: 'bad-dev', version: '1.0.0', apply(mm) { mm.hooks.devices.tap('bad-dev', (reg) => reg.addPio(0xe0, 1, { read() {}, write() { throw new Error('device exploded'); } }, 'bad')); } };
    const m = new Machine({ config: { name: 'baddev', memory: 16, cpus: 1 }, plugins: [badDev, bootFlat({ image: pioLoop(), ring: 3, arg: 10 })], log });
    const r = await runToStop(m);
    expect(r.reason).toBe('error');
    expect(r.message).toMatch(/device exploded/);
  });
});

describe.skipIf(!hasKvm)('dirty log', () => {
  it('reports pages written by the guest and by the VMM, once each', async () => {
    // Guest: write one byte at 0x300000 + rdi*0x1000 ... here a single vCPU writes 0x300000 then spins.
    const guest = new Uint8Array([0xc6, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x01, 0xeb, 0xfe]); // mov byte [0x300000], 1; jmp $
    const m = new Machine({ config: { name: 'dirty', memory: 8, cpus: 1 }, plugins: [bootFlat({ image: spin() })], log });
    await m.start();
    await m.pause();
    const vm = m.vm!;
    const mem = m.memory!;
    vm.setDirtyLogging(0, true);
    vm.getDirtyLog(0); // start clean
    mem.write(0x200000, guest); // host writes the code page → dirty (host)
    const regs = m.vcpus[0]!.getRegs();
    m.vcpus[0]!.setRegs({ ...regs, rip: 0x200000n });
    await m.resume();
    await new Promise((r) => setTimeout(r, 100));
    await m.pause();
    const bm = vm.getDirtyLog(0);
    const dirty: number[] = [];
    for (let p = 0; p < 2048; p++) if (bm[p >> 3]! & (1 << (p & 7))) dirty.push(p);
    expect(dirty).toContain(0x200); // written by the VMM
    expect(dirty).toContain(0x300); // written by the guest
    const again = vm.getDirtyLog(0);
    expect(again.some((b) => b !== 0)).toBe(false);
    await m.stop();
  });
});

describe.skipIf(!hasKvm)('start paused', () => {
  it('starts the vCPU threads paused and runs the guest only on resume()', async () => {
    const seen: string[] = [];
    // Devices start on vcpuThread unless the machine is paused (virtio transports do this): it must say 'paused'.
    const watcher: Plugin = { name: 'state-watch', version: '1.0.0', apply(api) { api.hooks.vcpuThread.tap('state-watch', () => { seen.push(api.state); }); } };
    const m = new Machine({ config: { name: 'startpaused', memory: 8, cpus: 2 }, plugins: [exitPort(), counter(), watcher, bootFlat({ image: pioLoop(), ring: 3, arg: 100 })], log });
    await m.start({ paused: true });
    expect(seen).toEqual(['paused', 'paused']);
    expect(m.state).toBe('paused');
    await new Promise((r) => setTimeout(r, 100));
    expect(m.api.use<CounterApi>('counter')!.value()).toBe(0);
    expect(m.api.plugins.map((p) => p.name)).toEqual(['test-exit', 'counter', 'state-watch', 'boot-flat']);
    expect(m.api.strategies()).toEqual({ snapshot: [], migration: [] });
    await m.resume();
    const r = await m.waitForStop();
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(m.api.use<CounterApi>('counter')!.value()).toBe(200);
  });
});
