import { KvmkitError, MpState, type GuestMemory, type Regs, type Segment, type Sregs, type VcpuBootState } from '@kvmkit/kernel';

/**
 * The flat-boot machine state. bench/cfloor (the C floor VMM) sets up exactly the same, so the same guest
 * bytes run on both:
 *  - image at 0x100000, entry 0x100000;
 *  - GDT at 0x500: null, 0x08 code64 DPL0, 0x10 data DPL0, 0x18 data DPL3, 0x20 code64 DPL3, 0x28 TSS (16 bytes);
 *  - TSS at 0x7000: 104 bytes, I/O map base 0x68, an 8 KiB all-zero I/O permission bitmap (every port allowed)
 *    and a 0xff terminator. On nested PVM hosts guest ring 3 effectively runs with IOPL 0 and port access
 *    is checked against this bitmap, so this is what makes ring-3 `in`/`out` work there;
 *  - PML4 0x1000 → PDPT 0x2000 → PDs 0x3000..0x6000, 2 MiB pages (P|RW|US|PS) identity-mapping 0..4 GiB;
 *  - CR3 0x1000, CR4 PAE, CR0 0x80050033, EFER LME|LMA;
 *  - ring 3: CS 0x23, SS/DS/ES/FS/GS 0x1b, RFLAGS 0x3002 (IOPL 3); ring 0: CS 0x08, data 0x10, RFLAGS 0x2;
 *  - vCPU i: RIP 0x100000, RSP 0x80000 - i*0x1000, RDI i, RSI cpus, RDX arg.
 */
export const FLAT = {
  loadAddress: 0x100000,
  gdt: 0x500,
  tss: 0x7000,
  /** TSS limit: 104-byte TSS + 8 KiB I/O permission bitmap (all ports allowed) + the 0xff terminator. */
  tssLimit: 0x68 + 0x2000,
  pml4: 0x1000,
  pdpt: 0x2000,
  pd: 0x3000,
  stackTop: 0x80000,
  stackPerCpu: 0x1000,
} as const;

export const GDT_ENTRIES = [
  0x0000000000000000n,
  0x00af9b000000ffffn, // 0x08 code64 DPL0
  0x00cf93000000ffffn, // 0x10 data DPL0
  0x00cff3000000ffffn, // 0x18 data DPL3
  0x00affb000000ffffn, // 0x20 code64 DPL3
] as const;

function seg(selector: number, type: number, dpl: number, code: boolean): Segment {
  return { base: 0n, limit: 0xffffffff, selector, type, present: 1, dpl, db: code ? 0 : 1, s: 1, l: code ? 1 : 0, g: 1, avl: 0, unusable: 0 };
}

/** Writes GDT, TSS and page tables; throws when memory is too small for the image. */
export function writeFlatTables(mem: GuestMemory, image: Uint8Array): void {
  const need = FLAT.loadAddress + image.byteLength;
  if (!mem.contains(0, need)) {
    throw new KvmkitError('KVMKIT_ERR_IMAGE', `flat image of ${image.byteLength} bytes does not fit in guest RAM at 0x${FLAT.loadAddress.toString(16)}`, {
      details: { imageSize: image.byteLength, memory: mem.size },
    });
  }
  GDT_ENTRIES.forEach((e, i) => mem.writeU64(FLAT.gdt + i * 8, e));
  // 64-bit TSS descriptor (type 0xB busy, present) at 0x28: base FLAT.tss, limit 0x67.
  const base = BigInt(FLAT.tss);
  const lim = BigInt(FLAT.tssLimit);
  const low = (lim & 0xffffn) | ((base & 0xffffffn) << 16n) | (0x8bn << 40n) | (((lim >> 16n) & 0xfn) << 48n) | (((base >> 24n) & 0xffn) << 56n);
  mem.writeU64(FLAT.gdt + 5 * 8, low);
  mem.writeU64(FLAT.gdt + 6 * 8, base >> 32n);
  mem.fill(FLAT.tss, FLAT.tssLimit + 1, 0);
  mem.writeU16(FLAT.tss + 0x66, 0x68); // I/O map base
  mem.writeU8(FLAT.tss + FLAT.tssLimit, 0xff); // bitmap terminator
  mem.fill(FLAT.pml4, 0x6000, 0);
  mem.writeU64(FLAT.pml4, BigInt(FLAT.pdpt) | 0x7n);
  for (let i = 0; i < 4; i++) {
    const pd = FLAT.pd + i * 0x1000;
    mem.writeU64(FLAT.pdpt + i * 8, BigInt(pd) | 0x7n);
    for (let j = 0; j < 512; j++) {
      const addr = (BigInt(i) << 30n) | (BigInt(j) << 21n);
      mem.writeU64(pd + j * 8, addr | 0x87n);
    }
  }
  mem.write(FLAT.loadAddress, image);
}

/** The register state for vCPU `index`. */
export function flatVcpuState(index: number, cpus: number, ring: 0 | 3, arg: bigint): VcpuBootState {
  const user = ring === 3;
  const code = user ? seg(0x23, 0xb, 3, true) : seg(0x08, 0xb, 0, true);
  const data = user ? seg(0x1b, 0x3, 3, false) : seg(0x10, 0x3, 0, false);
  const tr: Segment = { base: BigInt(FLAT.tss), limit: FLAT.tssLimit, selector: 0x28, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 };
  const ldt: Segment = { base: 0n, limit: 0, selector: 0, type: 0x2, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 1 };
  const sregs: Partial<Sregs> = {
    cs: code, ds: data, es: data, fs: data, gs: data, ss: data, tr, ldt,
    gdt: { base: BigInt(FLAT.gdt), limit: 7 * 8 - 1 },
    idt: { base: 0n, limit: 0 },
    cr0: 0x80050033n, cr3: BigInt(FLAT.pml4), cr4: 0x20n, efer: 0x500n,
  };
  const regs: Partial<Regs> = {
    rip: BigInt(FLAT.loadAddress),
    rsp: BigInt(FLAT.stackTop - index * FLAT.stackPerCpu),
    rdi: BigInt(index), rsi: BigInt(cpus), rdx: BigInt.asUintN(64, arg),
    rflags: user ? 0x3002n : 0x2n,
  };
  return { regs, sregs, mpState: MpState.RUNNABLE };
}
