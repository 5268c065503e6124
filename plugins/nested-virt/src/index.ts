import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Kvm, KvmkitError, KVM_CAP, checkOptions, type Plugin, type MachineApi, type CpuidEntry } from '@kvmkit/kernel';

const NAME = 'nested-virt';
/** State section name and version written by saveState. */
export const NESTED_SECTION = 'nested-virt';
export const NESTED_SECTION_VERSION = 1;

export const NESTED_ERRORS = {
  /** The host cannot run nested guests (no kvm_intel/kvm_amd `nested`, no VMX/SVM in KVM's CPUID, or no KVM_CAP_NESTED_STATE). */
  UNSUPPORTED: 'KVMKIT_ERR_NESTED_UNSUPPORTED',
} as const;

export interface NestedVirtOptions {
  /** What to do on a host without nested support: 'error' (default) or 'warn' (the plugin then does nothing). */
  onUnsupported?: 'error' | 'warn';
  /** Carry KVM_GET/SET_NESTED_STATE in saved state (default true). */
  state?: boolean;
  /** /sys/module root (tests). */
  sysModule?: string;
}

/** What the host offers, for `kvmkit doctor` and for the plugin's decision. */
export interface NestedReport {
  vendor: 'intel' | 'amd' | 'unknown';
  /** Which KVM vendor module is loaded ('kvm_intel', 'kvm_amd', 'kvm_pvm', …), null if none found. */
  module: string | null;
  /** The module's `nested` parameter (null when the module or parameter is absent). */
  moduleNested: boolean | null;
  /** VMX (Intel) / SVM (AMD) bit present in KVM_GET_SUPPORTED_CPUID. */
  cpuidFeature: boolean;
  /** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE): max nested state size, 0 = cannot save/restore nested state. */
  nestedStateSize: number;
  /** A nested guest can run: the module allows it and KVM exposes VMX/SVM. */
  supported: boolean;
  /** Nested state can be carried in snapshots and migration. */
  stateSupported: boolean;
  /** One line a human can act on. */
  reason: string;
}

function readParam(p: string): boolean | null {
  try {
    const v = readFileSync(p, 'utf8').trim();
    return v === 'Y' || v === 'y' || v === '1';
  } catch {
    return null;
  }
}

function vendorOf(cpuid: readonly CpuidEntry[]): 'intel' | 'amd' | 'unknown' {
  const l0 = cpuid.find((e) => e.function === 0);
  if (!l0) return 'unknown';
  const b = Buffer.alloc(12);
  b.writeUInt32LE(l0.ebx >>> 0, 0);
  b.writeUInt32LE(l0.edx >>> 0, 4);
  b.writeUInt32LE(l0.ecx >>> 0, 8);
  const v = b.toString('latin1');
  return v === 'GenuineIntel' ? 'intel' : v === 'AuthenticAMD' || v === 'HygonGenuine' ? 'amd' : 'unknown';
}

/** VMX = CPUID.1:ECX[5]; SVM = CPUID.80000001h:ECX[2]. */
export function hasVirtFeature(cpuid: readonly CpuidEntry[], vendor: 'intel' | 'amd' | 'unknown'): boolean {
  if (vendor === 'intel') return (((cpuid.find((e) => e.function === 1)?.ecx ?? 0) >>> 5) & 1) === 1;
  if (vendor === 'amd') return (((cpuid.find((e) => e.function === 0x80000001)?.ecx ?? 0) >>> 2) & 1) === 1;
  return false;
}

/** Pure decision from the facts (tests feed it fake facts). */
export function decideNested(facts: { vendor: NestedReport['vendor']; module: string | null; moduleNested: boolean | null; cpuidFeature: boolean; nestedStateSize: number }): NestedReport {
  const feature = facts.vendor === 'intel' ? 'VMX' : facts.vendor === 'amd' ? 'SVM' : 'VMX/SVM';
  const supported = facts.moduleNested === true && facts.cpuidFeature;
  const stateSupported = supported && facts.nestedStateSize > 0;
  let reason: string;
  if (facts.module === null) reason = 'no KVM vendor module found under /sys/module (kvm_intel / kvm_amd)';
  else if (facts.module !== 'kvm_intel' && facts.module !== 'kvm_amd') reason = `KVM is provided by ${facts.module}, which has no nested virtualization (a nested PVM host cannot run a hypervisor inside its guests)`;
  else if (facts.moduleNested !== true) reason = `${facts.module} is loaded with nested=${facts.moduleNested === null ? '(absent)' : 'N'}: reload it with \`modprobe -r ${facts.module} && modprobe ${facts.module} nested=1\``;
  else if (!facts.cpuidFeature) reason = `${facts.module} allows nesting but KVM_GET_SUPPORTED_CPUID has no ${feature}`;
  else if (!stateSupported) reason = `nested guests can run (${feature}), but KVM_CAP_NESTED_STATE is 0: nested state cannot be carried in snapshots or migration`;
  else reason = `nested virtualization available (${feature}); nested state up to ${facts.nestedStateSize} bytes per vCPU`;
  return { ...facts, supported, stateSupported, reason };
}

/**
 * Reports the host's nested-virtualization capability: the vendor module's `nested` parameter
 * (/sys/module/kvm_intel|kvm_amd/parameters/nested), VMX/SVM in KVM's supported CPUID, and KVM_CAP_NESTED_STATE.
 * For `kvmkit doctor`.
 */
export function nestedReport(opts: { sysModule?: string; kvmPath?: string } = {}): NestedReport {
  const sys = opts.sysModule ?? '/sys/module';
  const kvm = Kvm.open(opts.kvmPath);
  try {
    const cpuid = kvm.supportedCpuid();
    const vendor = vendorOf(cpuid);
    const candidates = ['kvm_intel', 'kvm_amd', 'kvm_pvm'];
    const module = candidates.find((m) => existsSync(join(sys, m))) ?? null;
    const moduleNested = module === 'kvm_intel' || module === 'kvm_amd' ? readParam(join(sys, module, 'parameters/nested')) : null;
    return decideNested({ vendor, module, moduleNested, cpuidFeature: hasVirtFeature(cpuid, vendor), nestedStateSize: kvm.checkExtension(KVM_CAP.NESTED_STATE) });
  } finally {
    kvm.close();
  }
}

/** What `machine.use('nested-virt')` returns. */
export interface NestedVirtApi {
  report(): NestedReport | undefined;
  /** True when VMX/SVM is exposed to the guest. */
  active(): boolean;
  warnings(): Array<{ code: string; message: string }>;
}

/**
 * Exposes VMX (Intel) / SVM (AMD) in every vCPU's CPUID when the host allows nesting, and carries
 * KVM_GET/SET_NESTED_STATE in the `nested-virt` state section when KVM_CAP_NESTED_STATE > 0. Elsewhere:
 * KVMKIT_ERR_NESTED_UNSUPPORTED, or a warning with `onUnsupported: 'warn'`.
 */
export default function nestedVirt(options: NestedVirtOptions = {}): Plugin {
  return {
    name: NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    validateOptions(o) {
      checkOptions(NAME, o, { onUnsupported: { type: ['error', 'warn'] }, state: { type: 'boolean' }, sysModule: { type: 'string' } });
    },
    apply(machine: MachineApi, { log }) {
      let report: NestedReport | undefined;
      let active = false;
      const warnings: Array<{ code: string; message: string }> = [];
      machine.provide(NAME, { report: () => report, active: () => active, warnings: () => warnings.map((w) => ({ ...w })) } satisfies NestedVirtApi);

      machine.hooks.validate.tap(NAME, () => {
        report = nestedReport({ ...(options.sysModule ? { sysModule: options.sysModule } : {}) });
        if (!report.supported) {
          const message = `${NAME}: this host cannot give guests nested virtualization: ${report.reason}`;
          const details = { ...report };
          if ((options.onUnsupported ?? 'error') === 'error') throw new KvmkitError(NESTED_ERRORS.UNSUPPORTED, message, { details });
          warnings.push({ code: NESTED_ERRORS.UNSUPPORTED, message });
          log.warn({ code: NESTED_ERRORS.UNSUPPORTED, ...details }, message);
          return;
        }
        active = true;
        if (!report.stateSupported && options.state !== false) {
          const message = `${NAME}: ${report.reason}`;
          warnings.push({ code: NESTED_ERRORS.UNSUPPORTED, message });
          log.warn({ code: NESTED_ERRORS.UNSUPPORTED }, message);
        }
        log.info({ vendor: report.vendor, stateSize: report.nestedStateSize }, 'nested virtualization exposed');
      });

      machine.hooks.cpuid.tap(NAME, (entries) => {
        if (!active || !report) return entries;
        return entries.map((e) => {
          if (report!.vendor === 'intel' && e.function === 1) return { ...e, ecx: (e.ecx | (1 << 5)) >>> 0 };
          if (report!.vendor === 'amd' && e.function === 0x80000001) return { ...e, ecx: (e.ecx | (1 << 2)) >>> 0 };
          return e;
        });
      });

      machine.hooks.saveState.tapPromise(NAME, async (w) => {
        if (!active || !report?.stateSupported || options.state === false) {
          w.write(NESTED_SECTION, NESTED_SECTION_VERSION, { carried: false, vcpus: [] });
          return;
        }
        w.write(NESTED_SECTION, NESTED_SECTION_VERSION, { carried: true, format: report.vendor, vcpus: machine.vcpus.map((v) => v.getNestedState(report!.nestedStateSize)) });
      });

      // Note: the kernel restores plugin sections before the vCPUs' sregs/MSRs. For SVM (EFER.SVME must be set
      // first) the nested state must follow the vCPU state; see README ("Restore order").
      machine.hooks.restoreState.tapPromise(NAME, async (r) => {
        if (!r.has(NESTED_SECTION)) return;
        const s = r.read<{ carried: boolean; format?: string; vcpus: Uint8Array[] }>(NESTED_SECTION, NESTED_SECTION_VERSION);
        if (!s.carried) return;
        if (!active || !report?.stateSupported) {
          throw new KvmkitError(NESTED_ERRORS.UNSUPPORTED, `${NAME}: the saved state carries nested state, but this host cannot restore it: ${report?.reason ?? 'plugin inactive'}`, { details: { ...(report ?? {}) } });
        }
        if (s.format !== report.vendor) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `${NAME}: nested state saved on a ${s.format} host cannot be restored on a ${report.vendor} host`);
        if (s.vcpus.length !== machine.vcpus.length) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `${NAME}: nested state for ${s.vcpus.length} vCPUs, machine has ${machine.vcpus.length}`);
        s.vcpus.forEach((st, i) => machine.vcpus[i]!.setNestedState(st));
      });
    },
  };
}
