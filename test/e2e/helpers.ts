import { existsSync, readdirSync } from 'node:fs';

export const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[kvmkit e2e] /dev/kvm not present: KVM tests are skipped');

/** A minimal debug-exit device (port 0xf4) for tests that run without platform-pc. */
export { debugExitPlugin as exitPort } from '@kvmkit/testkit';

export function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}
