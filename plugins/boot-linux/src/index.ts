import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { KvmkitError, checkOptions, type Plugin, type BootContext, type BootResult } from '@kvmkit/kernel';
import { BootLinuxErrors } from './errors.js';
import { loadLinux, type DecompressMode, type KernelFormat, type LoadLinuxResult } from './loader.js';

export interface BootLinuxOptions {
  /** Path of the kernel: a bzImage or an ELF vmlinux with a PVH note. Relative paths resolve from the cwd. */
  kernel: string;
  /** Path of an initramfs/initrd (optional). */
  initrd?: string;
  /**
   * Extra kernel parameters. The final command line is: other plugins' contributions (devices hook and
   * cmdline taps), then this string, then the machine config's `cmdline` — so a user's config has the last word.
   */
  cmdline?: string;
  /** Image format; 'auto' (default) looks at the file's magic. */
  format?: KernelFormat;
  /**
   * bzImage only: where the compressed kernel inside it is decompressed. 'guest': by the bzImage's own
   * decompressor (entry at startup_64 of the protected-mode code). 'host': here, before any vCPU runs; the
   * kernel ELF's segments are loaded at their physical addresses and entered at its entry point, as the
   * decompressor would (gzip and xz payloads; others are KVMKIT_ERR_BOOT_DECOMPRESS). 'auto' (default): host
   * when the payload is gzip or xz, else guest (logged).
   */
  decompress?: DecompressMode;
}

export const PLUGIN_NAME = 'boot-linux';

function validate(o: unknown): asserts o is BootLinuxOptions {
  const v = checkOptions(PLUGIN_NAME, o, {
    kernel: { type: 'string', required: true },
    initrd: { type: 'string' },
    cmdline: { type: 'string' },
    format: { type: ['auto', 'bzimage', 'pvh'] },
    decompress: { type: ['auto', 'guest', 'host'] },
  });
  if ((v.kernel as string).length === 0) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${PLUGIN_NAME}: option kernel must not be empty`, { details: { plugin: PLUGIN_NAME, key: 'kernel' } });
  }
}

async function readImage(path: string, role: 'kernel' | 'initrd'): Promise<Uint8Array> {
  const abs = resolve(path);
  try {
    const b = await readFile(abs);
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    throw new KvmkitError(BootLinuxErrors.FILE, `boot-linux: cannot read ${role} ${abs}: ${errno ?? (e as Error).message}`, {
      cause: e,
      details: { path: abs, role, errno },
    });
  }
}

/**
 * Loads the kernel, initrd, cmdline and boot tables for `ctx` and returns the BootResult. Exported for
 * callers that drive the boot hook themselves (tests, tools).
 */
export async function prepareLinuxBoot(ctx: BootContext, options: BootLinuxOptions): Promise<BootResult & { details: LoadLinuxResult }> {
  const [kernel, initrd] = await Promise.all([
    readImage(options.kernel, 'kernel'),
    options.initrd !== undefined ? readImage(options.initrd, 'initrd') : Promise.resolve(undefined),
  ]);
  const r = loadLinux({
    memory: ctx.memory,
    layout: ctx.layout,
    cpus: ctx.cpus,
    cmdline: ctx.cmdline,
    kernel,
    kernelPath: resolve(options.kernel),
    ...(initrd ? { initrd, initrdPath: resolve(options.initrd!) } : {}),
    format: options.format ?? 'auto',
    decompress: options.decompress ?? 'auto',
  });
  const d = r.decompress;
  if (d?.mode === 'host') {
    ctx.log.info({ format: d.format, compressed: d.compressedBytes, decompressed: d.decompressedBytes, ms: Math.round(d.ms! * 10) / 10 }, 'bzImage payload decompressed on the host');
  } else if (d) {
    ctx.log.info({ format: d.format, reason: d.reason }, 'bzImage payload left to the guest decompressor');
  }
  ctx.log.info({
    loader: r.loader,
    kernel: `0x${r.kernel.start.toString(16)}-0x${r.kernel.end.toString(16)}`,
    entry: `0x${r.kernel.entry.toString(16)}`,
    initrd: r.initrd ? `0x${r.initrd.addr.toString(16)}+${r.initrd.size}` : undefined,
    cpus: ctx.cpus,
    cmdline: ctx.cmdline,
  }, 'linux kernel loaded');
  return { loader: r.loader, vcpus: [r.bsp], details: r };
}

/** Boots Linux: bzImage (64-bit boot protocol) or ELF vmlinux (PVH entry), with an MP table for SMP. */
export default function bootLinux(options: BootLinuxOptions): Plugin {
  return {
    name: PLUGIN_NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    provides: ['firmware'],
    options,
    validateOptions: validate,
    apply(machine, { options: raw }) {
      validate(raw);
      const opts = raw;
      if (opts.cmdline !== undefined && opts.cmdline.trim() !== '') {
        // A late stage puts our parameters after every other plugin's; the kernel appends config.cmdline last.
        machine.hooks.cmdline.tap({ name: PLUGIN_NAME, stage: 1000 }, (parts) => [...parts, opts.cmdline!.trim()]);
      }
      machine.hooks.boot.tapPromise(PLUGIN_NAME, async (ctx) => {
        const { loader, vcpus } = await prepareLinuxBoot(ctx, opts);
        return { loader, vcpus };
      });
    },
  };
}

export { bootLinux, loadLinux };
export { detectFormat, HVM_START_MAGIC, PVH_CMDLINE_MAX } from './loader.js';
export { xzDecompress, isXz, crc32, crc64, bcjX86Decode, xzError, DECOMPRESS_ERROR, XZ_CHECK_NONE, XZ_CHECK_CRC32, XZ_CHECK_CRC64, XZ_CHECK_SHA256 } from './xz.js';
export { payloadFormat, findPayload, decompressPayload, parseVmlinux, HOST_FORMATS, HDR_PAYLOAD_OFFSET, HDR_PAYLOAD_LENGTH } from './payload.js';
export { parseBzImage, looksLikeBzImage } from './bzimage.js';
export { parsePvhElf, looksLikeElf, XEN_ELFNOTE_PHYS32_ENTRY } from './elf.js';
export { buildE820, writeMpTable, mpTableSize, checksum, ADDR, IOAPIC_ADDR, LAPIC_ADDR, E820_RAM, E820_RESERVED } from './tables.js';
export { BootLinuxErrors } from './errors.js';
export type { KernelFormat, DecompressMode, DecompressInfo, LoadLinuxInput, LoadLinuxResult } from './loader.js';
export type { XzDecodeOptions, XzDecodeResult, XzErrorReason } from './xz.js';
export type { PayloadFormat, DecompressResult, VmlinuxInfo, VmlinuxSegment } from './payload.js';
export type { BzImageInfo } from './bzimage.js';
export type { PvhElfInfo, ElfSegment } from './elf.js';
export type { E820Entry } from './tables.js';
export type { ImageErrorReason } from './errors.js';
