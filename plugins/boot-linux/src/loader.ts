import { KvmkitError, type GuestMemory, type MemoryLayout, type VcpuBootState, type Regs, type Sregs } from '@kvmkit/kernel';
import { BootLinuxErrors, hex, imageError } from './errors.js';
import { parseBzImage, looksLikeBzImage, HDR, LOADED_HIGH, CAN_USE_HEAP, ENTRY64_OFFSET, type BzImageInfo } from './bzimage.js';
import { parsePvhElf, looksLikeElf, type PvhElfInfo } from './elf.js';
import { decompressPayload, findPayload, parseVmlinux, payloadFormat, HOST_FORMATS, type PayloadFormat, type VmlinuxInfo } from './payload.js';
import { ADDR, buildE820, lowRamTop, writeGdt, writeIdentityPageTables, writeBda, writeMpTable, type E820Entry } from './tables.js';

export type KernelFormat = 'auto' | 'bzimage' | 'pvh';
/** Where a bzImage's compressed kernel is decompressed: by its own code in the guest, or here on the host. */
export type DecompressMode = 'guest' | 'host' | 'auto';

/** What happened to a bzImage payload. */
export interface DecompressInfo {
  /** 'host': decompressed here and entered at the ELF entry; 'guest': the bzImage's own decompressor runs. */
  mode: 'host' | 'guest';
  format: PayloadFormat;
  /** Why 'auto' chose guest decompression. */
  reason?: string;
  compressedBytes: number;
  /** Host mode: decompressed ELF size and the time the decompression took. */
  decompressedBytes?: number;
  ms?: number;
}

export interface LoadLinuxInput {
  memory: GuestMemory;
  layout: Readonly<MemoryLayout>;
  cpus: number;
  /** The complete command line handed to the kernel. */
  cmdline: string;
  kernel: Uint8Array;
  /** For error messages. */
  kernelPath: string;
  initrd?: Uint8Array;
  initrdPath?: string;
  format?: KernelFormat;
  /** bzImage only (default 'auto': host when the payload is gzip or xz, else guest). */
  decompress?: DecompressMode;
}

export interface LoadLinuxResult {
  loader: 'linux-bzimage' | 'pvh';
  /** Initial state of vCPU 0 (APs are started by the guest with INIT/SIPI). */
  bsp: VcpuBootState;
  /** Where the kernel went: [start, end) including init_size (bzImage) or .bss (ELF). */
  kernel: { start: bigint; end: bigint; entry: bigint };
  initrd?: { addr: bigint; size: number };
  cmdline: { addr: number; length: number };
  /** Zero page (bzImage) or hvm_start_info (PVH). */
  bootInfo: number;
  mptable: number;
  e820: E820Entry[];
  /** bzImage: how its payload was decompressed. */
  decompress?: DecompressInfo;
}

/** x86 COMMAND_LINE_SIZE is 2048 including the NUL; PVH has no header saying so. */
export const PVH_CMDLINE_MAX = 2047;
/** hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
export const HVM_START_MAGIC = 0x336ec578;
const E820_MAX_ZEROPAGE = 128;
const BP_E820_ENTRIES = 0x1e8;
const BP_E820_TABLE = 0x2d0;
const BP_EXT_RAMDISK_IMAGE = 0x0c0;
const BP_EXT_RAMDISK_SIZE = 0x0c4;
const BP_EXT_CMD_LINE_PTR = 0x0c8;
/** loadflags bit the decompressor sets when it randomized the kernel's address (it never is, here). */
const KASLR_FLAG = 0x02;
const PAGE = 0x1000n;
const FOUR_GIB = 1n << 32n;

const CR0_PE = 0x1n;
const CR0_ET = 0x10n;
const CR0_PG = 0x8000_0000n;
const CR4_PAE = 0x20n;
const EFER_LME = 0x100n;
const EFER_LMA = 0x400n;

const alignUp = (x: bigint, a: bigint) => ((x + a - 1n) / a) * a;
const alignDown = (x: bigint, a: bigint) => (x / a) * a;

/** Detects the format of a kernel image (ELF → pvh, "HdrS" → bzimage). */
export function detectFormat(img: Uint8Array, path: string): 'bzimage' | 'pvh' {
  if (looksLikeElf(img)) return 'pvh';
  if (looksLikeBzImage(img)) return 'bzimage';
  if (img.byteLength < 0x206) throw imageError(path, 'truncated', `file is ${img.byteLength} bytes: neither an ELF nor a bzImage`, { size: img.byteLength });
  throw imageError(path, 'unknown-format', 'neither a bzImage (no "HdrS" header) nor an ELF vmlinux with a PVH note');
}

/**
 * Validates everything first (image, sizes, placement, cmdline), then writes kernel, initrd, cmdline and boot
 * tables into guest memory and returns vCPU 0's initial state. Throws coded KvmkitErrors; writes nothing when
 * a check fails.
 */
export function loadLinux(input: LoadLinuxInput): LoadLinuxResult {
  const format = input.format === undefined || input.format === 'auto' ? detectFormat(input.kernel, input.kernelPath) : input.format;
  const mem = input.memory;
  const top = lowRamTop(input.layout);
  const need = BigInt(ADDR.highMem);
  if (top <= need || !mem.contains(0, ADDR.highMem)) {
    throw new KvmkitError(BootLinuxErrors.MEMORY, `guest RAM must cover [0, 1 MiB) and more for the boot tables (low RAM ends at ${hex(top)})`, {
      details: { need: hex(need), have: hex(top) },
    });
  }
  if (!Number.isInteger(input.cpus) || input.cpus < 1 || input.cpus > 254) {
    throw new KvmkitError('KVMKIT_ERR_CONFIG', `boot-linux: ${input.cpus} vCPUs cannot be described in an MP table (1..254)`);
  }
  const cmdBytes = new TextEncoder().encode(input.cmdline);
  if (cmdBytes.includes(0)) throw new KvmkitError(BootLinuxErrors.CMDLINE, 'the kernel command line contains a NUL byte', { details: { length: cmdBytes.length } });
  return format === 'bzimage' ? loadBzImage(input, parseBzImage(input.kernel, input.kernelPath), top, cmdBytes) : loadPvh(input, parsePvhElf(input.kernel, input.kernelPath), top, cmdBytes);
}

function checkCmdline(cmd: Uint8Array, max: number): void {
  const limit = Math.min(max, ADDR.cmdlineMax - 1);
  if (cmd.length > limit) {
    throw new KvmkitError(BootLinuxErrors.CMDLINE, `the kernel command line is ${cmd.length} bytes; this kernel accepts at most ${limit}`, {
      details: { length: cmd.length, max: limit },
    });
  }
}

function kernelFits(input: LoadLinuxInput, start: bigint, end: bigint, top: bigint): void {
  if (start < BigInt(ADDR.highMem)) {
    throw imageError(input.kernelPath, 'bad-segment', `kernel load address ${hex(start)} is below 1 MiB (where the boot tables live)`, { start: hex(start) });
  }
  if (end > top || !input.memory.contains(start, Number(end - start))) {
    throw new KvmkitError(BootLinuxErrors.MEMORY, `guest RAM is too small for the kernel: it needs [${hex(start)}, ${hex(end)}) but low RAM ends at ${hex(top)}`, {
      details: { need: hex(end), have: hex(top), kernel: input.kernelPath },
    });
  }
}

/** Initrd: page aligned, as high as possible below min(limit, low RAM top, 4 GiB), above the kernel. */
function placeInitrd(input: LoadLinuxInput, kernelEnd: bigint, limit: bigint, top: bigint): bigint | undefined {
  const initrd = input.initrd;
  if (!initrd || initrd.byteLength === 0) return undefined;
  let ceiling = top < limit ? top : limit;
  if (ceiling > FOUR_GIB) ceiling = FOUR_GIB;
  const size = BigInt(initrd.byteLength);
  const floor = alignUp(kernelEnd, PAGE);
  const addr = ceiling >= size ? alignDown(ceiling - size, PAGE) : -1n;
  if (addr < floor) {
    throw new KvmkitError(BootLinuxErrors.INITRD, `the ${initrd.byteLength}-byte initrd ${input.initrdPath ?? ''} does not fit between the kernel end ${hex(floor)} and ${hex(ceiling)}`, {
      details: { size: initrd.byteLength, low: hex(floor), high: hex(ceiling), path: input.initrdPath },
    });
  }
  if (!input.memory.contains(addr, initrd.byteLength)) {
    throw new KvmkitError(BootLinuxErrors.INITRD, `initrd range ${hex(addr)}+${initrd.byteLength} is not backed by one RAM region`, { details: { size: initrd.byteLength } });
  }
  return addr;
}

/** Writes what both protocols share: BDA, cmdline, MP table, GDT. */
function writeCommon(input: LoadLinuxInput, cmd: Uint8Array, long: boolean) {
  const mem = input.memory;
  mem.fill(0, ADDR.highMem, 0); // a clean first MiB: no stale tables from a previous boot
  writeBda(mem);
  mem.write(ADDR.cmdline, cmd);
  mem.writeU8(ADDR.cmdline + cmd.length, 0);
  const mptable = writeMpTable(mem, input.cpus);
  const gdt = writeGdt(mem, long);
  return { mptable, gdt };
}

function baseRegs(): Regs {
  return { rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n, r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n, rip: 0n, rflags: 0x2n };
}

function loadBzImage(input: LoadLinuxInput, info: BzImageInfo, top: bigint, cmd: Uint8Array): LoadLinuxResult {
  checkCmdline(cmd, info.cmdlineSize);
  const mode = input.decompress ?? 'auto';
  const payload = findPayloadFor(input, info, mode);
  const format = payload ? payloadFormat(payload) : 'unknown';
  if (mode === 'host' || (mode === 'auto' && payload && HOST_FORMATS.includes(format))) {
    return loadBzImageHost(input, info, top, cmd, payload!, format);
  }
  const reason = !payload ? 'the setup header has no usable payload_offset/payload_length'
    : `the payload is ${format === 'unknown' ? 'in an unknown format' : `${format}-compressed`} (host decompression supports ${HOST_FORMATS.join(', ')})`;
  const decompress: DecompressInfo = { mode: 'guest', format, compressedBytes: payload?.byteLength ?? 0, ...(mode === 'auto' ? { reason } : { reason: "decompress: 'guest'" }) };
  return { ...loadBzImageGuest(input, info, top, cmd), decompress };
}

/** The payload, or undefined in 'auto'/'guest' mode when the header does not describe one ('host' throws). */
function findPayloadFor(input: LoadLinuxInput, info: BzImageInfo, mode: DecompressMode): Uint8Array | undefined {
  try {
    return findPayload(input.kernel, info.kernelOffset, info.kernelSize, info.version, input.kernelPath);
  } catch (e) {
    if (mode === 'host') throw e;
    return undefined;
  }
}

/** The 64-bit boot protocol: the protected-mode kernel at pref_address, entered at its startup_64 (+0x200). */
function loadBzImageGuest(input: LoadLinuxInput, info: BzImageInfo, top: bigint, cmd: Uint8Array): LoadLinuxResult {
  const mem = input.memory;
  // Load at pref_address: a non-relocatable kernel must run there, a relocatable one prefers it, and the
  // decompressor works in [pref_address, pref_address + init_size) in both cases.
  const load = checkedPrefAddress(input, info);
  const end = load + BigInt(Math.max(info.initSize, info.kernelSize));
  kernelFits(input, load, end, top);
  const initrdAddr = placeInitrd(input, end, BigInt(info.initrdAddrMax) + 1n, top);
  const e820 = checkedE820(input);

  // All checks passed: write.
  const { mptable, gdt } = writeCommon(input, cmd, true);
  const cr3 = writeIdentityPageTables(mem);
  mem.write(load, input.kernel.subarray(info.kernelOffset, info.kernelOffset + info.kernelSize));
  if (input.initrd && initrdAddr !== undefined) mem.write(initrdAddr, input.initrd);
  writeZeroPage(input, info, load, initrdAddr, e820);
  const entry = load + BigInt(ENTRY64_OFFSET);
  return {
    loader: 'linux-bzimage',
    bsp: longModeBsp(entry, gdt, cr3),
    kernel: { start: load, end, entry },
    ...(initrdAddr !== undefined ? { initrd: { addr: initrdAddr, size: input.initrd!.byteLength } } : {}),
    cmdline: { addr: ADDR.cmdline, length: cmd.length },
    bootInfo: ADDR.zeroPage,
    mptable,
    e820,
  };
}

/**
 * Host decompression: what arch/x86/boot/compressed (extract_kernel → parse_elf) would hand over. The
 * decompressor's output buffer is LOAD_PHYSICAL_ADDR (= pref_address) for a non-relocatable kernel, and for a
 * relocatable one when it stays at pref_address without KASLR; it then copies each PT_LOAD to
 * output + (p_paddr - LOAD_PHYSICAL_ADDR) = p_paddr, and needs no relocations on x86-64 (they only apply
 * a KASLR virtual offset). It jumps to output + (e_entry - LOAD_PHYSICAL_ADDR) = e_entry in long mode with
 * RSI = boot_params. We do the same; KASLR is not applied (the kernel sees KASLR_FLAG clear, as with nokaslr).
 */
function loadBzImageHost(input: LoadLinuxInput, info: BzImageInfo, top: bigint, cmd: Uint8Array, payload: Uint8Array, format: PayloadFormat): LoadLinuxResult {
  const mem = input.memory;
  const load = checkedPrefAddress(input, info);
  const maxOut = Number(top > BigInt(Number.MAX_SAFE_INTEGER) ? BigInt(Number.MAX_SAFE_INTEGER) : top);
  // Raises KVMKIT_ERR_BOOT_DECOMPRESS naming the format when it is not gzip/xz; output capped by low RAM.
  const d = decompressPayload(payload, Math.min(maxOut, 0x7fff_ffff), input.kernelPath);
  const elf: VmlinuxInfo = parseVmlinux(d.data, input.kernelPath);
  if (elf.low !== load) {
    // Loading elsewhere than the link address would need the decompressor's relocation pass (handle_relocations
    // for a KASLR offset) or a different output buffer: refuse rather than guess.
    throw imageError(input.kernelPath, 'bad-segment', `the decompressed kernel's first segment is at ${hex(elf.low)}, but pref_address (LOAD_PHYSICAL_ADDR) is ${hex(load)}: host decompression only places a kernel at its link address (use decompress: 'guest')`, {
      low: hex(elf.low),
      prefAddress: hex(load),
    });
  }
  for (const s of elf.segments) kernelFits(input, s.paddr, s.paddr + BigInt(s.memsz), top);
  const end = elf.high;
  const initrdAddr = placeInitrd(input, end, BigInt(info.initrdAddrMax) + 1n, top);
  const e820 = checkedE820(input);

  const { mptable, gdt } = writeCommon(input, cmd, true);
  const cr3 = writeIdentityPageTables(mem);
  for (const s of elf.segments) {
    mem.write(s.paddr, d.data.subarray(s.offset, s.offset + s.filesz));
    if (s.memsz > s.filesz) mem.fill(s.paddr + BigInt(s.filesz), s.memsz - s.filesz, 0);
  }
  if (input.initrd && initrdAddr !== undefined) mem.write(initrdAddr, input.initrd);
  writeZeroPage(input, info, load, initrdAddr, e820);
  return {
    loader: 'linux-bzimage',
    bsp: longModeBsp(elf.entry, gdt, cr3),
    kernel: { start: elf.low, end, entry: elf.entry },
    ...(initrdAddr !== undefined ? { initrd: { addr: initrdAddr, size: input.initrd!.byteLength } } : {}),
    cmdline: { addr: ADDR.cmdline, length: cmd.length },
    bootInfo: ADDR.zeroPage,
    mptable,
    e820,
    decompress: { mode: 'host', format, compressedBytes: payload.byteLength, decompressedBytes: d.data.byteLength, ms: d.ms },
  };
}

function checkedPrefAddress(input: LoadLinuxInput, info: BzImageInfo): bigint {
  const load = info.prefAddress;
  if (info.relocatable && load % BigInt(info.kernelAlignment) !== 0n) {
    throw imageError(input.kernelPath, 'bad-header', `pref_address ${hex(load)} is not aligned to kernel_alignment ${hex(info.kernelAlignment)}`);
  }
  return load;
}

function checkedE820(input: LoadLinuxInput): E820Entry[] {
  const e820 = buildE820(input.layout);
  if (e820.length > E820_MAX_ZEROPAGE) {
    throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `the memory layout has ${e820.length} e820 entries; the zero page holds ${E820_MAX_ZEROPAGE}`);
  }
  return e820;
}

/** boot_params as the 64-bit boot protocol fills it (the same for both decompression modes). */
function writeZeroPage(input: LoadLinuxInput, info: BzImageInfo, load: bigint, initrdAddr: bigint | undefined, e820: E820Entry[]): void {
  const mem = input.memory;
  const zp = ADDR.zeroPage;
  mem.fill(zp, 0x1000, 0);
  mem.write(zp + HDR.setup_sects, info.header);
  mem.writeU8(zp + HDR.type_of_loader, 0xff);
  mem.writeU8(zp + HDR.loadflags, (info.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KASLR_FLAG);
  mem.writeU16(zp + HDR.heap_end_ptr, 0xfe00 - 0x200);
  mem.writeU32(zp + HDR.code32_start, Number(load));
  mem.writeU32(zp + HDR.cmd_line_ptr, ADDR.cmdline);
  mem.writeU32(zp + BP_EXT_CMD_LINE_PTR, 0);
  mem.writeU32(zp + HDR.ramdisk_image, initrdAddr !== undefined ? Number(initrdAddr) : 0);
  mem.writeU32(zp + HDR.ramdisk_size, initrdAddr !== undefined ? input.initrd!.byteLength : 0);
  mem.writeU32(zp + BP_EXT_RAMDISK_IMAGE, 0);
  mem.writeU32(zp + BP_EXT_RAMDISK_SIZE, 0);
  mem.writeU8(zp + BP_E820_ENTRIES, e820.length);
  e820.forEach((e, i) => {
    const a = zp + BP_E820_TABLE + i * 20;
    mem.writeU64(a, e.addr);
    mem.writeU64(a + 8, e.size);
    mem.writeU32(a + 16, e.type);
  });
}

/** 64-bit entry: long mode, identity paging, flat __BOOT_CS/__BOOT_DS, RSI = zero page. */
function longModeBsp(entry: bigint, gdt: ReturnType<typeof writeGdt>, cr3: bigint): VcpuBootState {
  const regs: Regs = { ...baseRegs(), rip: entry, rsi: BigInt(ADDR.zeroPage), rsp: BigInt(ADDR.stack), rbp: BigInt(ADDR.stack) };
  const sregs: Partial<Sregs> = {
    cs: gdt.cs, ds: gdt.ds, es: gdt.ds, fs: gdt.ds, gs: gdt.ds, ss: gdt.ds, tr: gdt.tr,
    gdt: gdt.gdt, idt: gdt.idt,
    cr0: CR0_PE | CR0_ET | CR0_PG, cr3, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA,
  };
  return { regs, sregs };
}

function loadPvh(input: LoadLinuxInput, info: PvhElfInfo, top: bigint, cmd: Uint8Array): LoadLinuxResult {
  const mem = input.memory;
  checkCmdline(cmd, PVH_CMDLINE_MAX);
  for (const s of info.segments) kernelFits(input, s.paddr, s.paddr + BigInt(s.memsz), top);
  const initrdAddr = placeInitrd(input, info.high, FOUR_GIB, top);
  const e820 = buildE820(input.layout);
  const maxEntries = Math.floor((ADDR.memmapEnd - ADDR.memmap) / 24);
  if (e820.length > maxEntries) {
    throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `the memory layout has ${e820.length} memory map entries; at most ${maxEntries} fit`);
  }

  const { mptable, gdt } = writeCommon(input, cmd, false);
  for (const s of info.segments) {
    mem.write(s.paddr, input.kernel.subarray(s.offset, s.offset + s.filesz));
    if (s.memsz > s.filesz) mem.fill(s.paddr + BigInt(s.filesz), s.memsz - s.filesz, 0);
  }
  if (input.initrd && initrdAddr !== undefined) mem.write(initrdAddr, input.initrd);

  // hvm_start_info + modlist + memmap
  const si = ADDR.startInfo;
  mem.fill(si, ADDR.memmapEnd - si, 0);
  mem.writeU32(si + 0, HVM_START_MAGIC);
  mem.writeU32(si + 4, 1); // version
  mem.writeU32(si + 8, 0); // flags
  mem.writeU32(si + 12, initrdAddr !== undefined ? 1 : 0); // nr_modules
  mem.writeU64(si + 16, initrdAddr !== undefined ? BigInt(ADDR.modlist) : 0n);
  mem.writeU64(si + 24, BigInt(ADDR.cmdline));
  mem.writeU64(si + 32, 0n); // rsdp_paddr: no ACPI
  mem.writeU64(si + 40, BigInt(ADDR.memmap));
  mem.writeU32(si + 48, e820.length);
  if (initrdAddr !== undefined) {
    mem.writeU64(ADDR.modlist + 0, initrdAddr);
    mem.writeU64(ADDR.modlist + 8, BigInt(input.initrd!.byteLength));
    mem.writeU64(ADDR.modlist + 16, 0n);
  }
  e820.forEach((e, i) => {
    const a = ADDR.memmap + i * 24;
    mem.writeU64(a, e.addr);
    mem.writeU64(a + 8, e.size);
    mem.writeU32(a + 16, e.type);
  });

  const entry = BigInt(info.entry);
  const regs: Regs = { ...baseRegs(), rip: entry, rbx: BigInt(si) };
  const sregs: Partial<Sregs> = {
    cs: gdt.cs, ds: gdt.ds, es: gdt.ds, fs: gdt.ds, gs: gdt.ds, ss: gdt.ds, tr: gdt.tr,
    gdt: gdt.gdt, idt: gdt.idt,
    cr0: CR0_PE | CR0_ET, cr3: 0n, cr4: 0n, efer: 0n,
  };
  return {
    loader: 'pvh',
    bsp: { regs, sregs },
    kernel: { start: info.low, end: info.high, entry },
    ...(initrdAddr !== undefined ? { initrd: { addr: initrdAddr, size: input.initrd!.byteLength } } : {}),
    cmdline: { addr: ADDR.cmdline, length: cmd.length },
    bootInfo: si,
    mptable,
    e820,
  };
}
