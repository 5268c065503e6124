/**
 * Host-side decompression of a bzImage payload (what arch/x86/boot/compressed does in the guest): find the
 * compressed kernel via the setup header's payload_offset/payload_length, decompress it (gzip: node:zlib,
 * xz: ./xz.ts), parse the resulting ELF (vmlinux.bin) and hand back its PT_LOAD segments and entry point.
 */
import { gunzipSync } from 'node:zlib';
import { KvmkitError } from '@kvmkit/kernel';
import { DECOMPRESS_ERROR, xzDecompress } from './xz.js';
import { imageError, hex } from './errors.js';
import { ELF_MAGIC, PT_LOAD, segmentSpan, type ElfSegment } from './elf.js';

/** Setup header fields (protocol 2.08+): offset of the payload from the protected-mode code, and its length. */
export const HDR_PAYLOAD_OFFSET = 0x248;
export const HDR_PAYLOAD_LENGTH = 0x24c;

export type PayloadFormat = 'gzip' | 'xz' | 'bzip2' | 'lzma' | 'lzo' | 'lz4' | 'zstd' | 'unknown';
/** Payload formats boot-linux decompresses on the host. */
export const HOST_FORMATS: readonly PayloadFormat[] = ['gzip', 'xz'];

/** Identifies a kernel payload by its magic (the formats of arch/x86/boot/compressed/Makefile). */
export function payloadFormat(p: Uint8Array): PayloadFormat {
  const m = (...bytes: number[]) => p.length >= bytes.length && bytes.every((b, i) => p[i] === b);
  if (m(0x1f, 0x8b)) return 'gzip';
  if (m(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) return 'xz';
  if (m(0x42, 0x5a, 0x68)) return 'bzip2';
  if (m(0x5d, 0x00, 0x00)) return 'lzma';
  if (m(0x89, 0x4c, 0x5a, 0x4f)) return 'lzo';
  if (m(0x02, 0x21, 0x4c, 0x18)) return 'lz4';
  if (m(0x28, 0xb5, 0x2f, 0xfd)) return 'zstd';
  return 'unknown';
}

/** Locates the payload inside a bzImage (kernelOffset = start of the protected-mode code in the file). */
export function findPayload(img: Uint8Array, kernelOffset: number, kernelSize: number, version: number, path: string): Uint8Array {
  if (version < 0x0208) {
    throw imageError(path, 'old-protocol', `boot protocol ${hex(version)} has no payload_offset (2.08+): cannot decompress on the host`, { version: hex(version) });
  }
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  const off = dv.getUint32(HDR_PAYLOAD_OFFSET, true);
  const len = dv.getUint32(HDR_PAYLOAD_LENGTH, true);
  if (len === 0 || off + len > kernelSize) {
    throw imageError(path, 'bad-header', `payload ${hex(off)}+${hex(len)} lies outside the ${hex(kernelSize)}-byte protected-mode kernel`, {
      payloadOffset: hex(off),
      payloadLength: len,
    });
  }
  return img.subarray(kernelOffset + off, kernelOffset + off + len);
}

export interface DecompressResult {
  format: PayloadFormat;
  data: Uint8Array;
  ms: number;
}

/** Decompresses a gzip or xz payload, at most `maxOutput` bytes; any failure is KVMKIT_ERR_BOOT_DECOMPRESS. */
export function decompressPayload(payload: Uint8Array, maxOutput: number, path: string): DecompressResult {
  const format = payloadFormat(payload);
  const t0 = performance.now();
  // Every format the kernel builds ends with the uncompressed size (gzip's ISIZE, or size_append): a hint only.
  const hint = payload.length >= 4 ? new DataView(payload.buffer, payload.byteOffset + payload.length - 4, 4).getUint32(0, true) : 0;
  let data: Uint8Array;
  if (format === 'xz') {
    // The kernel's decoder reads one stream; what follows (the 4-byte size) is not xz data.
    data = xzDecompress(payload, { maxOutput, singleStream: true, ...(hint > 0 && hint <= maxOutput ? { sizeHint: hint } : {}) }).data;
  } else if (format === 'gzip') {
    try {
      const b = gunzipSync(payload, { maxOutputLength: Math.max(1, maxOutput) });
      data = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const tooLarge = code === 'ERR_BUFFER_TOO_LARGE' || e instanceof RangeError;
      throw new KvmkitError(DECOMPRESS_ERROR, `${path}: gzip payload: ${tooLarge ? `decompressed data exceeds ${maxOutput} bytes` : (e as Error).message}`, {
        cause: e,
        details: { path, format, reason: tooLarge ? 'too-large' : 'corrupt-data', zlib: code },
      });
    }
  } else {
    throw new KvmkitError(DECOMPRESS_ERROR, `${path}: the kernel payload is ${format === 'unknown' ? 'in an unknown format' : `${format}-compressed`}; host decompression supports ${HOST_FORMATS.join(', ')} (use decompress: 'guest')`, {
      details: { path, format, reason: 'unsupported-format' },
    });
  }
  return { format, data, ms: performance.now() - t0 };
}

/** A PT_LOAD segment of the decompressed kernel (same shape as a PVH ELF's). */
export type VmlinuxSegment = ElfSegment;

export interface VmlinuxInfo {
  entry: bigint;
  segments: VmlinuxSegment[];
  low: bigint;
  high: bigint;
}

const TWO_MIB = 0x200000n;

/**
 * Parses the decompressed kernel (vmlinux.bin: ELF64 x86-64) the way parse_elf() in
 * arch/x86/boot/compressed/misc.c does: PT_LOAD segments, 2 MiB-aligned p_align, entry e_entry.
 */
export function parseVmlinux(img: Uint8Array, path: string): VmlinuxInfo {
  const size = img.byteLength;
  const what = `${path} (decompressed payload)`;
  if (size < 64) throw imageError(what, 'truncated', `the decompressed kernel is ${size} bytes, too short for an ELF64 header`, { size });
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  if (dv.getUint32(0, true) !== ELF_MAGIC) throw imageError(what, 'unknown-format', 'the decompressed kernel is not an ELF file');
  if (img[4] !== 2) throw imageError(what, 'elf-class', 'the decompressed kernel is not ELF64', { class: img[4] });
  if (img[5] !== 1) throw imageError(what, 'elf-endian', 'the decompressed kernel is not little-endian');
  const machine = dv.getUint16(18, true);
  if (machine !== 62) throw imageError(what, 'elf-machine', `the decompressed kernel has e_machine ${machine}, not x86-64 (62)`, { machine });
  if (dv.getUint16(16, true) !== 2) throw imageError(what, 'elf-type', 'the decompressed kernel is not ET_EXEC');
  const entry = dv.getBigUint64(24, true);
  const phoff = Number(dv.getBigUint64(32, true));
  const phentsize = dv.getUint16(54, true);
  const phnum = dv.getUint16(56, true);
  if (phnum === 0 || phentsize < 56) throw imageError(what, 'bad-segment', `bad program header table (${phnum} × ${phentsize})`);
  if (!Number.isSafeInteger(phoff) || phoff + phnum * phentsize > size) throw imageError(what, 'truncated', 'program headers lie outside the decompressed kernel', { size });
  const segments: VmlinuxSegment[] = [];
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * phentsize;
    if (dv.getUint32(p, true) !== PT_LOAD) continue;
    const offset = Number(dv.getBigUint64(p + 8, true));
    const paddr = dv.getBigUint64(p + 24, true);
    const filesz = Number(dv.getBigUint64(p + 32, true));
    const memsz = Number(dv.getBigUint64(p + 40, true));
    const align = dv.getBigUint64(p + 48, true);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(filesz) || offset + filesz > size) {
      throw imageError(what, 'truncated', `segment ${i} (${hex(offset)}+${hex(filesz)}) lies outside the ${size}-byte decompressed kernel`, { segment: i, size });
    }
    if (!Number.isSafeInteger(memsz) || memsz < filesz) throw imageError(what, 'bad-segment', `segment ${i}: p_memsz < p_filesz`, { segment: i });
    if (align % TWO_MIB !== 0n) throw imageError(what, 'bad-segment', `segment ${i}: p_align ${hex(align)} is not a multiple of 2 MiB`, { segment: i });
    if (paddr + BigInt(memsz) > 1n << 46n) throw imageError(what, 'bad-segment', `segment ${i} at ${hex(paddr)} is out of range`, { segment: i });
    if (memsz > 0) segments.push({ offset, filesz, paddr, memsz });
  }
  if (segments.length === 0) throw imageError(what, 'bad-segment', 'the decompressed kernel has no PT_LOAD segment');
  const { low, high } = segmentSpan(segments);
  if (!segments.some((s) => entry >= s.paddr && entry < s.paddr + BigInt(s.filesz))) {
    throw imageError(what, 'bad-segment', `entry ${hex(entry)} lies outside the loaded segments`, { entry: hex(entry) });
  }
  return { entry, segments, low, high };
}
