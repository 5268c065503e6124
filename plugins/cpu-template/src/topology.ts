import type { CpuidEntry } from '@kvmkit/kernel';
import { SIGNIFICANT_INDEX } from './templates.js';

export interface Topology {
  sockets: number;
  cores: number;
  threads: number;
}

/** Bits of the APIC id used by each level (x2APIC/xAPIC id = socket | core | thread fields). */
export function topologyBits(t: Topology): { threadBits: number; coreBits: number } {
  const width = (n: number) => (n <= 1 ? 0 : Math.ceil(Math.log2(n)));
  return { threadBits: width(t.threads), coreBits: width(t.cores) };
}

/** APIC id of vCPU `i`: threads fastest, then cores, then sockets (the order Linux and QEMU number CPUs in). */
export function apicIdOf(t: Topology, i: number): number {
  const { threadBits, coreBits } = topologyBits(t);
  const thread = i % t.threads;
  const core = Math.floor(i / t.threads) % t.cores;
  const socket = Math.floor(i / (t.threads * t.cores));
  return (socket << (coreBits + threadBits)) | (core << threadBits) | thread;
}

/** Where vCPU `i` sits. */
export function placeOf(t: Topology, i: number): { socket: number; core: number; thread: number } {
  return { thread: i % t.threads, core: Math.floor(i / t.threads) % t.cores, socket: Math.floor(i / (t.threads * t.cores)) };
}

/**
 * True when the APIC ids are 0..n-1 in vCPU order. The kernel creates vCPU i with KVM vCPU id i, which KVM
 * uses as its initial APIC id, and boot-linux's MP table lists APIC id i: a topology with gaps in its ids
 * (non-power-of-two threads, or non-power-of-two cores with several sockets) needs the kernel to create vCPUs
 * with the topology's ids.
 */
export function denseApicIds(t: Topology): boolean {
  const n = t.sockets * t.cores * t.threads;
  for (let i = 0; i < n; i++) if (apicIdOf(t, i) !== i) return false;
  return true;
}

/**
 * Writes the topology into vCPU `i`'s CPUID: leaf 1 (initial APIC id, logical processor count, HTT), leaf 4
 * (cores per package, logical processors sharing each cache; synthesised from AMD's 0x8000001D when leaf 4 has
 * no cache descriptors), leaf 0xB (x2APIC topology: SMT and core levels; mirrored into 0x1F when present) and,
 * on AMD, 0x80000008 ECX (core count, APIC id size) and 0x8000001E (extended APIC id, core id, threads per core).
 */
export function applyTopology(entries: readonly CpuidEntry[], t: Topology, i: number): CpuidEntry[] {
  const { threadBits, coreBits } = topologyBits(t);
  const apicId = apicIdOf(t, i);
  const perPackage = t.cores * t.threads;
  const addressable = 1 << (coreBits + threadBits);
  const place = placeOf(t, i);
  let out = entries.map((e) => ({ ...e }));

  const l1 = out.find((e) => e.function === 1);
  if (l1) {
    l1.ebx = ((l1.ebx & 0x0000ffff) | ((Math.min(addressable, 255) & 0xff) << 16) | ((apicId & 0xff) << 24)) >>> 0;
    l1.edx = perPackage > 1 ? (l1.edx | (1 << 28)) >>> 0 : (l1.edx & ~(1 << 28)) >>> 0;
  }

  // Leaf 4: deterministic cache parameters. Keep valid descriptors, else take AMD's identical-format 0x8000001D.
  let l4 = out.filter((e) => e.function === 4 && (e.eax & 0x1f) !== 0);
  if (l4.length === 0) {
    const amd = out.filter((e) => e.function === 0x8000001d && (e.eax & 0x1f) !== 0);
    l4 = amd.length > 0
      ? amd.map((e) => ({ ...e, function: 4, flags: SIGNIFICANT_INDEX }))
      // no cache information at all: one 32 KiB 8-way L1 data cache, self-initialising
      : [{ function: 4, index: 0, flags: SIGNIFICANT_INDEX, eax: 0x121, ebx: (7 << 22) | 63, ecx: 63, edx: 0 }];
  }
  l4 = l4.map((e, k) => {
    const level = (e.eax >>> 5) & 7;
    const sharing = level >= 3 ? addressable : 1 << threadBits; // L3 per package, L1/L2 per core
    const eax = ((e.eax & 0x3fff) | (((sharing - 1) & 0xfff) << 14) | ((((1 << coreBits) - 1) & 0x3f) << 26)) >>> 0;
    return { ...e, index: k, flags: SIGNIFICANT_INDEX, eax };
  });
  l4.push({ function: 4, index: l4.length, flags: SIGNIFICANT_INDEX, eax: 0, ebx: 0, ecx: 0, edx: 0 });
  out = out.filter((e) => e.function !== 4);

  // Leaf 0xB (and 0x1F): level 0 = SMT, level 1 = core, level 2 = invalid.
  const topo = (fn: number): CpuidEntry[] => [
    { function: fn, index: 0, flags: SIGNIFICANT_INDEX, eax: threadBits, ebx: t.threads, ecx: (1 << 8) | 0, edx: apicId },
    { function: fn, index: 1, flags: SIGNIFICANT_INDEX, eax: coreBits + threadBits, ebx: perPackage, ecx: (2 << 8) | 1, edx: apicId },
    { function: fn, index: 2, flags: SIGNIFICANT_INDEX, eax: 0, ebx: 0, ecx: 2, edx: apicId },
  ];
  const has1f = out.some((e) => e.function === 0x1f);
  out = out.filter((e) => e.function !== 0xb && e.function !== 0x1f);
  const extra: CpuidEntry[] = [...l4, ...topo(0xb), ...(has1f ? topo(0x1f) : [])];

  const e8 = out.find((e) => e.function === 0x80000008);
  if (e8) e8.ecx = ((e8.ecx & ~0xf0ff) | (((coreBits + threadBits) & 0xf) << 12) | ((perPackage - 1) & 0xff)) >>> 0;
  const e1e = out.find((e) => e.function === 0x8000001e);
  if (e1e) {
    e1e.eax = apicId >>> 0;
    e1e.ebx = (((t.threads - 1) & 0xff) << 8) | (((place.socket * t.cores + place.core) & 0xff));
    e1e.ecx = place.socket & 0xff; // node id = socket (one node per socket)
  }

  // Leaf 0 must announce at least 0xB for the guest to read it.
  const l0 = out.find((e) => e.function === 0);
  if (l0 && l0.eax < 0xb) l0.eax = 0xb;
  out.push(...extra);
  return out.sort((a, b) => a.function - b.function || a.index - b.index);
}
