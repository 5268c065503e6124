/**
 * The one table of kvmkit error codes. Every error kvmkit raises is a `KvmkitError` whose `code` is a key
 * of this table; plugins add their own codes through `defineErrorCodes` (prefix `KVMKIT_ERR_`).
 */
export const ErrorCodes = {
  KVMKIT_ERR_KVM_UNAVAILABLE: '/dev/kvm is missing or cannot be opened',
  KVMKIT_ERR_KVM_API_VERSION: 'KVM API version is not 12',
  KVMKIT_ERR_KVM_CAPABILITY: 'a required KVM capability is missing',
  KVMKIT_ERR_IOCTL: 'a KVM ioctl failed',
  KVMKIT_ERR_SYSCALL: 'a system call failed',
  KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS: 'a guest physical address range is outside guest RAM',
  KVMKIT_ERR_MEMORY_LAYOUT: 'the guest memory layout is invalid',
  KVMKIT_ERR_MEMORY_CLOSED: 'guest memory was released',
  KVMKIT_ERR_BUS_RANGE: 'a bus range is invalid (zero length or overflow)',
  KVMKIT_ERR_BUS_OVERLAP: 'a bus range overlaps an existing device',
  KVMKIT_ERR_PLUGIN_DUPLICATE: 'two plugins have the same name',
  KVMKIT_ERR_PLUGIN_VERSION: 'a plugin does not support this kernel version',
  KVMKIT_ERR_PLUGIN_DEPENDENCY: 'a plugin dependency is missing',
  KVMKIT_ERR_PLUGIN_CONFLICT: 'two plugins provide the same exclusive capability',
  KVMKIT_ERR_PLUGIN_OPTIONS: 'plugin options are invalid',
  KVMKIT_ERR_PLUGIN_INVALID: 'an object is not a valid plugin',
  KVMKIT_ERR_PLUGIN_NOT_FOUND: 'a plugin package or name could not be resolved',
  KVMKIT_ERR_PLUGIN_HOOK: 'a plugin threw inside a hook',
  KVMKIT_ERR_CONFIG: 'the machine configuration is invalid',
  KVMKIT_ERR_CONFIG_NOT_FOUND: 'no kvmkit configuration file was found',
  KVMKIT_ERR_CONFIG_HOST: 'no host section matches this host',
  KVMKIT_ERR_STATE: 'the machine is not in a state that allows this operation',
  KVMKIT_ERR_NO_FIRMWARE: 'no boot plugin prepared the vCPUs',
  KVMKIT_ERR_GUEST_SHUTDOWN: 'the guest triple-faulted (KVM_EXIT_SHUTDOWN)',
  KVMKIT_ERR_GUEST_INTERNAL: 'KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR)',
  KVMKIT_ERR_GUEST_FAIL_ENTRY: 'KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY)',
  KVMKIT_ERR_GUEST_UNHANDLED_EXIT: 'a vCPU exit had no handler',
  KVMKIT_ERR_GUEST_CRASH: 'the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)',
  KVMKIT_ERR_VCPU_WORKER: 'a vCPU worker thread failed',
  KVMKIT_ERR_TIMEOUT: 'an operation timed out',
  KVMKIT_ERR_IMAGE: 'a guest image (kernel, initrd, firmware) is invalid',
  KVMKIT_ERR_STATE_FORMAT: 'a saved state is invalid, truncated or incompatible',
  KVMKIT_ERR_UNSUPPORTED: 'the operation is not supported on this host',
} as const;

export type ErrorCode = keyof typeof ErrorCodes | `KVMKIT_ERR_${string}`;

export interface KvmkitErrorOptions {
  cause?: unknown;
  details?: Record<string, unknown>;
}

export class KvmkitError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;
  constructor(code: ErrorCode, message: string, opts: KvmkitErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'KvmkitError';
    this.code = code;
    this.details = opts.details ?? {};
  }
  toJSON(): Record<string, unknown> {
    return { name: this.name, code: this.code, message: this.message, details: this.details };
  }
}

export function isKvmkitError(e: unknown, code?: ErrorCode): e is KvmkitError {
  return e instanceof KvmkitError || (typeof e === 'object' && e !== null && (e as { name?: unknown }).name === 'KvmkitError' && typeof (e as { code?: unknown }).code === 'string')
    ? code === undefined || (e as KvmkitError).code === code
    : false;
}

/** Wraps any thrown value into a KvmkitError with `code`, keeping an existing KvmkitError as is. */
export function toKvmkitError(e: unknown, code: ErrorCode, message?: string): KvmkitError {
  if (e instanceof KvmkitError) return e;
  const msg = message ?? (e instanceof Error ? e.message : String(e));
  return new KvmkitError(code, msg, { cause: e });
}

/** Re-creates a KvmkitError that crossed a thread boundary as a plain object. */
export function reviveError(o: unknown): Error {
  if (o && typeof o === 'object' && typeof (o as { code?: unknown }).code === 'string') {
    const x = o as { code: ErrorCode; message?: string; details?: Record<string, unknown> };
    return new KvmkitError(x.code, x.message ?? x.code, { details: x.details ?? {} });
  }
  if (o instanceof Error) return o;
  return new Error(String(o));
}

export function errnoName(errno: number): string {
  const names: Record<number, string> = {
    1: 'EPERM', 2: 'ENOENT', 4: 'EINTR', 5: 'EIO', 9: 'EBADF', 11: 'EAGAIN', 12: 'ENOMEM', 13: 'EACCES',
    14: 'EFAULT', 16: 'EBUSY', 17: 'EEXIST', 19: 'ENODEV', 22: 'EINVAL', 24: 'EMFILE', 25: 'ENOTTY',
    28: 'ENOSPC', 34: 'ERANGE', 38: 'ENOSYS', 95: 'EOPNOTSUPP', 7: 'E2BIG', 6: 'ENXIO',
  };
  return names[errno] ?? `errno ${errno}`;
}
