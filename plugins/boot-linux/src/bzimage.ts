import { imageError, hex } from './errors.js';

/** Setup-header offsets inside a bzImage file (= inside boot_params), Documentation/arch/x86/boot.rst. */
export const HDR = {
  setup_sects: 0x1f1,
  root_flags: 0x1f2,
  syssize: 0x1f4,
  vid_mode: 0x1fa,
  boot_flag: 0x1fe,
  jump: 0x200,
  header: 0x202,
  version: 0x206,
  type_of_loader: 0x210,
  loadflags: 0x211,
  code32_start: 0x214,
  ramdisk_image: 0x218,
  ramdisk_size: 0x21c,
  heap_end_ptr: 0x224,
  cmd_line_ptr: 0x228,
  initrd_addr_max: 0x22c,
  kernel_alignment: 0x230,
  relocatable_kernel: 0x234,
  min_alignment: 0x235,
  xloadflags: 0x236,
  cmdline_size: 0x238,
  pref_address: 0x258,
  init_size: 0x260,
} as const;

/** "HdrS" little-endian. */
export const HDRS_MAGIC = 0x53726448;
export const LOADED_HIGH = 0x01;
export const CAN_USE_HEAP = 0x80;
export const XLF_KERNEL_64 = 0x01;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;
/** The 64-bit entry point is at this offset from the start of the protected-mode kernel. */
export const ENTRY64_OFFSET = 0x200;
/** xloadflags (and with it XLF_KERNEL_64, the only statement of a 64-bit entry point) exist since 2.12. */
export const MIN_PROTOCOL = 0x020c;

export interface BzImageInfo {
  version: number;
  setupSects: number;
  /** File offset of the protected-mode kernel. */
  kernelOffset: number;
  /** Protected-mode kernel bytes (from syssize). */
  kernelSize: number;
  loadflags: number;
  xloadflags: number;
  relocatable: boolean;
  kernelAlignment: number;
  prefAddress: bigint;
  initSize: number;
  cmdlineSize: number;
  initrdAddrMax: number;
  /** The setup header bytes, [0x1f1, end of header), to copy into the zero page at 0x1f1. */
  header: Uint8Array;
}

/** True when the image has the boot sector signature and "HdrS" where a bzImage has them. */
export function looksLikeBzImage(img: Uint8Array): boolean {
  if (img.byteLength < HDR.header + 4) return false;
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  return dv.getUint32(HDR.header, true) === HDRS_MAGIC;
}

/** Parses and validates a bzImage's setup header for the 64-bit boot protocol. */
export function parseBzImage(img: Uint8Array, path: string): BzImageInfo {
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  if (img.byteLength < 0x268) {
    throw imageError(path, 'truncated', `file is ${img.byteLength} bytes, too short for a bzImage setup header`, { size: img.byteLength });
  }
  if (dv.getUint32(HDR.header, true) !== HDRS_MAGIC || dv.getUint16(HDR.boot_flag, true) !== 0xaa55) {
    throw imageError(path, 'not-bzimage', 'no "HdrS" setup header / 0xAA55 boot flag: not a bzImage');
  }
  const version = dv.getUint16(HDR.version, true);
  if (version < MIN_PROTOCOL) {
    throw imageError(path, 'old-protocol', `boot protocol ${(version >> 8)}.${(version & 0xff).toString().padStart(2, '0')} is older than 2.12 (no xloadflags, no 64-bit entry)`, { version: hex(version) });
  }
  const xloadflags = dv.getUint16(HDR.xloadflags, true);
  if ((xloadflags & XLF_KERNEL_64) === 0) {
    throw imageError(path, 'not-64bit', 'xloadflags lacks XLF_KERNEL_64: the kernel has no 64-bit entry point (32-bit kernel?)', { xloadflags: hex(xloadflags) });
  }
  // The header ends at 0x202 + the byte at 0x201 (the jump instruction's offset).
  const headerEnd = 0x202 + img[0x201]!;
  // It must reach init_size (protocol 2.10+) and stay inside boot_params' hdr area (edd_mbr_sig_buffer is at 0x290).
  if (headerEnd < HDR.init_size + 4 || headerEnd > 0x290) {
    throw imageError(path, 'bad-header', `setup header end ${hex(headerEnd)} is implausible`, { headerEnd });
  }
  let setupSects = img[HDR.setup_sects]!;
  if (setupSects === 0) setupSects = 4;
  const kernelOffset = (setupSects + 1) * 512;
  const syssize = dv.getUint32(HDR.syssize, true);
  const kernelSize = syssize * 16;
  if (kernelSize === 0) throw imageError(path, 'bad-header', 'syssize is 0');
  if (img.byteLength < kernelOffset + kernelSize) {
    throw imageError(path, 'truncated', `image is ${img.byteLength} bytes but its header says ${kernelOffset + kernelSize} (setup ${kernelOffset} + kernel ${kernelSize})`, {
      size: img.byteLength,
      expected: kernelOffset + kernelSize,
    });
  }
  const kernelAlignment = dv.getUint32(HDR.kernel_alignment, true);
  const relocatable = img[HDR.relocatable_kernel]! !== 0;
  if (relocatable && (kernelAlignment === 0 || (kernelAlignment & (kernelAlignment - 1)) !== 0)) {
    throw imageError(path, 'bad-header', `kernel_alignment ${hex(kernelAlignment)} is not a power of two`);
  }
  const prefAddress = dv.getBigUint64(HDR.pref_address, true);
  const initSize = dv.getUint32(HDR.init_size, true);
  if (initSize < kernelSize) {
    throw imageError(path, 'bad-header', `init_size ${hex(initSize)} is smaller than the kernel (${hex(kernelSize)})`);
  }
  return {
    version,
    setupSects,
    kernelOffset,
    kernelSize,
    loadflags: img[HDR.loadflags]!,
    xloadflags,
    relocatable,
    kernelAlignment,
    prefAddress,
    initSize,
    cmdlineSize: dv.getUint32(HDR.cmdline_size, true),
    initrdAddrMax: dv.getUint32(HDR.initrd_addr_max, true),
    header: img.subarray(HDR.setup_sects, headerEnd),
  };
}
