import { existsSync, readdirSync } from 'node:fs';
import type { Plugin, MachineApi } from '@kvmkit/kernel';

export const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[kvmkit e2e] /dev/kvm not present: KVM tests are skipped');

/** A minimal debug-exit device (port 0xf4) for tests that run without platform-pc. */
export function exitPort(): Plugin {
  return {
    name: 'test-exit',
    version: '0.1.0',
    apply(m: MachineApi) {
      m.hooks.devices.tap('test-exit', (reg) =>
        reg.addPio(0xf4, 1, { read() {}, write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0]! }) }, 'test-exit'));
    },
  };
}

export function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}
