/**
 * Why a vCPU left KVM_RUN, as a closed tagged union. Each variant names its KVM_EXIT_* reason.
 * Exits dispatched to PIO/MMIO buses never reach plugins through this type; it is what the
 * `unhandledExit` hook and stop reasons see.
 */
export type VcpuExit =
  /** KVM_EXIT_IO, direction in. `data` has size*count bytes to fill. */
  | { kind: 'io-in'; port: number; size: number; count: number }
  /** KVM_EXIT_IO, direction out. */
  | { kind: 'io-out'; port: number; size: number; count: number; data: Uint8Array }
  /** KVM_EXIT_MMIO, read. */
  | { kind: 'mmio-read'; addr: bigint; len: number }
  /** KVM_EXIT_MMIO, write. */
  | { kind: 'mmio-write'; addr: bigint; len: number; data: Uint8Array }
  /** KVM_EXIT_HLT (only without an in-kernel LAPIC). */
  | { kind: 'hlt' }
  /** KVM_EXIT_SHUTDOWN: triple fault. */
  | { kind: 'shutdown' }
  /** KVM_EXIT_SYSTEM_EVENT: type is KVM_SYSTEM_EVENT_SHUTDOWN(1)/RESET(2)/CRASH(3)/… */
  | { kind: 'system-event'; type: number; data: bigint[] }
  /** KVM_EXIT_FAIL_ENTRY */
  | { kind: 'fail-entry'; reason: bigint; cpu: number }
  /** KVM_EXIT_INTERNAL_ERROR; suberror 1 = emulation failure. */
  | { kind: 'internal-error'; suberror: number; data: bigint[] }
  /** KVM_EXIT_DEBUG */
  | { kind: 'debug' }
  /** KVM_EXIT_INTR: KVM_RUN interrupted by a signal (pause/stop kick). */
  | { kind: 'intr' }
  /** Any other KVM_EXIT_* number. */
  | { kind: 'unknown'; reason: number };

/** What an `unhandledExit` tap decides. */
export type ExitAction = 'continue' | 'stop';

export const KVM_EXIT = {
  UNKNOWN: 0, EXCEPTION: 1, IO: 2, HYPERCALL: 3, DEBUG: 4, HLT: 5, MMIO: 6, IRQ_WINDOW_OPEN: 7, SHUTDOWN: 8,
  FAIL_ENTRY: 9, INTR: 10, SET_TPR: 11, TPR_ACCESS: 12, NMI: 16, INTERNAL_ERROR: 17, OSI: 18, SYSTEM_EVENT: 24,
} as const;

export const KVM_SYSTEM_EVENT = { SHUTDOWN: 1, RESET: 2, CRASH: 3 } as const;
