import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { KvmkitError, checkOptions, type Plugin, type MachineApi, type Logger } from '@kvmkit/kernel';

const NAME = 'host-pvm';
const VERSION = '0.1.0';

/**
 * CPU features a Linux guest must not use on a nested PVM host, as recorded with QEMU on these machines
 * (/work/shared/guest/README.md): the host's instruction emulator (guest ring 0 runs emulated) lacks them, and
 * guest CPUID reports the host's values whatever KVM_SET_CPUID2 says, so the guest has to be told on its cmdline.
 */
export const DEFAULT_CLEARCPUID: readonly string[] = Object.freeze([
  'popcnt', 'cx16', 'smap', 'smep', 'xsave', 'avx', 'avx2', 'avx512f', 'bmi1', 'bmi2', 'movbe', 'erms', 'fsrm', 'fsgsbase',
  'rdrand', 'rdseed', 'pcid', 'invpcid', 'umip', 'rdpid', 'clflushopt', 'clwb', 'pku', 'la57',
]);

/**
 * Features Linux clears by itself once `noxsave` clears XSAVE (cpuid-deps: AVX needs XSAVE, AVX2 and AVX512F need
 * AVX). Listing them again only costs room in the guest's clearcpuid buffer.
 */
export const IMPLIED_BY_NOXSAVE: readonly string[] = Object.freeze(['xsave', 'avx', 'avx2', 'avx512f']);

/**
 * Linux (5.19+, incl. the 6.1 guest) copies the clearcpuid= value into a 128-byte buffer: anything past 127
 * characters is cut off and silently not cleared. The recorded list is 142 characters long.
 */
export const CLEARCPUID_MAX = 127;

export interface HostPvmOptions {
  /** Replaces the default clearcpuid list. */
  clearcpuid?: string[];
  /** Added to the list. */
  extraClearcpuid?: string[];
  /** Removed from the list (features this guest/host pair handles). */
  keepCpuid?: string[];
  /** Add `noxsave` (default true). */
  noxsave?: boolean;
  /** Add `tsc=reliable` (default true). */
  tscReliable?: boolean;
  /** More cmdline arguments for this host. */
  extraArgs?: string[];
  /** Fail (KVMKIT_ERR_HOST_PROFILE) when this host is not a PVM host; default: warn and apply anyway. */
  requirePvm?: boolean;
  /** Where sysfs modules live (default /sys/module; tests). */
  sysModule?: string;
  /** Where cpuinfo is (default /proc/cpuinfo; tests). */
  cpuinfo?: string;
}

/** What the profile adds to the cmdline and why. */
export interface CompatCmdline {
  args: string[];
  clearcpuid: string[];
  /** Entries left out because `noxsave` already implies them. */
  implied: string[];
  /** Entries that do not fit in the guest's 127-character clearcpuid buffer (the guest would ignore them). */
  truncated: string[];
}

const FEATURE_RE = /^[a-z0-9_]+$/;

/** True when the kvm_pvm module is loaded (a nested PVM host). */
export function detectPvm(sysModule = '/sys/module'): boolean {
  return existsSync(join(sysModule, 'kvm_pvm'));
}

/** Facts behind the verdict, as human-readable lines. */
export function pvmEvidence(sysModule = '/sys/module', cpuinfo = '/proc/cpuinfo'): string[] {
  const ev: string[] = [];
  const mod = join(sysModule, 'kvm_pvm');
  if (existsSync(mod)) {
    ev.push(`${mod} exists: the kvm_pvm module is loaded`);
    try {
      const pdir = join(mod, 'parameters');
      const params = readdirSync(pdir)
        .filter((p) => ['pvm_native', 'pvm_emul_batch', 'force'].includes(p))
        .map((p) => `${p}=${readFileSync(join(pdir, p), 'utf8').trim()}`);
      if (params.length > 0) ev.push(`kvm_pvm parameters: ${params.join(' ')}`);
    } catch {
      /* parameters unreadable: the module's presence is the evidence */
    }
  } else {
    ev.push(`${mod} does not exist: the kvm_pvm module is not loaded`);
  }
  for (const m of ['kvm_intel', 'kvm_amd']) if (existsSync(join(sysModule, m))) ev.push(`${m} is loaded (hardware virtualization)`);
  try {
    const flags = readFileSync(cpuinfo, 'utf8').match(/^flags\s*:(.*)$/m)?.[1]?.split(/\s+/) ?? [];
    if (flags.includes('hypervisor')) ev.push('cpuinfo has the "hypervisor" flag: this host is itself a virtual machine');
    if (!flags.includes('vmx') && !flags.includes('svm')) ev.push('cpuinfo has neither vmx nor svm: no hardware virtualization for nested KVM');
  } catch {
    /* no cpuinfo (not Linux) */
  }
  return ev;
}

/** The compatibility cmdline for a given set of options (pure; exported for tests and `kvmkit doctor`). */
export function compatCmdline(opts: HostPvmOptions = {}): CompatCmdline {
  const noxsave = opts.noxsave ?? true;
  const keep = new Set(opts.keepCpuid ?? []);
  const seen = new Set<string>();
  const list: string[] = [];
  const implied: string[] = [];
  for (const f of [...(opts.clearcpuid ?? DEFAULT_CLEARCPUID), ...(opts.extraClearcpuid ?? [])]) {
    if (keep.has(f) || seen.has(f)) continue;
    seen.add(f);
    if (noxsave && IMPLIED_BY_NOXSAVE.includes(f)) {
      implied.push(f);
      continue;
    }
    list.push(f);
  }
  const fitting: string[] = [];
  const truncated: string[] = [];
  let len = 0;
  for (const f of list) {
    const add = (fitting.length > 0 ? 1 : 0) + f.length;
    if (truncated.length === 0 && len + add <= CLEARCPUID_MAX) {
      fitting.push(f);
      len += add;
    } else truncated.push(f);
  }
  const args: string[] = [];
  if (noxsave) args.push('noxsave');
  if (opts.tscReliable ?? true) args.push('tsc=reliable');
  if (fitting.length > 0) args.push(`clearcpuid=${fitting.join(',')}`);
  args.push(...(opts.extraArgs ?? []));
  return { args, clearcpuid: fitting, implied, truncated };
}

/** For `kvmkit doctor`: is this a PVM host, why we think so, and what to do. */
export function doctorReport(opts: { sysModule?: string; cpuinfo?: string } = {}): { pvm: boolean; evidence: string[]; suggestion: string; cmdline: string } {
  const pvm = detectPvm(opts.sysModule);
  const evidence = pvmEvidence(opts.sysModule, opts.cpuinfo);
  const cmdline = compatCmdline().args.join(' ');
  const suggestion = pvm
    ? "nested PVM host: give VMs here the host-pvm profile, e.g. in kvmkit.config.mjs hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } }" +
      ` (adds: ${cmdline}). Expect guest ring 0 to run emulated (~85 s to a Linux init) and no user-mode system calls.`
    : 'not a PVM host: the host-pvm profile is not needed (and would needlessly hide CPU features from guests)';
  return { pvm, evidence, suggestion, cmdline };
}

function validate(o: unknown): HostPvmOptions {
  const x = checkOptions(NAME, o, {
    clearcpuid: { type: 'array' },
    extraClearcpuid: { type: 'array' },
    keepCpuid: { type: 'array' },
    noxsave: { type: 'boolean' },
    tscReliable: { type: 'boolean' },
    extraArgs: { type: 'array' },
    requirePvm: { type: 'boolean' },
    sysModule: { type: 'string' },
    cpuinfo: { type: 'string' },
  }) as HostPvmOptions;
  for (const k of ['clearcpuid', 'extraClearcpuid', 'keepCpuid'] as const) {
    const v = x[k];
    if (v && !v.every((f) => typeof f === 'string' && FEATURE_RE.test(f))) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `host-pvm: option ${k} must list cpuinfo feature names (lowercase letters, digits, _)`, { details: { key: k } });
    }
  }
  if (x.extraArgs && !x.extraArgs.every((a) => typeof a === 'string' && a.length > 0 && !/\s/.test(a))) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'host-pvm: option extraArgs must be non-empty strings without spaces', { details: { key: 'extraArgs' } });
  }
  return x;
}

function argKey(a: string): string {
  const i = a.indexOf('=');
  return i < 0 ? a : a.slice(0, i);
}

/**
 * Host profile for nested PVM hosts: adds `noxsave tsc=reliable clearcpuid=…` to the guest kernel cmdline.
 * Chosen per host in the config file (match the host with `kvmModule: 'kvm_pvm'`).
 */
export default function hostPvm(options: HostPvmOptions = {}): Plugin {
  return {
    name: NAME,
    version: VERSION,
    kernel: '^0.1.0',
    provides: ['host-profile'],
    options,
    validateOptions(o) {
      validate(o);
    },
    apply(machine: MachineApi, { log }: { log: Logger }) {
      const o = validate(options);
      const pvm = detectPvm(o.sysModule);
      const evidence = pvmEvidence(o.sysModule, o.cpuinfo);
      if (!pvm) {
        if (o.requirePvm) {
          throw new KvmkitError('KVMKIT_ERR_HOST_PROFILE', 'host-pvm: this host is not a nested PVM host (kvm_pvm is not loaded) and requirePvm is set', {
            details: { evidence },
          });
        }
        log.warn({ evidence }, 'host-pvm profile on a host that is not PVM: applying it anyway (guests lose CPU features they could use)');
      }
      const c = compatCmdline(o);
      if (c.truncated.length > 0) {
        log.warn({ truncated: c.truncated, max: CLEARCPUID_MAX }, 'clearcpuid list longer than the guest kernel reads; these features stay enabled');
      }
      machine.hooks.cmdline.tap(NAME, (parts) => {
        const user = (machine.config.cmdline ?? '').split(/\s+/).filter(Boolean);
        const present = new Set([...parts, ...user].map(argKey));
        const added = c.args.filter((a) => !present.has(argKey(a)));
        const skipped = c.args.filter((a) => present.has(argKey(a)));
        if (skipped.length > 0) {
          log.warn({ skipped }, 'cmdline already sets these; the profile leaves them to the config (Linux reads one clearcpuid=)');
        }
        log.info(
          { added, omittedAsImplied: c.implied, pvm, evidence },
          pvm
            ? 'nested PVM host: guest ring 0 is emulated by an instruction emulator that lacks these CPU features, and guest CPUID shows the host\'s, so the guest kernel is told not to use them'
            : 'host-pvm profile applied on a non-PVM host',
        );
        return [...parts, ...added];
      });
    },
  };
}

export { hostPvm };
