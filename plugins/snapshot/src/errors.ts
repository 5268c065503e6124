import { KvmkitError } from '@kvmkit/kernel';

/** Error codes raised by @kvmkit/plugin-snapshot (documented in the README). */
export const SnapshotErrorCodes = {
  KVMKIT_ERR_SNAPSHOT_NOT_FOUND: 'a snapshot file (state, memory or a parent) does not exist',
  KVMKIT_ERR_SNAPSHOT_MAGIC: 'the file is not a kvmkit snapshot state file (bad magic)',
  KVMKIT_ERR_SNAPSHOT_VERSION: 'the snapshot format version is not supported by this kvmkit',
  KVMKIT_ERR_SNAPSHOT_TRUNCATED: 'a snapshot file is shorter (or longer) than its header or state file says',
  KVMKIT_ERR_SNAPSHOT_CHECKSUM: 'a snapshot file does not match its sha256 (corrupt)',
  KVMKIT_ERR_SNAPSHOT_FORMAT: 'the snapshot body is malformed',
  KVMKIT_ERR_SNAPSHOT_PARENT: 'a diff snapshot\'s parent is missing or is not the snapshot it was taken on',
  KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH: 'the snapshot was taken on a machine of another shape (memory, vCPUs, plugins)',
  KVMKIT_ERR_SNAPSHOT_HOST_MISMATCH: 'the snapshot was taken on an incompatible host (architecture, CPU vendor/family/model)',
  KVMKIT_ERR_SNAPSHOT_NO_BASE: 'a diff snapshot was requested but no full snapshot is being tracked on this machine',
  KVMKIT_ERR_SNAPSHOT_STRATEGY: 'no snapshot strategy of that name is registered',
  KVMKIT_ERR_SNAPSHOT_IO: 'reading or writing a snapshot file failed (ENOSPC, EIO, permissions …)',
  KVMKIT_ERR_SNAPSHOT_LAZY: 'lazy restore is impossible for this snapshot/layout',
} as const;

export type SnapshotErrorCode = keyof typeof SnapshotErrorCodes;

export function snapErr(code: SnapshotErrorCode, message: string, details: Record<string, unknown> = {}, cause?: unknown): KvmkitError {
  return new KvmkitError(code, message, { details, ...(cause === undefined ? {} : { cause }) });
}

/** Wraps a Node fs error into KVMKIT_ERR_SNAPSHOT_NOT_FOUND / KVMKIT_ERR_SNAPSHOT_IO. */
export function ioErr(e: unknown, what: string, path: string): KvmkitError {
  if (e instanceof KvmkitError) return e;
  const code = (e as NodeJS.ErrnoException)?.code;
  if (code === 'ENOENT') return snapErr('KVMKIT_ERR_SNAPSHOT_NOT_FOUND', `${what}: ${path} does not exist`, { path }, e);
  return snapErr('KVMKIT_ERR_SNAPSHOT_IO', `${what}: ${path}: ${(e as Error)?.message ?? e}`, { path, errno: code }, e);
}
