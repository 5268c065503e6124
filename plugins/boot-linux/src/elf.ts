import { imageError, hex } from './errors.js';

export const ELF_MAGIC = 0x464c457f; // "\x7fELF" little-endian
const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const EM_386 = 3;
const EM_X86_64 = 62;
/** p_type of a loadable segment. */
export const PT_LOAD = 1;
const PT_NOTE = 4;
/** XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): the 32-bit PVH entry point. */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

export interface ElfSegment {
  /** File offset and size of the bytes to copy. */
  offset: number;
  filesz: number;
  /** Guest physical load address (p_paddr) and size in memory (the rest is zeroed). */
  paddr: bigint;
  memsz: number;
}

export interface PvhElfInfo {
  class: 32 | 64;
  segments: ElfSegment[];
  /** The PVH 32-bit entry point from the Xen PHYS32_ENTRY note. */
  entry: number;
  /** Lowest and highest (exclusive) guest physical address the segments cover. */
  low: bigint;
  high: bigint;
}

/** The lowest and highest (exclusive) guest physical address of `segments` (at least one). */
export function segmentSpan(segments: readonly ElfSegment[]): { low: bigint; high: bigint } {
  let low = segments[0]!.paddr;
  let high = 0n;
  for (const s of segments) {
    if (s.paddr < low) low = s.paddr;
    const end = s.paddr + BigInt(s.memsz);
    if (end > high) high = end;
  }
  return { low, high };
}

export function looksLikeElf(img: Uint8Array): boolean {
  return img.byteLength >= 4 && new DataView(img.buffer, img.byteOffset, img.byteLength).getUint32(0, true) === ELF_MAGIC;
}

/**
 * Parses an ELF kernel (vmlinux) for PVH boot: x86_64 (ELF64) or i386 (ELF32), little-endian, executable,
 * with PT_LOAD segments and a Xen PHYS32_ENTRY note. Every offset and size is checked against the file.
 */
export function parsePvhElf(img: Uint8Array, path: string): PvhElfInfo {
  const size = img.byteLength;
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  if (size < 52) throw imageError(path, 'truncated', `file is ${size} bytes, too short for an ELF header`, { size });
  if (dv.getUint32(0, true) !== ELF_MAGIC) throw imageError(path, 'unknown-format', 'not an ELF file');
  const cls = img[4]!;
  if (cls !== ELFCLASS32 && cls !== ELFCLASS64) throw imageError(path, 'elf-class', `unknown ELF class ${cls}`, { class: cls });
  if (img[5] !== ELFDATA2LSB) throw imageError(path, 'elf-endian', 'ELF is not little-endian', { data: img[5] });
  const is64 = cls === ELFCLASS64;
  if (is64 && size < 64) throw imageError(path, 'truncated', `file is ${size} bytes, too short for an ELF64 header`, { size });
  const type = dv.getUint16(16, true);
  const machine = dv.getUint16(18, true);
  if (is64 ? machine !== EM_X86_64 : machine !== EM_386) {
    throw imageError(path, machine === EM_X86_64 || machine === EM_386 ? 'elf-class' : 'elf-machine',
      `ELF${is64 ? 64 : 32} with e_machine ${machine}: need ELF64/x86-64 (62) or ELF32/i386 (3)`, { class: is64 ? 64 : 32, machine });
  }
  if (type !== ET_EXEC) throw imageError(path, 'elf-type', `ELF e_type ${type} is not ET_EXEC`, { type });
  const phoff = is64 ? Number(dv.getBigUint64(32, true)) : dv.getUint32(28, true);
  const phentsize = dv.getUint16(is64 ? 54 : 42, true);
  const phnum = dv.getUint16(is64 ? 56 : 44, true);
  const minEnt = is64 ? 56 : 32;
  if (phnum === 0) throw imageError(path, 'bad-segment', 'ELF has no program headers');
  if (phentsize < minEnt) throw imageError(path, 'bad-segment', `e_phentsize ${phentsize} < ${minEnt}`);
  if (!Number.isSafeInteger(phoff) || phoff + phnum * phentsize > size) {
    throw imageError(path, 'truncated', `program headers (${hex(phoff)} + ${phnum}×${phentsize}) lie outside the ${size}-byte file`, { size });
  }
  const segments: ElfSegment[] = [];
  let entry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * phentsize;
    const ptype = dv.getUint32(p, true);
    let offset: number, paddr: bigint, filesz: number, memsz: number;
    if (is64) {
      offset = Number(dv.getBigUint64(p + 8, true));
      paddr = dv.getBigUint64(p + 24, true);
      filesz = Number(dv.getBigUint64(p + 32, true));
      memsz = Number(dv.getBigUint64(p + 40, true));
    } else {
      offset = dv.getUint32(p + 4, true);
      paddr = BigInt(dv.getUint32(p + 12, true));
      filesz = dv.getUint32(p + 16, true);
      memsz = dv.getUint32(p + 20, true);
    }
    if (ptype !== PT_LOAD && ptype !== PT_NOTE) continue;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(filesz) || offset + filesz > size) {
      throw imageError(path, 'truncated', `segment ${i} (${hex(offset)}+${hex(filesz)}) lies outside the ${size}-byte file`, { segment: i, size });
    }
    if (ptype === PT_LOAD) {
      if (!Number.isSafeInteger(memsz) || memsz < filesz) throw imageError(path, 'bad-segment', `segment ${i}: p_memsz < p_filesz`, { segment: i });
      if (memsz === 0) continue;
      segments.push({ offset, filesz, paddr, memsz });
    } else {
      entry ??= findPvhEntry(img.subarray(offset, offset + filesz), path);
    }
  }
  if (segments.length === 0) throw imageError(path, 'bad-segment', 'ELF has no PT_LOAD segment');
  if (entry === undefined) {
    throw imageError(path, 'no-pvh-note', 'ELF has no Xen PHYS32_ENTRY note (XEN_ELFNOTE_PHYS32_ENTRY, type 18): the kernel was built without CONFIG_PVH');
  }
  const { low, high } = segmentSpan(segments);
  if (BigInt(entry) < low || BigInt(entry) >= high) {
    throw imageError(path, 'bad-segment', `PVH entry ${hex(entry)} lies outside the loaded segments [${hex(low)}, ${hex(high)})`, { entry: hex(entry) });
  }
  return { class: is64 ? 64 : 32, segments, entry, low, high };
}

/** Walks an ELF note area; returns the PHYS32_ENTRY address of a "Xen" note, if any. */
function findPvhEntry(notes: Uint8Array, path: string): number | undefined {
  const dv = new DataView(notes.buffer, notes.byteOffset, notes.byteLength);
  const align4 = (n: number) => (n + 3) & ~3;
  let p = 0;
  while (p + 12 <= notes.byteLength) {
    const namesz = dv.getUint32(p, true);
    const descsz = dv.getUint32(p + 4, true);
    const type = dv.getUint32(p + 8, true);
    const nameOff = p + 12;
    const descOff = nameOff + align4(namesz);
    const next = descOff + align4(descsz);
    if (namesz > notes.byteLength || descsz > notes.byteLength || next > notes.byteLength) break;
    const name = new TextDecoder().decode(notes.subarray(nameOff, nameOff + namesz)).replace(/\0+$/, '');
    if (name === 'Xen' && type === XEN_ELFNOTE_PHYS32_ENTRY) {
      if (descsz === 4) return dv.getUint32(descOff, true);
      if (descsz === 8) {
        const v = dv.getBigUint64(descOff, true);
        if (v >= 1n << 32n) throw imageError(path, 'bad-segment', `PVH entry ${hex(v)} is above 4 GiB`);
        return Number(v);
      }
      throw imageError(path, 'bad-segment', `PHYS32_ENTRY note has a ${descsz}-byte descriptor`);
    }
    p = next;
  }
  return undefined;
}
