import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import { Kvm, KVM_CAP, isKvmkitError } from '@kvmkit/kernel';
import { loadConfig, resolveVm, pluginKey } from '@kvmkit/config';

type CapName = keyof typeof KVM_CAP;

/** What kvmkit needs (the kernel requires some at start; devices and plugins need the rest). */
export const REQUIRED_CAPS: readonly CapName[] = ['IRQCHIP', 'USER_MEMORY', 'SET_TSS_ADDR', 'EXT_CPUID', 'IOEVENTFD', 'IRQFD', 'PIT2', 'IMMEDIATE_EXIT'];
/** Nice to have: snapshot/migration completeness, nested virtualization, tuning. */
export const OPTIONAL_CAPS: readonly CapName[] = [
  'NESTED_STATE', 'XSAVE', 'XCRS', 'VCPU_EVENTS', 'DEBUGREGS', 'MP_STATE', 'PIT_STATE2', 'ADJUST_CLOCK', 'TSC_CONTROL',
  'IRQ_ROUTING', 'SET_IDENTITY_MAP_ADDR', 'SET_BOOT_CPU_ID', 'SYNC_MMU', 'X86_DISABLE_EXITS',
];

export interface Check {
  name: string;
  ok: boolean;
  /** Required checks make the host unusable when they fail. */
  required: boolean;
  detail: string;
}

export interface DoctorReport {
  usable: boolean;
  hostname: string;
  kernel: string;
  device: { path: string; exists: boolean; accessible: boolean; detail: string };
  apiVersion: number | null;
  capabilities: { required: Record<string, number>; optional: Record<string, number>; missingRequired: string[] };
  limits: Record<string, number>;
  modules: Record<string, boolean>;
  /** CPU runs under a hypervisor (cpuinfo "hypervisor" flag). */
  underHypervisor: boolean;
  nestedPvm: { detected: boolean; source: string; report?: unknown };
  /** @kvmkit/plugin-nested-virt's nestedReport(): can guests run their own KVM, and can nested state be saved. */
  nested?: { supported: boolean; stateSize: number; detail: string } | { error: string };
  /** @kvmkit/plugin-cpu-template's doctorCheck(): does the guest see the CPUID that KVM_SET_CPUID2 installed. */
  cpuid?: { honoured: boolean; detail: string } | { error: string };
  config: { file: string | null; host: string | null; reason: string | null; hasHostPvm: boolean | null; error?: string };
  checks: Check[];
  suggestions: string[];
}

export interface DoctorOptions {
  cwd?: string;
  devicePath?: string;
  /** Test hook: where /sys/module lives. */
  sysModule?: string;
  /** Test hook: import of the host-pvm plugin package. */
  importHostPvm?: () => Promise<Record<string, unknown>>;
  /** Run cpu-template's doctorCheck (boots a tiny guest; default true when the device is usable). */
  cpuidCheck?: boolean;
}

async function optionalImport(name: string): Promise<Record<string, unknown> | { error: string }> {
  try {
    return (await import(name)) as Record<string, unknown>;
  } catch (e) {
    return { error: `${name} not usable: ${(e as Error)?.message ?? e}` };
  }
}

const MODULES = ['kvm', 'kvm_intel', 'kvm_amd', 'kvm_pvm'] as const;

async function hostPvmReport(imp: () => Promise<Record<string, unknown>>, sysModule: string): Promise<{ report?: unknown; error?: string }> {
  try {
    const mod = await imp();
    const f = mod.doctorReport;
    if (typeof f !== 'function') return { error: '@kvmkit/plugin-host-pvm has no doctorReport() export' };
    return { report: await (f as (o: { sysModule: string }) => unknown)({ sysModule }) };
  } catch (e) {
    return { error: `@kvmkit/plugin-host-pvm not usable: ${(e as Error)?.message ?? e}` };
  }
}

/** Reads what a host-pvm report says about detection, whatever its exact shape. */
function reportSaysPvm(r: unknown): boolean | undefined {
  if (typeof r !== 'object' || r === null) return undefined;
  const o = r as Record<string, unknown>;
  for (const k of ['pvm', 'detected', 'isPvm', 'nestedPvm', 'nested']) if (typeof o[k] === 'boolean') return o[k] as boolean;
  return undefined;
}

export async function runDoctor(opts: DoctorOptions = {}): Promise<DoctorReport> {
  const devicePath = opts.devicePath ?? process.env.KVMKIT_KVM_DEVICE ?? '/dev/kvm';
  const sysModule = opts.sysModule ?? '/sys/module';
  const checks: Check[] = [];
  const suggestions: string[] = [];

  // /dev/kvm
  const device = { path: devicePath, exists: false, accessible: false, detail: '' };
  let existsDetail = '';
  let isChar = false;
  try {
    const st = statSync(devicePath);
    device.exists = true;
    isChar = st.isCharacterDevice();
    existsDetail = st.isCharacterDevice() ? `character device ${st.rdev >> 8}:${st.rdev & 0xff}, mode ${(st.mode & 0o777).toString(8)}` : 'exists but is not a character device';
    try {
      accessSync(devicePath, constants.R_OK | constants.W_OK);
      device.accessible = true;
      device.detail = `${existsDetail}; read-write access ok`;
    } catch {
      device.detail = `no read-write access (mode ${(st.mode & 0o777).toString(8)}, uid ${st.uid}, gid ${st.gid}): run as root or join the kvm group`;
    }
  } catch {
    device.detail = 'missing: load kvm_intel/kvm_amd (or kvm_pvm), or enable virtualization in the firmware / the outer hypervisor';
    existsDetail = device.detail;
  }
  checks.push({ name: `${devicePath} exists`, ok: device.exists && isChar, required: true, detail: existsDetail });
  if (device.exists) checks.push({ name: `${devicePath} read-write`, ok: device.accessible, required: true, detail: device.accessible ? 'ok' : device.detail });

  // API version and capabilities
  let apiVersion: number | null = null;
  const required: Record<string, number> = {};
  const optional: Record<string, number> = {};
  const limits: Record<string, number> = {};
  let missingRequired: string[] = [];
  if (device.exists && device.accessible) {
    let kvm: Kvm | undefined;
    try {
      kvm = Kvm.open(devicePath);
      apiVersion = 12;
      checks.push({ name: 'KVM API version 12', ok: true, required: true, detail: 'KVM_GET_API_VERSION = 12' });
    } catch (e) {
      const v = isKvmkitError(e, 'KVMKIT_ERR_KVM_API_VERSION') ? (e.details.version as number) : null;
      apiVersion = v;
      checks.push({ name: 'KVM API version 12', ok: false, required: true, detail: (e as Error).message });
    }
    if (kvm) {
      try {
        for (const c of REQUIRED_CAPS) required[c] = kvm.checkExtension(KVM_CAP[c]);
        for (const c of OPTIONAL_CAPS) optional[c] = kvm.checkExtension(KVM_CAP[c]);
        missingRequired = REQUIRED_CAPS.filter((c) => (required[c] ?? 0) <= 0);
        checks.push({
          name: 'required capabilities',
          ok: missingRequired.length === 0,
          required: true,
          detail: missingRequired.length ? `missing ${missingRequired.map((c) => `KVM_CAP_${c}`).join(', ')}` : REQUIRED_CAPS.map((c) => `KVM_CAP_${c}`).join(', '),
        });
        const missingOpt = OPTIONAL_CAPS.filter((c) => (optional[c] ?? 0) <= 0);
        checks.push({
          name: 'optional capabilities',
          ok: missingOpt.length === 0,
          required: false,
          detail: missingOpt.length ? `absent: ${missingOpt.map((c) => `KVM_CAP_${c}`).join(', ')}` : 'all present',
        });
        limits.nrVcpus = kvm.checkExtension(KVM_CAP.NR_VCPUS);
        limits.maxVcpus = kvm.checkExtension(KVM_CAP.MAX_VCPUS);
        limits.nrMemslots = kvm.checkExtension(KVM_CAP.NR_MEMSLOTS);
        limits.vcpuMmapSize = kvm.vcpuMmapSize();
        try {
          limits.supportedCpuidEntries = kvm.supportedCpuid().length;
        } catch {
          /* reported as absent */
        }
      } finally {
        kvm.close();
      }
    }
  }

  // What kind of host
  const modules: Record<string, boolean> = {};
  for (const m of MODULES) modules[m] = existsSync(`${sysModule}/${m}`);
  let underHypervisor = false;
  try {
    underHypervisor = /^flags\s*:.*\bhypervisor\b/m.test(readFileSync('/proc/cpuinfo', 'utf8'));
  } catch {
    /* not Linux /proc */
  }
  const imp = opts.importHostPvm ?? (() => import('@kvmkit/plugin-host-pvm' as string) as Promise<Record<string, unknown>>);
  const hp = await hostPvmReport(imp, sysModule);
  const fromPlugin = reportSaysPvm(hp.report);
  const nestedPvm = {
    detected: fromPlugin ?? modules.kvm_pvm!,
    source: fromPlugin !== undefined ? '@kvmkit/plugin-host-pvm doctorReport()' : `${sysModule}/kvm_pvm${hp.error ? ` (${hp.error})` : ''}`,
    ...(hp.report !== undefined ? { report: hp.report } : {}),
  };
  checks.push({
    name: 'host kind',
    ok: true,
    required: false,
    detail: nestedPvm.detected
      ? 'nested PVM host (kvm_pvm): guest ring 0 is emulated, ring 3 native; use the host-pvm plugin profile'
      : modules.kvm_intel ? 'KVM on Intel VT-x' : modules.kvm_amd ? 'KVM on AMD SVM' : 'KVM (vendor module not seen in /sys/module)',
  });

  // Nested virtualization and CPUID control, from the plugins that depend on them.
  let nested: DoctorReport['nested'];
  let cpuid: DoctorReport['cpuid'];
  const usableSoFar = checks.filter((c) => c.required).every((c) => c.ok);
  if (usableSoFar) {
    const nv = await optionalImport('@kvmkit/plugin-nested-virt');
    try {
      if ('error' in nv) throw new Error(String(nv.error));
      const rep = (nv.nestedReport as (o: { sysModule?: string; kvmPath?: string }) => { supported: boolean; nestedStateSize: number; module: string | null; moduleNested: boolean | null; cpuidFeature: boolean })({ sysModule, kvmPath: devicePath });
      const detail = `${rep.supported ? 'guests can run KVM themselves' : 'not available'} (module ${rep.module ?? 'none'}, nested=${rep.moduleNested ?? 'n/a'}, VMX/SVM in supported CPUID: ${rep.cpuidFeature ? 'yes' : 'no'}); nested state ${rep.nestedStateSize > 0 ? `can be saved (${rep.nestedStateSize} bytes)` : 'cannot be saved (KVM_CAP_NESTED_STATE = 0)'}`;
      nested = { supported: rep.supported, stateSize: rep.nestedStateSize, detail };
      checks.push({ name: 'nested virtualization', ok: rep.supported, required: false, detail });
    } catch (e) {
      nested = { error: (e as Error).message };
    }
    if (opts.cpuidCheck !== false) {
      const ct = await optionalImport('@kvmkit/plugin-cpu-template');
      try {
        if ('error' in ct) throw new Error(String(ct.error));
        const rep = await (ct.doctorCheck as (o: { kvmPath?: string }) => Promise<{ honoured: boolean; message: string }>)({ kvmPath: devicePath });
        cpuid = { honoured: rep.honoured, detail: rep.message };
        checks.push({ name: 'guest CPUID follows KVM_SET_CPUID2', ok: rep.honoured, required: false, detail: rep.message });
      } catch (e) {
        cpuid = { error: (e as Error).message };
      }
    }
  }

  // The config in the current directory: which host section would be used here?
  const config: DoctorReport['config'] = { file: null, host: null, reason: null, hasHostPvm: null };
  try {
    const loaded = await loadConfig({ cwd: opts.cwd ?? process.cwd() });
    config.file = loaded.file;
    const vms = Object.keys(loaded.config.vms);
    const r = resolveVm(loaded, { vm: vms[0] });
    config.host = r.host ?? null;
    config.reason = r.sources.host.reason;
    config.hasHostPvm = r.plugins.some((p) => p.key === pluginKey('host-pvm', loaded.dir));
  } catch (e) {
    if (!isKvmkitError(e, 'KVMKIT_ERR_CONFIG_NOT_FOUND')) config.error = `${(e as { code?: string }).code ?? 'error'}: ${(e as Error).message}`;
  }
  if (nestedPvm.detected) {
    if (config.file === null) {
      suggestions.push("this is a nested PVM host: add to kvmkit.config.mjs: hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } }");
    } else if (!config.hasHostPvm) {
      suggestions.push(`this is a nested PVM host but ${config.file} gives VMs here no host-pvm plugin (host section: ${config.host ?? 'none'}); add: hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } }`);
    }
  }
  if (!device.exists) suggestions.push('enable KVM: modprobe kvm_intel (or kvm_amd); inside a VM, enable nested virtualization in the outer hypervisor');
  else if (!device.accessible) suggestions.push(`grant access: sudo usermod -aG kvm $USER (then log in again), or run as root`);

  const usable = checks.filter((c) => c.required).every((c) => c.ok);
  return {
    usable,
    hostname: os.hostname(),
    kernel: `${os.type()} ${os.release()} ${os.arch()}`,
    device,
    apiVersion,
    capabilities: { required, optional, missingRequired },
    limits,
    modules,
    underHypervisor,
    nestedPvm,
    ...(nested ? { nested } : {}),
    ...(cpuid ? { cpuid } : {}),
    config,
    checks,
    suggestions,
  };
}

export function formatDoctor(r: DoctorReport): string {
  const lines: string[] = [];
  lines.push(`kvmkit doctor — ${r.hostname} (${r.kernel})`);
  for (const c of r.checks) lines.push(`  ${c.ok ? 'ok  ' : c.required ? 'FAIL' : 'warn'}  ${c.name}: ${c.detail}`);
  if (Object.keys(r.limits).length) {
    lines.push(`  info  limits: ${Object.entries(r.limits).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  }
  const present = Object.entries(r.capabilities.optional).filter(([, v]) => v > 0).map(([k]) => k);
  if (present.length) lines.push(`  info  optional capabilities present: ${present.join(', ')}`);
  lines.push(`  info  modules loaded: ${Object.entries(r.modules).filter(([, v]) => v).map(([k]) => k).join(', ') || 'none of kvm, kvm_intel, kvm_amd, kvm_pvm'}${r.underHypervisor ? '; running under a hypervisor' : ''}`);
  lines.push(`  info  nested PVM: ${r.nestedPvm.detected ? 'yes' : 'no'} (from ${r.nestedPvm.source})`);
  const rep = r.nestedPvm.report as Record<string, unknown> | undefined;
  if (rep && typeof rep === 'object') {
    // @kvmkit/plugin-host-pvm's report: { pvm, evidence: string[], suggestion, cmdline }; other shapes tolerated.
    for (const k of ['evidence', 'lines'] as const) if (Array.isArray(rep[k])) for (const l of rep[k] as unknown[]) lines.push(`        - ${String(l)}`);
    for (const k of ['summary', 'message'] as const) if (typeof rep[k] === 'string') lines.push(`        ${rep[k] as string}`);
    if (typeof rep.cmdline === 'string' && r.nestedPvm.detected) lines.push(`        host-pvm adds to the guest cmdline: ${rep.cmdline}`);
  }
  if (r.config.file) lines.push(`  info  config ${r.config.file}: host section ${r.config.host ?? '(none)'} — ${r.config.reason}`);
  else if (r.config.error) lines.push(`  warn  config: ${r.config.error}`);
  else lines.push('  info  no kvmkit config in this directory tree');
  for (const s of r.suggestions) lines.push(`  hint  ${s}`);
  lines.push(r.usable ? 'kvmkit can run VMs on this host.' : 'kvmkit cannot run VMs on this host (see FAIL above).');
  return `${lines.join('\n')}\n`;
}
