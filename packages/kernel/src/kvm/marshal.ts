import { OFF, SIZE } from './ioctls.js';
import { REG_NAMES, SEGMENT_NAMES, type CpuidEntry, type DTable, type MsrEntry, type Regs, type Segment, type Sregs } from './types.js';

export function decodeRegs(b: Buffer): Regs {
  const r = {} as Regs;
  REG_NAMES.forEach((n, i) => {
    r[n] = b.readBigUInt64LE(i * 8);
  });
  return r;
}

export function encodeRegs(r: Regs, b: Buffer = Buffer.alloc(SIZE.kvm_regs)): Buffer {
  REG_NAMES.forEach((n, i) => b.writeBigUInt64LE(BigInt.asUintN(64, r[n]), i * 8));
  return b;
}

function decodeSeg(b: Buffer, o: number): Segment {
  const s = OFF.kvm_segment;
  return {
    base: b.readBigUInt64LE(o + s.base), limit: b.readUInt32LE(o + s.limit), selector: b.readUInt16LE(o + s.selector),
    type: b[o + s.type]!, present: b[o + s.present]!, dpl: b[o + s.dpl]!, db: b[o + s.db]!, s: b[o + s.s]!,
    l: b[o + s.l]!, g: b[o + s.g]!, avl: b[o + s.avl]!, unusable: b[o + s.unusable]!,
  };
}

function encodeSeg(seg: Segment, b: Buffer, o: number): void {
  const s = OFF.kvm_segment;
  b.writeBigUInt64LE(BigInt.asUintN(64, seg.base), o + s.base);
  b.writeUInt32LE(seg.limit >>> 0, o + s.limit);
  b.writeUInt16LE(seg.selector & 0xffff, o + s.selector);
  b[o + s.type] = seg.type; b[o + s.present] = seg.present; b[o + s.dpl] = seg.dpl; b[o + s.db] = seg.db;
  b[o + s.s] = seg.s; b[o + s.l] = seg.l; b[o + s.g] = seg.g; b[o + s.avl] = seg.avl; b[o + s.unusable] = seg.unusable;
}

function decodeDt(b: Buffer, o: number): DTable {
  return { base: b.readBigUInt64LE(o), limit: b.readUInt16LE(o + 8) };
}

function encodeDt(d: DTable, b: Buffer, o: number): void {
  b.writeBigUInt64LE(BigInt.asUintN(64, d.base), o);
  b.writeUInt16LE(d.limit & 0xffff, o + 8);
}

export function decodeSregs(b: Buffer): Sregs {
  const o = OFF.kvm_sregs;
  const s = {} as Sregs;
  for (const n of SEGMENT_NAMES) s[n] = decodeSeg(b, o[n]);
  s.gdt = decodeDt(b, o.gdt);
  s.idt = decodeDt(b, o.idt);
  s.cr0 = b.readBigUInt64LE(o.cr0); s.cr2 = b.readBigUInt64LE(o.cr2); s.cr3 = b.readBigUInt64LE(o.cr3);
  s.cr4 = b.readBigUInt64LE(o.cr4); s.cr8 = b.readBigUInt64LE(o.cr8); s.efer = b.readBigUInt64LE(o.efer);
  s.apicBase = b.readBigUInt64LE(o.apic_base);
  s.interruptBitmap = [0, 1, 2, 3].map((i) => b.readBigUInt64LE(o.interrupt_bitmap + i * 8));
  return s;
}

export function encodeSregs(s: Sregs, b: Buffer = Buffer.alloc(SIZE.kvm_sregs)): Buffer {
  const o = OFF.kvm_sregs;
  for (const n of SEGMENT_NAMES) encodeSeg(s[n], b, o[n]);
  encodeDt(s.gdt, b, o.gdt);
  encodeDt(s.idt, b, o.idt);
  const w = (v: bigint, off: number) => b.writeBigUInt64LE(BigInt.asUintN(64, v), off);
  w(s.cr0, o.cr0); w(s.cr2, o.cr2); w(s.cr3, o.cr3); w(s.cr4, o.cr4); w(s.cr8, o.cr8); w(s.efer, o.efer); w(s.apicBase, o.apic_base);
  for (let i = 0; i < 4; i++) w(s.interruptBitmap[i] ?? 0n, o.interrupt_bitmap + i * 8);
  return b;
}

export function decodeCpuid2(b: Buffer): CpuidEntry[] {
  const n = b.readUInt32LE(OFF.kvm_cpuid2.nent);
  const e = OFF.kvm_cpuid_entry2;
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = SIZE.kvm_cpuid2 + i * SIZE.kvm_cpuid_entry2;
    out.push({
      function: b.readUInt32LE(o + e.function), index: b.readUInt32LE(o + e.index), flags: b.readUInt32LE(o + e.flags),
      eax: b.readUInt32LE(o + e.eax), ebx: b.readUInt32LE(o + e.ebx), ecx: b.readUInt32LE(o + e.ecx), edx: b.readUInt32LE(o + e.edx),
    });
  }
  return out;
}

export function encodeCpuid2(entries: CpuidEntry[], capacity = entries.length): Buffer {
  const b = Buffer.alloc(SIZE.kvm_cpuid2 + capacity * SIZE.kvm_cpuid_entry2);
  b.writeUInt32LE(entries.length > 0 ? entries.length : capacity, OFF.kvm_cpuid2.nent);
  const e = OFF.kvm_cpuid_entry2;
  entries.forEach((x, i) => {
    const o = SIZE.kvm_cpuid2 + i * SIZE.kvm_cpuid_entry2;
    b.writeUInt32LE(x.function >>> 0, o + e.function); b.writeUInt32LE(x.index >>> 0, o + e.index); b.writeUInt32LE(x.flags >>> 0, o + e.flags);
    b.writeUInt32LE(x.eax >>> 0, o + e.eax); b.writeUInt32LE(x.ebx >>> 0, o + e.ebx); b.writeUInt32LE(x.ecx >>> 0, o + e.ecx); b.writeUInt32LE(x.edx >>> 0, o + e.edx);
  });
  return b;
}

export function encodeMsrs(entries: MsrEntry[]): Buffer {
  const b = Buffer.alloc(SIZE.kvm_msrs + entries.length * SIZE.kvm_msr_entry);
  b.writeUInt32LE(entries.length, OFF.kvm_msrs.nmsrs);
  entries.forEach((m, i) => {
    const o = SIZE.kvm_msrs + i * SIZE.kvm_msr_entry;
    b.writeUInt32LE(m.index >>> 0, o + OFF.kvm_msr_entry.index);
    b.writeBigUInt64LE(BigInt.asUintN(64, m.data), o + OFF.kvm_msr_entry.data);
  });
  return b;
}

export function decodeMsrs(b: Buffer, count: number): MsrEntry[] {
  const out: MsrEntry[] = [];
  for (let i = 0; i < count; i++) {
    const o = SIZE.kvm_msrs + i * SIZE.kvm_msr_entry;
    out.push({ index: b.readUInt32LE(o + OFF.kvm_msr_entry.index), data: b.readBigUInt64LE(o + OFF.kvm_msr_entry.data) });
  }
  return out;
}
