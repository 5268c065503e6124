import type { GuestMemory, LayoutRange, MemoryLayout, Segment } from '@kvmkit/kernel';

/** Fixed low-memory addresses of the boot structures (all below the EBDA at 0x9fc00). */
export const ADDR = {
  /** BIOS data area fields Linux reads: EBDA segment (0x40e) and base memory in KiB (0x413). */
  bdaEbdaSegment: 0x40e,
  bdaBaseMemKiB: 0x413,
  gdt: 0x500,
  idt: 0x540,
  /** PVH: hvm_start_info, its module list and memory map. */
  startInfo: 0x6000,
  modlist: 0x6040,
  memmap: 0x6080,
  memmapEnd: 0x7000,
  /** bzImage: boot_params ("zero page"). */
  zeroPage: 0x7000,
  /** Initial stack top (64-bit path; grows down into 0x8000-0x8fff). */
  stack: 0x8ff0,
  /** Identity page tables: PML4, PDPT, 4 page directories (2 MiB pages). */
  pml4: 0x9000,
  pdpt: 0xa000,
  pd: 0xb000,
  /** Kernel command line. */
  cmdline: 0x20000,
  cmdlineMax: 0x10000,
  /** Start of the EBDA / end of usable base memory. */
  ebda: 0x9fc00,
  /** MP floating pointer and config table (BIOS area, reserved in e820). */
  mptable: 0xf0000,
  mptableEnd: 0x100000,
  /** Lowest address for the kernel and the initrd. */
  highMem: 0x100000,
} as const;

/** Number of 1 GiB ranges identity-mapped with 2 MiB pages (4 GiB: RAM below the hole + the hole itself). */
export const IDENTITY_GIB = 4;

export const E820_RAM = 1;
export const E820_RESERVED = 2;

export interface E820Entry {
  addr: bigint;
  size: bigint;
  type: number;
}

/**
 * The memory map both loaders hand to Linux: RAM from the layout as usable, except [0x9fc00, 0x100000)
 * (EBDA, VGA, BIOS: the MP table lives there) which is reserved; layout reserved windows as reserved.
 * Sorted by address, adjacent entries of the same type merged.
 */
export function buildE820(layout: Readonly<MemoryLayout>): E820Entry[] {
  const out: E820Entry[] = [];
  const lowHoleStart = BigInt(ADDR.ebda);
  const lowHoleEnd = BigInt(ADDR.highMem);
  const add = (addr: bigint, end: bigint, type: number) => {
    if (end > addr) out.push({ addr, size: end - addr, type });
  };
  for (const r of layout.ram) {
    const s = r.gpa;
    const e = r.gpa + BigInt(r.size);
    if (e <= lowHoleStart || s >= lowHoleEnd) {
      add(s, e, E820_RAM);
      continue;
    }
    add(s, lowHoleStart > s ? lowHoleStart : s, E820_RAM);
    add(s > lowHoleStart ? s : lowHoleStart, e < lowHoleEnd ? e : lowHoleEnd, E820_RESERVED);
    add(lowHoleEnd, e, E820_RAM);
  }
  for (const r of layout.reserved as LayoutRange[]) add(r.gpa, r.gpa + BigInt(r.size), E820_RESERVED);
  out.sort((a, b) => (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : 0));
  const merged: E820Entry[] = [];
  for (const x of out) {
    const last = merged[merged.length - 1];
    if (last && last.type === x.type && last.addr + last.size === x.addr) last.size += x.size;
    else merged.push({ ...x });
  }
  return merged;
}

/** The end of the RAM range that starts at or below 1 MiB (where kernel, initrd and tables must go). */
export function lowRamTop(layout: Readonly<MemoryLayout>): bigint {
  for (const r of layout.ram) {
    if (r.gpa <= BigInt(ADDR.highMem) && r.gpa + BigInt(r.size) > BigInt(ADDR.highMem)) return r.gpa + BigInt(r.size);
  }
  return 0n;
}

// GDT: 0 null, 1 null, 2 = code (0x10, __BOOT_CS), 3 = data (0x18, __BOOT_DS), 4-5 = TSS (0x20).
export const SEL_CODE = 0x10;
export const SEL_DATA = 0x18;
export const SEL_TSS = 0x20;

/** Packs a legacy 8-byte descriptor from base/limit (20-bit) and the access/flags word. */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base >>> 0);
  const l = BigInt(limit >>> 0);
  const f = BigInt(flags);
  return (
    ((b & 0xff000000n) << 32n) |
    ((f & 0x0000f0ffn) << 40n) |
    ((l & 0x000f0000n) << 32n) |
    ((b & 0x00ffffffn) << 16n) |
    (l & 0x0000ffffn)
  );
}

/** Converts a descriptor to the kvm_segment KVM loads (what a `mov` of its selector would load). */
export function segmentFromEntry(entry: bigint, selector: number): Segment {
  const base = Number(((entry >> 16n) & 0xffffffn) | ((entry >> 32n) & 0xff000000n));
  let limit = Number((entry & 0xffffn) | ((entry >> 32n) & 0xf0000n));
  const g = Number((entry >> 55n) & 1n);
  if (g) limit = limit * 0x1000 + 0xfff;
  return {
    base: BigInt(base),
    limit: limit >>> 0,
    selector,
    type: Number((entry >> 40n) & 0xfn),
    present: Number((entry >> 47n) & 1n),
    dpl: Number((entry >> 45n) & 3n),
    db: Number((entry >> 54n) & 1n),
    s: Number((entry >> 44n) & 1n),
    l: Number((entry >> 53n) & 1n),
    g,
    avl: Number((entry >> 52n) & 1n),
    unusable: 0,
  };
}

export interface GdtResult {
  cs: Segment;
  ds: Segment;
  tr: Segment;
  gdt: { base: bigint; limit: number };
  idt: { base: bigint; limit: number };
}

/**
 * Writes the boot GDT at ADDR.gdt and an empty IDT at ADDR.idt. `long`: a 64-bit code segment (L=1),
 * else a 32-bit one (D=1). Data is a flat 4 GiB read/write segment. The TSS is a busy TSS at base 0,
 * limit 0x67 (what VMX requires of TR; both protocols leave it to the kernel to load its own).
 */
export function writeGdt(mem: GuestMemory, long: boolean): GdtResult {
  const code = long ? gdtEntry(0xa09b, 0, 0xfffff) : gdtEntry(0xc09b, 0, 0xfffff);
  const data = gdtEntry(0xc093, 0, 0xfffff);
  const tss = gdtEntry(0x008b, 0, 0x67);
  const entries = [0n, 0n, code, data, tss, 0n];
  entries.forEach((e, i) => mem.writeU64(ADDR.gdt + i * 8, e));
  mem.fill(ADDR.idt, 8, 0);
  return {
    cs: segmentFromEntry(code, SEL_CODE),
    ds: segmentFromEntry(data, SEL_DATA),
    tr: segmentFromEntry(tss, SEL_TSS),
    gdt: { base: BigInt(ADDR.gdt), limit: entries.length * 8 - 1 },
    idt: { base: BigInt(ADDR.idt), limit: 0 },
  };
}

const PTE_PRESENT = 1n;
const PTE_RW = 2n;
const PTE_PS = 0x80n;

/** Identity-maps [0, IDENTITY_GIB GiB) with 2 MiB pages (1 GiB pages break the nested host). Returns CR3. */
export function writeIdentityPageTables(mem: GuestMemory): bigint {
  mem.fill(ADDR.pml4, 0x1000, 0);
  mem.fill(ADDR.pdpt, 0x1000, 0);
  mem.writeU64(ADDR.pml4, BigInt(ADDR.pdpt) | PTE_PRESENT | PTE_RW);
  for (let g = 0; g < IDENTITY_GIB; g++) {
    const pd = ADDR.pd + g * 0x1000;
    mem.writeU64(ADDR.pdpt + g * 8, BigInt(pd) | PTE_PRESENT | PTE_RW);
    const table = new DataView(new ArrayBuffer(0x1000));
    for (let i = 0; i < 512; i++) {
      const phys = (BigInt(g) << 30n) | (BigInt(i) << 21n);
      table.setBigUint64(i * 8, phys | PTE_PRESENT | PTE_RW | PTE_PS, true);
    }
    mem.write(pd, new Uint8Array(table.buffer));
  }
  return BigInt(ADDR.pml4);
}

/** Writes the BIOS data area fields Linux consults for the EBDA and base memory size. */
export function writeBda(mem: GuestMemory): void {
  mem.writeU16(ADDR.bdaEbdaSegment, ADDR.ebda >> 4);
  mem.writeU16(ADDR.bdaBaseMemKiB, ADDR.ebda >> 10);
}

// ---------------------------------------------------------------------------------------------------------
// MP table (Intel MultiProcessor Specification 1.4)

export const IOAPIC_ADDR = 0xfec00000;
export const LAPIC_ADDR = 0xfee00000;
/** IOAPIC pins described by I/O interrupt entries: 0-15 are the ISA IRQs, 16-23 the extra pins devices use. */
export const MP_IRQS = 24;
const MP_PROC = 0;
const MP_BUS = 1;
const MP_IOAPIC = 2;
const MP_INTSRC = 3;
const MP_LINTSRC = 4;
const MP_INT = 0;
const MP_NMI = 1;
const MP_EXTINT = 3;

export function checksum(b: Uint8Array): number {
  let s = 0;
  for (const x of b) s = (s + x) & 0xff;
  return (0x100 - s) & 0xff;
}

/** Size of the MP structures for `cpus` processors. */
export function mpTableSize(cpus: number): number {
  return 16 + 44 + 20 * cpus + 8 + 8 + 8 * MP_IRQS + 8 * 2;
}

/**
 * Writes the MP floating pointer at ADDR.mptable and the configuration table right after it: one enabled
 * processor per vCPU (APIC ID = index, BSP flag on 0), bus 0 = ISA, one IOAPIC (ID = cpus, 0xfec00000),
 * I/O interrupt entries ISA IRQ n → IOAPIC pin n for n < 24, ExtINT → LINT0 and NMI → LINT1 on all LAPICs.
 * Returns the GPA of the floating pointer.
 */
export function writeMpTable(mem: GuestMemory, cpus: number): number {
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 254) throw new RangeError(`MP table: ${cpus} CPUs (1..254)`);
  const size = mpTableSize(cpus);
  const buf = new Uint8Array(size);
  const dv = new DataView(buf.buffer);
  const ascii = (off: number, s: string) => { for (let i = 0; i < s.length; i++) buf[off + i] = s.charCodeAt(i); };
  const fp = ADDR.mptable;
  const cfg = fp + 16;
  // Floating pointer structure.
  ascii(0, '_MP_');
  dv.setUint32(4, cfg, true);
  buf[8] = 1; // length in 16-byte units
  buf[9] = 4; // spec rev 1.4
  // [10] checksum, [11] feature 1 = 0 (config table present), [12] feature 2 = 0 (virtual wire, no IMCR)
  // Configuration table.
  const c = 16;
  let p = c + 44;
  let count = 0;
  const ioapicId = cpus;
  for (let i = 0; i < cpus; i++) {
    buf[p] = MP_PROC;
    buf[p + 1] = i; // local APIC id
    buf[p + 2] = 0x14; // local APIC version
    buf[p + 3] = 0x01 | (i === 0 ? 0x02 : 0); // EN, BP
    dv.setUint32(p + 4, 0x600, true); // CPU signature: family 6
    dv.setUint32(p + 8, 0x201, true); // features: FPU, APIC
    p += 20; count++;
  }
  buf[p] = MP_BUS; buf[p + 1] = 0; ascii(p + 2, 'ISA   '); p += 8; count++;
  buf[p] = MP_IOAPIC; buf[p + 1] = ioapicId; buf[p + 2] = 0x11; buf[p + 3] = 0x01; dv.setUint32(p + 4, IOAPIC_ADDR, true); p += 8; count++;
  for (let irq = 0; irq < MP_IRQS; irq++) {
    buf[p] = MP_INTSRC; buf[p + 1] = MP_INT; dv.setUint16(p + 2, 0, true); // conforms to bus (ISA: edge, active high)
    buf[p + 4] = 0; buf[p + 5] = irq; buf[p + 6] = ioapicId; buf[p + 7] = irq;
    p += 8; count++;
  }
  for (const [type, lint] of [[MP_EXTINT, 0], [MP_NMI, 1]] as const) {
    buf[p] = MP_LINTSRC; buf[p + 1] = type; dv.setUint16(p + 2, 0, true);
    buf[p + 4] = 0; buf[p + 5] = 0; buf[p + 6] = 0xff; buf[p + 7] = lint;
    p += 8; count++;
  }
  ascii(c, 'PCMP');
  dv.setUint16(c + 4, p - c, true); // base table length
  buf[c + 6] = 4;
  ascii(c + 8, 'KVMKIT  ');
  ascii(c + 16, 'BOOT-LINUX  ');
  dv.setUint16(c + 34, count, true);
  dv.setUint32(c + 36, LAPIC_ADDR, true);
  buf[c + 7] = checksum(buf.subarray(c, p));
  buf[10] = checksum(buf.subarray(0, 16));
  mem.write(fp, buf.subarray(0, p));
  return fp;
}
