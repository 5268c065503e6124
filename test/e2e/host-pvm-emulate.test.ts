/**
 * host-pvm completes guest ring-0 instructions the nested-PVM host's emulator fails on (KVM_EXIT_INTERNAL_ERROR,
 * emulation failure): a flat ring-0 guest runs `fwait` and then reports through the debug-exit port.
 * On a PVM host, without the profile the VM stops with KVMKIT_ERR_GUEST_INTERNAL (the host limit this works
 * around, seen in a 2-vCPU Linux boot); with it the guest gets past the instruction. On real KVM `fwait` simply
 * runs and both machines exit normally.
 */
import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import hostPvm from '@kvmkit/plugin-host-pvm';
import { debugExitPlugin, runToStop } from '@kvmkit/testkit';
import { hasKvm } from './helpers.js';

const onPvm = existsSync('/sys/module/kvm_pvm');
// fwait; fwait; mov al, 0x2a; out 0xf4, al; hlt
const GUEST = Uint8Array.from([0x9b, 0x9b, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4]);

function machine(extra: Plugin[]): Machine {
  return new Machine({ config: { name: 'fwait', memory: 16, cpus: 1 }, plugins: [debugExitPlugin(), bootFlat({ image: GUEST, ring: 0 }), ...extra], log: silentLogger() });
}

describe.skipIf(!hasKvm)('host-pvm: instructions the host emulator cannot do', () => {
  it('fwait in guest ring 0: an emulation failure without the profile (PVM host), completed with it', async () => {
    const m0 = machine([]);
    const r0 = await runToStop(m0);
    await m0.stop();
    if (onPvm) {
      expect(r0.reason).toBe('error');
      expect(r0.error?.code).toBe('KVMKIT_ERR_GUEST_INTERNAL');
      expect(r0.error?.message).toMatch(/emulation failure/);
    } else {
      expect(r0).toMatchObject({ reason: 'guest-exit', exitCode: 0x2a });
    }
    const m1 = machine([hostPvm({ requirePvm: false })]);
    const r1 = await runToStop(m1);
    await m1.stop();
    expect(r1).toMatchObject({ reason: 'guest-exit', exitCode: 0x2a });
  }, 60_000);

  it('emulate: [] turns it off', async () => {
    const m = machine([hostPvm({ emulate: [] })]);
    const r = await runToStop(m);
    await m.stop();
    if (onPvm) expect(r.error?.code).toBe('KVMKIT_ERR_GUEST_INTERNAL');
    else expect(r.exitCode).toBe(0x2a);
  }, 60_000);
});
