/**
 * The shared-memory protocol between the main thread and a vCPU worker.
 *
 * ctrl (Int32Array over a SharedArrayBuffer, one per vCPU):
 *   [CMD]    main → worker: CMD_RUN | CMD_PAUSE | CMD_STOP
 *   [STATE]  worker → main: ST_STARTING | ST_RUNNING | ST_PAUSED | ST_PARKED | ST_DONE
 *   [EXITS]  number of KVM exits (wraps), [EXITS_MAIN] exits forwarded to the main thread
 *
 * mailbox (one per vCPU): an exit the worker cannot answer itself is written here and handed to the main
 * thread. mb[MB_STATE] = MB_IDLE → MB_REQUEST (worker, then Atomics.notify) → MB_RESPONSE (main, notify) → MB_IDLE.
 * Data bytes live at byte offset MB_DATA (up to MB_DATA_SIZE: a string PIO exit moves at most one page).
 */
export const CMD = 0;
export const STATE = 1;
export const EXITS = 2;
export const EXITS_MAIN = 3;
export const CTRL_INTS = 8;

export const CMD_RUN = 0;
export const CMD_PAUSE = 1;
export const CMD_STOP = 2;

export const ST_STARTING = 0;
export const ST_RUNNING = 1;
export const ST_PAUSED = 2;
/** Halted for good (HLT without irqchip, or a stop decision): waiting for CMD_STOP. */
export const ST_PARKED = 3;
export const ST_DONE = 4;

export const MB_STATE = 0;
export const MB_KIND = 1;
export const MB_ADDR_LO = 2;
export const MB_ADDR_HI = 3;
export const MB_SIZE = 4;
export const MB_COUNT = 5;
/** For MB_KIND_EXIT: the KVM exit reason; the response action is written to MB_ACTION. */
export const MB_REASON = 6;
export const MB_ACTION = 7;
export const MB_DATA = 64;
export const MB_DATA_SIZE = 4096 + 64;
export const MB_BYTES = MB_DATA + MB_DATA_SIZE;

export const MB_IDLE = 0;
export const MB_REQUEST = 1;
export const MB_RESPONSE = 2;

export const MB_KIND_PIO_IN = 1;
export const MB_KIND_PIO_OUT = 2;
export const MB_KIND_MMIO_READ = 3;
export const MB_KIND_MMIO_WRITE = 4;
/** Any other exit: the raw kvm_run union is copied to MB_DATA (256 bytes). */
export const MB_KIND_EXIT = 5;

export const ACTION_CONTINUE = 0;
/** Stop running this vCPU and wait for CMD_STOP. */
export const ACTION_PARK = 1;

export interface WorkerRange {
  base: number;
  size: number;
  /** Index into the worker handler specs, or -1 when only the main thread handles it. */
  handler: number;
}

export interface WorkerInit {
  index: number;
  fd: number;
  mmapSize: number;
  ctrl: SharedArrayBuffer;
  mailbox: SharedArrayBuffer;
  pio: WorkerRange[];
  mmio: WorkerRange[];
  handlers: Array<{ module: string; exportName?: string; shared?: unknown; kind: 'pio' | 'mmio'; base: number }>;
  /** eventfd the worker signals after posting a request (wake mode 'eventfd'), or -1 (wake mode 'waitAsync'). */
  wakeFd: number;
}

export type WorkerMessage =
  /** The worker's modules (koffi included) are loaded; it waits for its init. */
  | { type: 'loaded' }
  | { type: 'ready'; tid: number; thread: bigint }
  | { type: 'error'; error: { code?: string; message: string; details?: Record<string, unknown> } }
  | { type: 'done' };
