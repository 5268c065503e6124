import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { formatDoctor, runDoctor } from './doctor.js';

const hasKvm = existsSync('/dev/kvm');
const root = mkdtempSync(path.join(os.tmpdir(), 'kvmkit-doctor-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function sysModule(mods: string[]): string {
  const d = mkdtempSync(path.join(root, 'sys-'));
  for (const m of mods) mkdirSync(path.join(d, m));
  return d;
}
function project(config?: unknown): string {
  const d = mkdtempSync(path.join(root, 'proj-'));
  writeFileSync(path.join(d, 'package.json'), '{}');
  if (config !== undefined) writeFileSync(path.join(d, 'kvmkit.config.json'), JSON.stringify(config));
  return d;
}
const missingPlugin = async () => {
  throw new Error("Cannot find package '@kvmkit/plugin-host-pvm'");
};

describe('doctor: host kind and suggestions', () => {
  it('falls back to /sys/module/kvm_pvm when the host-pvm package cannot be imported, and suggests the profile', async () => {
    const r = await runDoctor({ cwd: project(), sysModule: sysModule(['kvm', 'kvm_pvm']), importHostPvm: missingPlugin });
    expect(r.modules).toEqual({ kvm: true, kvm_intel: false, kvm_amd: false, kvm_pvm: true });
    expect(r.nestedPvm.detected).toBe(true);
    expect(r.nestedPvm.source).toContain('kvm_pvm');
    expect(r.nestedPvm.source).toContain('not usable');
    expect(r.suggestions.join('\n')).toContain("hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } }");
    expect(r.checks.find((c) => c.name === 'host kind')!.detail).toContain('nested PVM host');
  });

  it('uses doctorReport() of @kvmkit/plugin-host-pvm when it exists, and prints its lines', async () => {
    const report = { pvm: true, evidence: ['kvm_pvm loaded', 'guest ring 0 emulated'], suggestion: 'use host-pvm', cmdline: 'noxsave' };
    const r = await runDoctor({ cwd: project(), sysModule: sysModule(['kvm']), importHostPvm: async () => ({ doctorReport: async () => report }) });
    expect(r.nestedPvm).toEqual({ detected: true, source: '@kvmkit/plugin-host-pvm doctorReport()', report });
    const text = formatDoctor(r);
    expect(text).toContain('nested PVM: yes (from @kvmkit/plugin-host-pvm doctorReport())');
    expect(text).toContain('        - guest ring 0 emulated');
    expect(text).toContain('        host-pvm adds to the guest cmdline: noxsave');
  });

  it('with the real @kvmkit/plugin-host-pvm: it is asked with our /sys/module', async () => {
    const pvm = await runDoctor({ cwd: project(), sysModule: sysModule(['kvm', 'kvm_pvm']) });
    expect(pvm.nestedPvm.source).toBe('@kvmkit/plugin-host-pvm doctorReport()');
    expect(pvm.nestedPvm.detected).toBe(true);
    const plain = await runDoctor({ cwd: project(), sysModule: sysModule(['kvm', 'kvm_amd']) });
    expect(plain.nestedPvm.detected).toBe(false);
    expect(plain.suggestions).toEqual([]);
  });

  it('a plain KVM host: no PVM suggestion', async () => {
    const r = await runDoctor({ cwd: project(), sysModule: sysModule(['kvm', 'kvm_intel']), importHostPvm: async () => ({ doctorReport: () => ({ detected: false }) }) });
    expect(r.nestedPvm.detected).toBe(false);
    expect(r.suggestions).toEqual([]);
    expect(r.checks.find((c) => c.name === 'host kind')!.detail).toBe('KVM on Intel VT-x');
  });

  it('reads the config: no suggestion when the chosen host section has host-pvm, one when it has not', async () => {
    const sys = sysModule(['kvm', 'kvm_pvm']);
    const good = project({ vms: { a: {} }, hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } } });
    const r = await runDoctor({ cwd: good, sysModule: sys, importHostPvm: missingPlugin });
    // The config's match reads the real /sys/module; on this machine kvm_pvm may or may not be loaded.
    if (existsSync('/sys/module/kvm_pvm')) {
      expect(r.config).toMatchObject({ file: path.join(good, 'kvmkit.config.json'), host: 'nested', hasHostPvm: true });
      expect(r.suggestions).toEqual([]);
    }
    const bad = project({ vms: { a: {} } });
    const r2 = await runDoctor({ cwd: bad, sysModule: sys, importHostPvm: missingPlugin });
    expect(r2.config).toMatchObject({ file: path.join(bad, 'kvmkit.config.json'), host: null, hasHostPvm: false });
    expect(r2.suggestions[0]).toContain(`${path.join(bad, 'kvmkit.config.json')} gives VMs here no host-pvm plugin`);
    const broken = project({ vms: 3 });
    const r3 = await runDoctor({ cwd: broken, sysModule: sys, importHostPvm: missingPlugin });
    expect(r3.config.error).toMatch(/^KVMKIT_ERR_CONFIG: .*vms must be/);
  });

  it.skipIf(!hasKvm)('on /dev/kvm: usable, capability values recorded', async () => {
    const r = await runDoctor({ cwd: project() });
    expect(r.usable).toBe(true);
    expect(r.apiVersion).toBe(12);
    expect(Object.keys(r.capabilities.required)).toHaveLength(8);
    expect(r.limits.nrMemslots).toBeGreaterThan(0);
  });

  it('a device path that is not a character device fails the required checks', async () => {
    const f = path.join(root, 'not-a-device');
    writeFileSync(f, '');
    const r = await runDoctor({ cwd: project(), devicePath: f, importHostPvm: missingPlugin });
    expect(r.usable).toBe(false);
    expect(r.checks[0]).toMatchObject({ ok: false, detail: 'exists but is not a character device' });
    // Opening a regular file works, but it is not KVM: the API version ioctl fails.
    expect(r.checks.find((c) => c.name === 'KVM API version 12')?.ok).toBe(false);
  });
});
