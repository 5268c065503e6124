import { KvmkitError } from '@kvmkit/kernel';

/**
 * Error codes raised by boot-linux, all before any vCPU runs. `KVMKIT_ERR_IMAGE` is the kernel's shared code
 * for invalid guest images; `details.reason` says what is wrong (see README).
 */
export const BootLinuxErrors = {
  /** A kernel or initrd file is missing or unreadable. details: { path, role, errno } */
  FILE: 'KVMKIT_ERR_BOOT_LINUX_FILE',
  /** The kernel image is invalid. details: { path, reason, … } */
  IMAGE: 'KVMKIT_ERR_IMAGE',
  /** Guest RAM cannot hold the kernel and the boot tables. details: { need, have, … } */
  MEMORY: 'KVMKIT_ERR_BOOT_LINUX_MEMORY',
  /** The initrd does not fit between the kernel and the initrd address limit. details: { size, low, high } */
  INITRD: 'KVMKIT_ERR_BOOT_LINUX_INITRD',
  /** The command line is longer than the kernel accepts. details: { length, max } */
  CMDLINE: 'KVMKIT_ERR_BOOT_LINUX_CMDLINE',
  /** Host decompression of a bzImage payload failed: corrupt/truncated data, unsupported format or filter, output larger than RAM. details: { format, reason, … } */
  DECOMPRESS: 'KVMKIT_ERR_BOOT_DECOMPRESS',
} as const;

/** Reasons carried in `details.reason` of KVMKIT_ERR_IMAGE. */
export type ImageErrorReason =
  | 'truncated'
  | 'unknown-format'
  | 'not-bzimage'
  | 'old-protocol'
  | 'not-64bit'
  | 'bad-header'
  | 'elf-class'
  | 'elf-machine'
  | 'elf-endian'
  | 'elf-type'
  | 'no-pvh-note'
  | 'bad-segment';

export function imageError(path: string, reason: ImageErrorReason, message: string, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError(BootLinuxErrors.IMAGE, `${path}: ${message}`, { details: { path, reason, ...details } });
}

export const hex = (n: number | bigint): string => `0x${n.toString(16)}`;
