import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { KvmkitError, checkOptions, type Plugin, type MachineApi, type Logger, type GuestMemory, type VcpuExit } from '@kvmkit/kernel';

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
  /**
   * Guest ring-0 instructions the host's emulator cannot do that kvmkit completes itself when KVM reports an
   * emulation failure on them (default ['fwait']; [] turns it off). See `EMULATED`.
   */
  emulate?: string[];
}

/**
 * Instructions completed by the VMM after a KVM emulation failure in guest ring 0 (suberror 1), by opcode bytes.
 * `fwait` (9b): waits for pending unmasked x87 exceptions. Linux runs it in fpu__drop() only to flush delayed
 * exceptions from user space and ignores them (exception-table fixup), so completing it as a no-op is what the
 * guest asks for. Seen here: a 2-vCPU boot stopped with KVM_EXIT_INTERNAL_ERROR on it at `Run /init`.
 */
export const EMULATED: Readonly<Record<string, { bytes: readonly number[] }>> = Object.freeze({
  fwait: { bytes: [0x9b] },
});

/**
 * Guest-virtual → guest-physical through the guest's 4-level page tables (CR3), honouring 1 GiB / 2 MiB pages.
 * Every table read is bounds-checked by GuestMemory; any non-present entry or read error gives undefined.
 */
export function translate(mem: GuestMemory, cr3: bigint, va: bigint): bigint | undefined {
  const ADDR = 0x000f_ffff_ffff_f000n;
  try {
    let table = cr3 & ADDR;
    for (let level = 3; level >= 0; level--) {
      const idx = (va >> BigInt(12 + 9 * level)) & 0x1ffn;
      const e = mem.readU64(table + idx * 8n);
      if ((e & 1n) === 0n) return undefined;
      if (level === 0) return (e & ADDR) | (va & 0xfffn);
      if ((level === 1 || level === 2) && (e & 0x80n) !== 0n) {
        const size = 1n << BigInt(12 + 9 * level);
        return (e & ADDR & ~(size - 1n)) | (va & (size - 1n));
      }
      table = e & ADDR;
    }
  } catch {
    return undefined;
  }
  return undefined;
}

/**
 * The bytes of the instruction KVM failed to emulate: from the exit itself when KVM supplies them
 * (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: data[0] flags, data[1] byte 0 = size, then the bytes),
 * else read at RIP through the guest page tables. Undefined when neither works.
 */
export function failedInstruction(exit: Extract<VcpuExit, { kind: 'internal-error' }>, mem: GuestMemory | undefined, rip: bigint, cr3: bigint): Uint8Array | undefined {
  if (exit.data.length >= 3 && (exit.data[0]! & 1n) !== 0n) {
    const raw = new Uint8Array(16);
    const dv = new DataView(raw.buffer);
    dv.setBigUint64(0, exit.data[1]!, true);
    dv.setBigUint64(8, exit.data[2]!, true);
    const n = raw[0]!;
    if (n >= 1 && n <= 15) return raw.slice(1, 1 + n);
  }
  if (!mem) return undefined;
  const pa = translate(mem, cr3, rip);
  if (pa === undefined) return undefined;
  try {
    return mem.read(pa, 1).slice();
  } catch {
    return undefined;
  }
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
    emulate: { type: 'array' },
  }) as HostPvmOptions;
  if (x.emulate && !x.emulate.every((e) => typeof e === 'string' && Object.hasOwn(EMULATED, e))) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `host-pvm: option emulate may list ${Object.keys(EMULATED).join(', ')}`, { details: { key: 'emulate' } });
  }
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
      const emulate = (o.emulate ?? ['fwait']).map((n) => ({ name: n, bytes: EMULATED[n]!.bytes }));
      if (emulate.length > 0) {
        const counts = new Map<string, number>();
        machine.hooks.unhandledExit.tap(NAME, (exit, index) => {
          if (exit.kind !== 'internal-error' || exit.suberror !== 1) return undefined;
          const vcpu = machine.vcpus[index];
          if (!vcpu) return undefined;
          const regs = vcpu.getRegs();
          const sregs = vcpu.getSregs();
          if (sregs.cs.dpl !== 0) return undefined;
          const insn = failedInstruction(exit, machine.memory, regs.rip, sregs.cr3);
          const hit = insn && emulate.find((e) => e.bytes.length <= insn.length && e.bytes.every((b, i) => insn[i] === b));
          if (!hit) return undefined;
          vcpu.setRegs({ ...regs, rip: regs.rip + BigInt(hit.bytes.length) });
          const n = (counts.get(hit.name) ?? 0) + 1;
          counts.set(hit.name, n);
          if (n === 1 || (n & (n - 1)) === 0) {
            log.info({ vcpu: index, rip: `0x${regs.rip.toString(16)}`, instruction: hit.name, count: n }, 'host emulator failed on a guest ring-0 instruction; kvmkit completed it');
          }
          return 'continue';
        });
      }
    },
  };
}

export { hostPvm };
