import { describe, it, expect } from 'vitest';
import { existsSync, mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, Kvm, Vm, KVM_CAP, silentLogger, isKvmkitError } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import nestedVirt, { nestedReport, decideNested, NESTED_SECTION, type NestedVirtApi } from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[nested-virt] /dev/kvm not present: KVM tests are skipped');
const log = silentLogger();
const spin = new Uint8Array([0xeb, 0xfe]);

describe('decision', () => {
  const base = { vendor: 'intel' as const, module: 'kvm_intel', moduleNested: true, cpuidFeature: true, nestedStateSize: 16384 };
  it('supported when the module allows nesting and KVM exposes VMX/SVM; state needs KVM_CAP_NESTED_STATE', () => {
    expect(decideNested(base)).toMatchObject({ supported: true, stateSupported: true, reason: expect.stringMatching(/available \(VMX\); nested state up to 16384/) });
    expect(decideNested({ ...base, nestedStateSize: 0 })).toMatchObject({ supported: true, stateSupported: false, reason: expect.stringMatching(/KVM_CAP_NESTED_STATE is 0/) });
    expect(decideNested({ ...base, moduleNested: false })).toMatchObject({ supported: false, reason: expect.stringContaining('modprobe -r kvm_intel && modprobe kvm_intel nested=1') });
    expect(decideNested({ ...base, vendor: 'amd', module: 'kvm_amd', cpuidFeature: false })).toMatchObject({ supported: false, reason: expect.stringMatching(/no SVM/) });
    expect(decideNested({ ...base, vendor: 'amd', module: 'kvm_pvm', moduleNested: null })).toMatchObject({ supported: false, reason: expect.stringMatching(/kvm_pvm.*nested PVM/) });
    expect(decideNested({ ...base, module: null, moduleNested: null })).toMatchObject({ supported: false });
  });
});

describe.skipIf(!hasKvm)('nested-virt on /dev/kvm', () => {
  const cap = hasKvm ? (() => { const k = Kvm.open(); try { return k.checkExtension(KVM_CAP.NESTED_STATE); } finally { k.close(); } })() : 0;

  it('nestedReport reads the module parameter, KVM CPUID and KVM_CAP_NESTED_STATE of this host', () => {
    const r = nestedReport();
    expect(r.nestedStateSize).toBe(cap);
    expect(r.stateSupported).toBe(r.supported && cap > 0);
    if (existsSync('/sys/module/kvm_pvm') && !existsSync('/sys/module/kvm_intel') && !existsSync('/sys/module/kvm_amd')) {
      expect(r).toMatchObject({ module: 'kvm_pvm', supported: false, stateSupported: false });
      console.warn(`[nested-virt] ${r.reason} (KVM_CAP_NESTED_STATE = ${cap})`);
    }
    // a fake sysfs that says nested=Y only helps if KVM also exposes the feature
    const root = mkdtempSync(join(tmpdir(), 'kvmkit-nested-'));
    try {
      const mod = r.vendor === 'amd' ? 'kvm_amd' : 'kvm_intel';
      mkdirSync(join(root, mod, 'parameters'), { recursive: true });
      writeFileSync(join(root, mod, 'parameters/nested'), 'Y\n');
      const f = nestedReport({ sysModule: root });
      expect(f.module).toBe(mod);
      expect(f.moduleNested).toBe(true);
      expect(f.supported).toBe(f.cpuidFeature);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('Vcpu.getNestedState: round trip where KVM_CAP_NESTED_STATE > 0, a coded ioctl error where it is 0', () => {
    const k = Kvm.open();
    const vm = new Vm(k);
    const v = vm.createVcpu(0);
    try {
      if (cap > 0) {
        const s = v.getNestedState(cap);
        expect(s.byteLength).toBeGreaterThanOrEqual(128);
        v.setNestedState(s);
      } else {
        expect(() => v.getNestedState(cap)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_IOCTL' }));
      }
    } finally {
      v.close();
      vm.close();
      k.close();
    }
  });

  const report = hasKvm ? nestedReport() : undefined;
  it.skipIf(report?.supported !== false)('unsupported host: KVMKIT_ERR_NESTED_UNSUPPORTED before any KVM object, or a warning with onUnsupported: warn', async () => {
    const m = new Machine({ config: { name: 'n', memory: 4, cpus: 1 }, plugins: [nestedVirt(), bootFlat({ image: spin, ring: 3 })], log });
    const e = await m.start().then(() => undefined, (x: unknown) => x);
    expect(isKvmkitError(e, 'KVMKIT_ERR_NESTED_UNSUPPORTED')).toBe(true);
    expect((e as Error).message).toContain(report!.reason);
    expect(m.vm).toBeUndefined();

    const w = new Machine({ config: { name: 'nw', memory: 4, cpus: 1 }, plugins: [nestedVirt({ onUnsupported: 'warn' }), bootFlat({ image: spin, ring: 3 })], log });
    await w.start();
    try {
      const api = w.api.use<NestedVirtApi>('nested-virt')!;
      expect(api.active()).toBe(false);
      expect(api.warnings()).toEqual([{ code: 'KVMKIT_ERR_NESTED_UNSUPPORTED', message: expect.stringContaining(report!.reason) }]);
      await w.pause();
      const st = await w.saveState();
      expect(st.get(NESTED_SECTION)).toEqual({ version: 1, data: { carried: false, vcpus: [] } });
    } finally {
      await w.stop();
    }
  });

  it.skipIf(report?.supported !== true)('supported host: VMX/SVM in KVM CPUID, nested state in the state section', async () => {
    const m = new Machine({ config: { name: 'ny', memory: 4, cpus: 1 }, plugins: [nestedVirt(), bootFlat({ image: spin, ring: 3 })], log });
    await m.start();
    try {
      const r = report!;
      const c = m.vcpus[0]!;
      await m.pause();
      const held = c.getCpuid();
      if (r.vendor === 'intel') expect((held.find((e) => e.function === 1)!.ecx >>> 5) & 1).toBe(1);
      else expect((held.find((e) => e.function === 0x80000001)!.ecx >>> 2) & 1).toBe(1);
      const st = await m.saveState();
      const data = st.get(NESTED_SECTION)!.data as { carried: boolean; vcpus: Uint8Array[] };
      expect(data.carried).toBe(r.stateSupported);
    } finally {
      await m.stop();
    }
  });
});
