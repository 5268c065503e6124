/**
 * The control block shared by an I/O thread (iothread-worker.ts) and its main-thread owner (iothread.ts): an
 * Int32Array over a SharedArrayBuffer. Dependency-free so both sides import it cheaply.
 *
 * Ownership of the rings is one word, STATE, moved only with compareExchange:
 *   IDLE (main owns) --main: start--> RUN_REQ --worker--> RUNNING (worker owns)
 *   RUN_REQ --main: stop--> IDLE (the worker never started that session)
 *   RUNNING --main: stop--> STOP_REQ (+ the stop eventfd) --worker: indexes written back--> IDLE
 *   RUNNING --worker: failure (indexes written back, FAILED set)--> IDLE
 *   IDLE --main: close--> EXIT;  any --worker exits--> DEAD
 * The queue programming travels main → worker in the queue slots before RUN_REQ, the indexes come back in the
 * same slots before IDLE, so the main thread's Virtqueues are exact whenever it owns the rings.
 */
export const ST = { IDLE: 0, RUN_REQ: 1, RUNNING: 2, STOP_REQ: 3, EXIT: 4, DEAD: 5 } as const;

export const CTL = {
  STATE: 0,
  /** 1 after the worker found a guest or device error and gave the rings back (main: needs reset). */
  FAILED: 1,
  FEATURES_LO: 2,
  FEATURES_HI: 3,
  /** bit 0: VIRTIO_F_RING_INDIRECT_DESC, bit 1: VIRTIO_F_RING_EVENT_IDX. */
  RING_FLAGS: 4,
  /** Sessions started by the worker (counter). */
  SESSIONS: 5,
  /** poll() wake-ups (counter). */
  WAKEUPS: 6,
  /** Chains found by the busy-poll loop (counter). */
  POLL_HITS: 7,
  /** Busy-poll window in µs (main may change it between sessions). */
  POLL_US: 8,
  /** With STOP_REQ: 1 = serve the chains pending at the request first (pause), 0 = stop after the current one. */
  STOP_DRAIN: 9,
  /** First queue slot. */
  QUEUES: 16,
} as const;

/** Fields of one queue slot. */
export const QS = {
  READY: 0,
  SIZE: 1,
  DESC_LO: 2,
  DESC_HI: 3,
  DRIVER_LO: 4,
  DRIVER_HI: 5,
  DEVICE_LO: 6,
  DEVICE_HI: 7,
  LAST_AVAIL: 8,
  USED_IDX: 9,
  SIGNALLED_USED: 10,
} as const;
export const QUEUE_SLOT = 12;

export function ctlWords(queues: number): number {
  return CTL.QUEUES + QUEUE_SLOT * queues;
}

/** Messages the I/O thread posts to its owner. */
export type IoThreadMessage =
  | { t: 'log'; level: 'debug' | 'info' | 'warn' | 'error'; obj: Record<string, unknown>; msg: string }
  | { t: 'needsReset'; reason: string; error?: { message: string; code?: string } }
  | { t: 'irq' }
  | { t: 'configChanged' }
  | { t: 'ready' };
