import type { CpuidEntry } from '@kvmkit/kernel';

/** KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry applies to one sub-leaf (ECX) only. */
export const SIGNIFICANT_INDEX = 1;

const bits = (...b: number[]): number => b.reduce((m, x) => (m | (1 << x)) >>> 0, 0);

/** Named feature bits, for messages and custom templates. [leaf, register, bit]. */
export const FEATURES: Record<string, [number, 'eax' | 'ebx' | 'ecx' | 'edx', number]> = {
  fpu: [1, 'edx', 0], vme: [1, 'edx', 1], de: [1, 'edx', 2], pse: [1, 'edx', 3], tsc: [1, 'edx', 4], msr: [1, 'edx', 5],
  pae: [1, 'edx', 6], mce: [1, 'edx', 7], cx8: [1, 'edx', 8], apic: [1, 'edx', 9], sep: [1, 'edx', 11], mtrr: [1, 'edx', 12],
  pge: [1, 'edx', 13], mca: [1, 'edx', 14], cmov: [1, 'edx', 15], pat: [1, 'edx', 16], pse36: [1, 'edx', 17],
  clflush: [1, 'edx', 19], mmx: [1, 'edx', 23], fxsr: [1, 'edx', 24], sse: [1, 'edx', 25], sse2: [1, 'edx', 26], ht: [1, 'edx', 28],
  sse3: [1, 'ecx', 0], pclmulqdq: [1, 'ecx', 1], ssse3: [1, 'ecx', 9], fma: [1, 'ecx', 12], cx16: [1, 'ecx', 13],
  sse4_1: [1, 'ecx', 19], sse4_2: [1, 'ecx', 20], x2apic: [1, 'ecx', 21], movbe: [1, 'ecx', 22], popcnt: [1, 'ecx', 23],
  tsc_deadline: [1, 'ecx', 24], aes: [1, 'ecx', 25], xsave: [1, 'ecx', 26], osxsave: [1, 'ecx', 27], avx: [1, 'ecx', 28],
  f16c: [1, 'ecx', 29], rdrand: [1, 'ecx', 30], hypervisor: [1, 'ecx', 31],
  vmx: [1, 'ecx', 5],
  fsgsbase: [7, 'ebx', 0], bmi1: [7, 'ebx', 3], avx2: [7, 'ebx', 5], smep: [7, 'ebx', 7], bmi2: [7, 'ebx', 8], erms: [7, 'ebx', 9],
  invpcid: [7, 'ebx', 10], avx512f: [7, 'ebx', 16], rdseed: [7, 'ebx', 18], adx: [7, 'ebx', 19], smap: [7, 'ebx', 20],
  syscall: [0x80000001, 'edx', 11], nx: [0x80000001, 'edx', 20], pdpe1gb: [0x80000001, 'edx', 26], rdtscp: [0x80000001, 'edx', 27], lm: [0x80000001, 'edx', 29],
  lahf_lm: [0x80000001, 'ecx', 0], svm: [0x80000001, 'ecx', 2], abm: [0x80000001, 'ecx', 5],
};

/** Feature masks per level (bits allowed through). */
interface Masks {
  l1edx: number;
  l1ecx: number;
  e1edx: number;
  e1ecx: number;
}

// Leaf 1 EDX: the legacy x86-64 set (x86-64-v1 as the psABI defines it, plus what every 64-bit OS expects).
const V1_L1EDX = bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26, 28);
// KVM-emulated, ISA-neutral bits every level keeps: x2APIC, TSC-deadline timer (LAPIC), hypervisor present.
const PLATFORM_L1ECX = bits(21, 24, 31);
const V2_L1ECX = bits(0, 9, 13, 19, 20, 23) | PLATFORM_L1ECX;
// 0x80000001 EDX: SYSCALL, NX, LM and, on AMD, the mirrors of leaf-1 EDX bits 0-17, 23, 24.
const MIRROR_E1EDX = bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 23, 24);

export const TEMPLATE_MASKS: Record<'minimal' | 'baseline-v2', Masks> = {
  /** A small baseline: x86-64 with SSE2, no SSE3+, no XSAVE/AVX, no leaf-7 features, no MCE/MTRR/VME. */
  minimal: {
    l1edx: bits(0, 2, 3, 4, 5, 6, 8, 9, 11, 13, 15, 16, 19, 23, 24, 25, 26, 28),
    l1ecx: bits(31),
    e1edx: bits(11, 20, 29) | (bits(0, 2, 3, 4, 5, 6, 8, 9, 13, 15, 16, 23, 24) & MIRROR_E1EDX),
    e1ecx: 0,
  },
  /** x86-64-v2 (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF) and nothing newer: migration-safe. */
  'baseline-v2': {
    l1edx: V1_L1EDX,
    l1ecx: V2_L1ECX,
    e1edx: bits(11, 20, 29) | (V1_L1EDX & MIRROR_E1EDX),
    e1ecx: bits(0),
  },
};

/** Features a level promises (what the guest may assume), by name. */
export const LEVEL_FEATURES: Record<'minimal' | 'baseline-v2', string[]> = {
  minimal: ['fpu', 'tsc', 'msr', 'pae', 'cx8', 'apic', 'sep', 'pge', 'cmov', 'pat', 'clflush', 'mmx', 'fxsr', 'sse', 'sse2', 'syscall', 'nx', 'lm'],
  'baseline-v2': ['fpu', 'tsc', 'msr', 'pae', 'cx8', 'apic', 'sep', 'pge', 'cmov', 'pat', 'clflush', 'mmx', 'fxsr', 'sse', 'sse2', 'syscall', 'nx', 'lm',
    'sse3', 'ssse3', 'cx16', 'sse4_1', 'sse4_2', 'popcnt', 'lahf_lm'],
};

/** Basic leaves a template keeps (others are dropped and leaf 0's max is lowered). */
const KEEP_BASIC = new Set([0, 1, 2, 4, 7, 0xb]);
/** Extended leaves a template keeps: brand string, cache info, address sizes/core count, AMD cache topology. */
const KEEP_EXT = new Set([0x80000000, 0x80000001, 0x80000002, 0x80000003, 0x80000004, 0x80000005, 0x80000006, 0x80000008, 0x8000001d, 0x8000001e]);

export type TemplateName = 'host' | 'minimal' | 'baseline-v2';
export const TEMPLATE_NAMES: readonly TemplateName[] = ['host', 'minimal', 'baseline-v2'];

/** A register change: a number replaces the value; `{ set, clear }` ORs then clears bits. */
export type RegSpec = number | { set?: number; clear?: number };

export interface LeafSpec {
  function: number;
  /** Sub-leaf; unset = every sub-leaf of `function` (or sub-leaf 0 when the leaf is created). */
  index?: number;
  /** Drop the leaf (all its sub-leaves when `index` is unset). */
  remove?: boolean;
  eax?: RegSpec;
  ebx?: RegSpec;
  ecx?: RegSpec;
  edx?: RegSpec;
}

/** A custom template: a named base plus leaf edits. */
export interface CustomTemplate {
  base?: TemplateName;
  leaves: LeafSpec[];
}

export function featureOf(e: CpuidEntry | undefined, name: string): boolean {
  const f = FEATURES[name];
  if (!f || !e) return false;
  return ((e[f[1]] >>> f[2]) & 1) === 1;
}

function find(entries: readonly CpuidEntry[], fn: number, index = 0): CpuidEntry | undefined {
  return entries.find((e) => e.function === fn && ((e.flags & SIGNIFICANT_INDEX) === 0 || e.index === index));
}

/** Features of a level the host (KVM) does not offer: the template cannot give them to the guest. */
export function missingFeatures(host: readonly CpuidEntry[], level: 'minimal' | 'baseline-v2'): string[] {
  return LEVEL_FEATURES[level].filter((n) => {
    const [leaf] = FEATURES[n]!;
    return !featureOf(find(host, leaf), n);
  });
}

/** Applies a named template to KVM's supported CPUID (no topology; see topology.ts). */
export function applyNamed(entries: readonly CpuidEntry[], name: TemplateName): CpuidEntry[] {
  const out = entries.map((e) => ({ ...e }));
  if (name === 'host') return out;
  const m = TEMPLATE_MASKS[name];
  const kept = out.filter((e) => {
    if (e.function < 0x40000000) return KEEP_BASIC.has(e.function) && !(e.function === 7 && e.index > 0);
    if (e.function < 0x80000000) return true; // hypervisor leaves (KVM signature/features)
    return KEEP_EXT.has(e.function);
  });
  for (const e of kept) {
    switch (e.function) {
      case 0: e.eax = Math.min(e.eax, Math.max(...[...KEEP_BASIC].filter((f) => kept.some((k) => k.function === f)))); break;
      case 1:
        e.edx = (e.edx & m.l1edx) >>> 0;
        e.ecx = (e.ecx & m.l1ecx) >>> 0;
        break;
      case 7: e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0; break;
      case 0x80000000: e.eax = Math.min(e.eax, Math.max(...[...KEEP_EXT].filter((f) => kept.some((k) => k.function === f)))); break;
      case 0x80000001:
        e.edx = (e.edx & m.e1edx) >>> 0;
        e.ecx = (e.ecx & m.e1ecx) >>> 0;
        break;
      case 0x80000008: e.ebx = 0; break; // AMD speculation-control and misc feature bits
      default: break;
    }
  }
  return kept;
}

function applyReg(v: number, s: RegSpec | undefined): number {
  if (s === undefined) return v;
  if (typeof s === 'number') return s >>> 0;
  return ((v | (s.set ?? 0)) & ~(s.clear ?? 0)) >>> 0;
}

/** Applies a custom template's leaf edits (after its base). Leaves that do not exist are created. */
export function applyCustom(entries: readonly CpuidEntry[], t: CustomTemplate): CpuidEntry[] {
  let out = applyNamed(entries, t.base ?? 'host');
  for (const l of t.leaves) {
    const match = (e: CpuidEntry) => e.function === l.function && (l.index === undefined || e.index === l.index);
    if (l.remove) {
      out = out.filter((e) => !match(e));
      continue;
    }
    let targets = out.filter(match);
    if (targets.length === 0) {
      const e: CpuidEntry = { function: l.function, index: l.index ?? 0, flags: l.index !== undefined ? SIGNIFICANT_INDEX : 0, eax: 0, ebx: 0, ecx: 0, edx: 0 };
      out.push(e);
      targets = [e];
    }
    for (const e of targets) {
      e.eax = applyReg(e.eax, l.eax);
      e.ebx = applyReg(e.ebx, l.ebx);
      e.ecx = applyReg(e.ecx, l.ecx);
      e.edx = applyReg(e.edx, l.edx);
    }
  }
  return out;
}
