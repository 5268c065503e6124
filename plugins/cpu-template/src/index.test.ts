import { describe, it, expect } from 'vitest';
import { existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, Kvm, silentLogger, isKvmkitError, type Plugin, type MachineApi, type CpuidEntry } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import { debugExitPlugin } from '@kvmkit/testkit';
import cpuTemplate, {
  applyNamed, applyTopology, apicIdOf, denseApicIds, featureOf, missingFeatures, doctorCheck, TEMPLATE_MASKS, LEVEL_FEATURES, type CpuTemplateApi, type Topology,
} from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[cpu-template] /dev/kvm not present: KVM tests are skipped');
const log = silentLogger();
/** Exits at once (the test reads KVM's CPUID while the vCPUs are created). */
const exitGuest = new Uint8Array([0x31, 0xc0, 0xe6, 0xf4, 0xeb, 0xfe]);

const exitPort = debugExitPlugin;

/** Records KVM_GET_CPUID2 of every vCPU right after the kernel's KVM_SET_CPUID2. */
function cpuidRecorder(out: CpuidEntry[][]): Plugin {
  return { name: 'cpuid-rec', version: '0.1.0', apply(m: MachineApi) { m.hooks.vcpuCreated.tapPromise('cpuid-rec', async ({ index, vcpu }) => { out[index] = vcpu.getCpuid(); }); } };
}

async function kvmCpuid(cpus: number, plugins: Plugin[]): Promise<{ held: CpuidEntry[][]; api: CpuTemplateApi }> {
  const held: CpuidEntry[][] = [];
  const m = new Machine({ config: { name: 'cpuid', memory: 4, cpus }, plugins: [exitPort(), ...plugins, cpuidRecorder(held), bootFlat({ image: exitGuest, ring: 3 })], log });
  await m.start();
  const t = setTimeout(() => void m.stop(), 20_000);
  await m.waitForStop();
  clearTimeout(t);
  return { held, api: m.api.use<CpuTemplateApi>('cpu-template')! };
}

const leaf = (es: readonly CpuidEntry[], fn: number, index = 0) => es.find((e) => e.function === fn && e.index === index);

// A synthetic Intel-like host: everything set, so masks are visible.
const synthetic: CpuidEntry[] = [
  { function: 0, index: 0, flags: 0, eax: 0x1f, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 },
  { function: 1, index: 0, flags: 0, eax: 0x806f8, ebx: 0x800, ecx: 0xfffa3203 | 0x7ffffbff, edx: 0xbfebfbff },
  { function: 4, index: 0, flags: 1, eax: 0x121, ebx: 0x1c0003f, ecx: 0x3f, edx: 0 },
  { function: 4, index: 1, flags: 1, eax: 0x163, ebx: 0x3c0003f, ecx: 0x3fff, edx: 6 },
  { function: 7, index: 0, flags: 1, eax: 1, ebx: 0xffffffff, ecx: 0xffffffff, edx: 0xffffffff },
  { function: 7, index: 1, flags: 1, eax: 0x10, ebx: 0, ecx: 0, edx: 0 },
  { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0 },
  { function: 0xd, index: 0, flags: 1, eax: 7, ebx: 0x340, ecx: 0x340, edx: 0 },
  { function: 0x12, index: 0, flags: 1, eax: 1, ebx: 0, ecx: 0, edx: 0 },
  { function: 0x40000000, index: 0, flags: 0, eax: 0x40000001, ebx: 0x4b4d564b, ecx: 0x564b4d56, edx: 0x4d },
  { function: 0x80000000, index: 0, flags: 0, eax: 0x80000008, ebx: 0, ecx: 0, edx: 0 },
  { function: 0x80000001, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0x121, edx: 0x2c100800 },
  { function: 0x80000007, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0x100 },
  { function: 0x80000008, index: 0, flags: 0, eax: 0x3030, ebx: 0x1234, ecx: 0, edx: 0 },
];

describe('templates (pure)', () => {
  it('baseline-v2 masks leaf 1/7/0x80000001 to x86-64-v2 and drops XSAVE/SGX/… leaves', () => {
    const t = applyNamed(synthetic, 'baseline-v2');
    const l1 = leaf(t, 1)!;
    for (const f of LEVEL_FEATURES['baseline-v2']) expect(featureOf(f.startsWith('syscall') || f === 'nx' || f === 'lm' || f === 'lahf_lm' ? leaf(t, 0x80000001) : l1, f), f).toBe(true);
    for (const f of ['xsave', 'avx', 'aes', 'pclmulqdq', 'movbe', 'rdrand', 'fma', 'f16c', 'vmx']) expect(featureOf(l1, f), f).toBe(false);
    expect(l1.ecx & ~TEMPLATE_MASKS['baseline-v2'].l1ecx).toBe(0);
    expect(leaf(t, 7)).toMatchObject({ eax: 0, ebx: 0, ecx: 0, edx: 0 });
    expect(leaf(t, 7, 1)).toBeUndefined();
    expect(leaf(t, 0xd)).toBeUndefined();
    expect(leaf(t, 0x12)).toBeUndefined();
    expect(leaf(t, 0x80000007)).toBeUndefined();
    expect(leaf(t, 0)!.eax).toBe(0xb);
    expect(featureOf(leaf(t, 0x80000001), 'abm')).toBe(false);
    expect(featureOf(leaf(t, 0x80000001), 'pdpe1gb')).toBe(false);
    expect(leaf(t, 0x40000000)).toBeDefined(); // KVM leaves stay
  });

  it('minimal is a subset of baseline-v2; host is unchanged', () => {
    const mi = leaf(applyNamed(synthetic, 'minimal'), 1)!;
    const v2 = leaf(applyNamed(synthetic, 'baseline-v2'), 1)!;
    expect(mi.ecx & ~v2.ecx).toBe(0);
    expect(mi.edx & ~v2.edx).toBe(0);
    expect(featureOf(mi, 'sse2')).toBe(true);
    expect(featureOf(mi, 'sse3')).toBe(false);
    expect(applyNamed(synthetic, 'host')).toEqual(synthetic);
    expect(missingFeatures(synthetic, 'baseline-v2')).toEqual([]);
    expect(missingFeatures([{ ...synthetic[1]!, ecx: 0 }], 'baseline-v2')).toEqual(expect.arrayContaining(['sse3', 'popcnt', 'syscall']));
  });

  it('topology: APIC ids, leaf 1, leaf 4 and leaf 0xB agree (2 sockets × 2 cores × 2 threads)', () => {
    const topo: Topology = { sockets: 2, cores: 2, threads: 2 };
    expect(Array.from({ length: 8 }, (_, i) => apicIdOf(topo, i))).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    for (let i = 0; i < 8; i++) {
      const t = applyTopology(synthetic, topo, i);
      const l1 = leaf(t, 1)!;
      expect(l1.ebx >>> 24).toBe(i);
      expect((l1.ebx >>> 16) & 0xff).toBe(4); // addressable logical ids per package
      expect(featureOf(l1, 'ht')).toBe(true);
      const l4 = t.filter((e) => e.function === 4 && (e.eax & 0x1f) !== 0);
      expect(l4.length).toBe(2);
      for (const c of l4) expect((c.eax >>> 26) + 1).toBe(2); // cores per package
      expect((l4[0]!.eax >>> 14) & 0xfff).toBe(1); // L1 shared by the 2 threads of a core
      expect((l4[1]!.eax >>> 14) & 0xfff).toBe(3); // L3 by the 4 logical CPUs of a package
      expect(leaf(t, 0xb, 0)).toMatchObject({ eax: 1, ebx: 2, ecx: 0x100, edx: i });
      expect(leaf(t, 0xb, 1)).toMatchObject({ eax: 2, ebx: 4, ecx: 0x201, edx: i });
      expect(leaf(t, 0xb, 2)).toMatchObject({ eax: 0, ebx: 0, ecx: 2, edx: i });
      // the x2APIC id decomposes into socket/core/thread with the shifts leaf 0xB announces
      expect(i >> 2).toBe(Math.floor(i / 4));
    }
    expect(denseApicIds({ sockets: 1, cores: 3, threads: 1 })).toBe(true);
    expect(denseApicIds({ sockets: 2, cores: 3, threads: 1 })).toBe(false);
    expect(denseApicIds({ sockets: 1, cores: 2, threads: 3 })).toBe(false);
  });

  it('validates options', () => {
    const mk = (o: unknown) => () => new Machine({ config: { name: 'x', memory: 4, cpus: 1 }, plugins: [cpuTemplate(o as never)] });
    expect(mk({ template: 'v3' })).toThrow(/template must be one of/);
    expect(mk({ template: { leaves: [{ function: -1 }] } })).toThrow(/leaves\[0\]\.function/);
    expect(mk({ template: { leaves: [{ function: 1, ecx: { set: 1, toggle: 2 } }] } })).toThrow(/leaves\[0\]\.ecx/);
    expect(mk({ topology: { sockets: 1, cores: 0, threads: 1 } })).toThrow(/topology.cores/);
    expect(mk({ msrs: [{ index: -1, value: 0 }] })).toThrow(/msrs\[0\]\.index/);
    expect(mk({ msrs: [{ index: 0x10, value: 'zz' }] })).toThrow(/msrs\[0\]\.value/);
    expect(mk({ msrs: {} })).toThrow(/msrs must be an array/);
  });
});

describe.skipIf(!hasKvm)('cpu-template MSR shaping on /dev/kvm', () => {
  it('writes the MSRs to every vCPU and KVM holds them (read back with KVM_GET_MSRS)', async () => {
    const TSC_AUX = 0xc0000103;
    const held: bigint[] = [];
    const reader: Plugin = { name: 'msr-rec', version: '0.1.0', apply(m: MachineApi) { m.hooks.vcpuCreated.tapPromise('msr-rec', async ({ index, vcpu }) => { held[index] = vcpu.getMsrs([TSC_AUX])[0]!.data; }); } };
    const m = new Machine({ config: { name: 'msr', memory: 4, cpus: 2 }, plugins: [exitPort(), cpuTemplate({ msrs: [{ index: TSC_AUX, value: '0x2a' }] }), reader, bootFlat({ image: exitGuest, ring: 3 })], log });
    await m.start();
    await m.waitForStop();
    expect(held).toEqual([0x2an, 0x2an]);
    expect(m.api.use<CpuTemplateApi>('cpu-template')!.warnings().filter((w) => /MSR/.test(w.message))).toEqual([]);
  });

  it('an MSR KVM refuses is a coded error before the VM runs', async () => {
    const m = new Machine({ config: { name: 'msrbad', memory: 4, cpus: 1 }, plugins: [cpuTemplate({ msrs: [{ index: 0x7fff_0000, value: 1 }] }), bootFlat({ image: exitGuest, ring: 3 })], log });
    await expect(m.start()).rejects.toMatchObject({ code: 'KVMKIT_ERR_CPU_TEMPLATE_MSR' });
  });
});

describe.skipIf(!hasKvm)('cpu-template on /dev/kvm (KVM_GET_CPUID2 of each vCPU)', () => {
  const host = hasKvm ? (() => { const k = Kvm.open(); try { return k.supportedCpuid(); } finally { k.close(); } })() : [];

  it('baseline-v2 + 1 socket × 2 cores × 2 threads: KVM holds the masked features and a consistent topology', async () => {
    const topo = { sockets: 1, cores: 2, threads: 2 };
    const { held, api } = await kvmCpuid(4, [cpuTemplate({ template: 'baseline-v2', topology: topo })]);
    expect(held).toHaveLength(4);
    expect(api.apicIds()).toEqual([0, 1, 2, 3]);
    const missing = missingFeatures(host, 'baseline-v2');
    const notHeld = api.warnings().filter((w) => w.code === 'KVMKIT_ERR_CPU_TEMPLATE_NOT_HELD');
    expect(api.warnings().length).toBe((missing.length > 0 ? 1 : 0) + notHeld.length);
    for (let i = 0; i < 4; i++) {
      const c = held[i]!;
      const div = api.divergence(i);
      const diverges = (fn: number, reg: string) => div.some((d) => d.function === fn && (d.reg === reg || d.reg === 'leaf'));
      // divergence() is exactly the difference between what was set and what KVM holds
      for (const e of api.applied(i)!) {
        const h = leaf(c, e.function, e.index);
        for (const r of ['eax', 'ebx', 'ecx', 'edx'] as const) expect(h?.[r] === e[r]).toBe(!diverges(e.function, r) || (h !== undefined && h[r] === e[r]));
      }
      if (div.length > 0) expect(notHeld[0]!.message).toMatch(/KVM_GET_CPUID2 differs in/);
      // topology: held exactly, on every host
      const l1 = leaf(c, 1)!;
      expect(l1.ebx >>> 24).toBe(i);
      expect((l1.ebx >>> 16) & 0xff).toBe(4);
      expect(leaf(c, 0xb, 0)).toMatchObject({ eax: 1, ebx: 2, ecx: 0x100, edx: i });
      expect(leaf(c, 0xb, 1)).toMatchObject({ eax: 2, ebx: 4, ecx: 0x201, edx: i });
      expect(leaf(c, 0xb, 2)).toMatchObject({ eax: 0, ebx: 0, ecx: 2, edx: i });
      const l4 = c.filter((e) => e.function === 4 && (e.eax & 0x1f) !== 0);
      expect(l4.length).toBeGreaterThan(0);
      for (const d of l4) expect((d.eax >>> 26) + 1).toBe(2);
      expect(div.filter((d) => d.function === 4 || d.function === 0xb || (d.function === 1 && d.reg === 'ebx'))).toEqual([]);
      // features: the mask is held unless the host rewrites that register (reported above)
      if (!diverges(1, 'ecx')) expect(l1.ecx & ~TEMPLATE_MASKS['baseline-v2'].l1ecx).toBe(0);
      if (!diverges(1, 'edx')) expect(l1.edx & ~TEMPLATE_MASKS['baseline-v2'].l1edx).toBe(0);
      if (!diverges(7, 'ebx')) expect(leaf(c, 7)).toMatchObject({ ebx: 0, ecx: 0, edx: 0 });
      expect(api.applied(i)!.some((e) => e.function === 0xd)).toBe(false);
    }
    if (notHeld.length > 0) console.warn(`[cpu-template] ${notHeld[0]!.message}`);
  });

  it('strict baseline-v2 fails with KVMKIT_ERR_CPU_TEMPLATE exactly when the host lacks v2 features', async () => {
    const missing = missingFeatures(host, 'baseline-v2');
    const m = new Machine({ config: { name: 's', memory: 4, cpus: 1 }, plugins: [exitPort(), cpuTemplate({ template: 'baseline-v2', strict: true }), bootFlat({ image: exitGuest, ring: 3 })], log });
    const e = await m.start().then(() => undefined, (x: unknown) => x);
    if (missing.length > 0) {
      expect(isKvmkitError(e, 'KVMKIT_ERR_CPU_TEMPLATE')).toBe(true);
      expect((e as Error).message).toContain(missing.join(', '));
    } else {
      expect(e).toBeUndefined();
      await m.waitForStop();
    }
  });

  it('minimal, and a custom JSON file (clear x2APIC, drop the KVM leaves, add a leaf)', async () => {
    const m1 = await kvmCpuid(1, [cpuTemplate({ template: 'minimal' })]);
    const rewritesL1 = m1.api.divergence(0).some((d) => d.function === 1 && d.reg === 'ecx');
    for (const es of rewritesL1 ? [m1.api.applied(0)!] : [m1.api.applied(0)!, m1.held[0]!]) {
      expect(featureOf(leaf(es, 1), 'sse3')).toBe(false);
      expect(featureOf(leaf(es, 1), 'x2apic')).toBe(false);
    }
    const dir = mkdtempSync(join(tmpdir(), 'kvmkit-tmpl-'));
    try {
      const file = join(dir, 't.json');
      writeFileSync(file, JSON.stringify({ base: 'host', leaves: [
        { function: 1, ecx: { clear: 1 << 21 } }, { function: 0x40000000, remove: true }, { function: 0x40000001, remove: true },
        { function: 0x80000002, eax: 0x6d766b20, ebx: 0x74696b } ] }));
      const { held, api } = await kvmCpuid(1, [cpuTemplate({ templateFile: file })]);
      expect(api.template()).toBe(`custom:${file}`);
      const c = held[0]!;
      const a = api.applied(0)!;
      expect(leaf(a, 1)!.ecx).toBe((leaf(host, 1)!.ecx & ~(1 << 21)) >>> 0);
      if (!api.divergence(0).some((d) => d.function === 1 && d.reg === 'ecx')) expect(featureOf(leaf(c, 1), 'x2apic')).toBe(false);
      expect(leaf(c, 0x40000000)).toBeUndefined();
      expect(leaf(c, 0x40000001)).toBeUndefined();
      expect(leaf(c, 0x80000002)).toMatchObject({ eax: 0x6d766b20, ebx: 0x74696b });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('topology errors: count mismatch and APIC-id gaps, before any KVM object exists', async () => {
    for (const [cpus, topology, re] of [[2, { sockets: 1, cores: 2, threads: 2 }, /= 4 vCPUs, but the VM has 2/], [6, { sockets: 2, cores: 3, threads: 1 }, /APIC ids 0,1,2,4,5,6/]] as const) {
      const m = new Machine({ config: { name: 't', memory: 4, cpus }, plugins: [cpuTemplate({ topology }), bootFlat({ image: exitGuest, ring: 3 })], log });
      const e = await m.start().then(() => undefined, (x: unknown) => x);
      expect(isKvmkitError(e, 'KVMKIT_ERR_CPU_TOPOLOGY')).toBe(true);
      expect((e as Error).message).toMatch(re);
      expect(m.vm).toBeUndefined();
    }
  });

  it('doctorCheck: KVM holds the changed vendor/max leaf; reports whether the guest saw it', async () => {
    const r = await doctorCheck();
    expect(r.kvmHolds).toEqual(r.set);
    expect(typeof r.featureMaskHeld).toBe('boolean');
    expect(r.honoured).toBe(r.guest.vendor === r.set.vendor && r.guest.maxLeaf === r.set.maxLeaf);
    if (!r.honoured) console.warn(`[cpu-template] ${r.message}`);
    expect(r.guest.vendor).toMatch(/^[\x20-\x7e?]{12}$/);
  });
});
