/**
 * Main-thread fd readiness without a libuv threadpool thread per fd.
 *
 * `watchFd(fd, onReadable)` puts a `uv_poll_t` on Node's own default loop (reached through koffi, see
 * kvm/ffi.ts "fdwatch (uv_poll)"): the fd joins libuv's epoll set and `onReadable` runs on the main thread,
 * in the poll phase, when the fd becomes readable. Level-triggered: the callback must drain the fd (e.g.
 * `EventFd.drain()`), or it is called again on the next loop iteration.
 *
 * Lifetime: `close()` stops the poll at once (no callback runs after it returns) and hands the handle to
 * `uv_close`; its memory is freed from the close callback, which libuv runs on a later loop iteration. The fd
 * itself is not owned and not closed: close the watch first, then the fd.
 *
 * Only the main thread may call `watchFd` (uv_default_loop() is the main thread's loop; a worker would get
 * its callbacks on the wrong thread).
 */
import { isMainThread } from 'node:worker_threads';
import * as ffi from './kvm/ffi.js';
import { KvmkitError } from './errors.js';

export interface FdWatch {
  /** The watched fd. */
  readonly fd: number;
  /** Stops watching; idempotent. No callback runs after it returns. */
  close(): void;
  /** Whether the watch keeps the Node process alive (default true, like a socket). */
  ref(): void;
  unref(): void;
  /** Stops (false) or restarts (true) polling without giving the handle up, e.g. while a device has no buffers. */
  setActive(active: boolean): void;
  readonly active: boolean;
  readonly closed: boolean;
}

export interface WatchOptions {
  /** Keep the event loop alive while watching (default true). */
  ref?: boolean;
  /** Called with an error thrown by `onReadable` or a poll error; default: rethrown asynchronously. */
  onError?: (err: unknown) => void;
}

interface Entry {
  fd: number;
  onReadable: () => void;
  onError: ((err: unknown) => void) | undefined;
  closed: boolean;
  active: boolean;
}

const live = new Map<bigint, Entry>();
/** Handles in uv_close, waiting for their close callback (kept so their memory can be freed exactly once). */
const closing = new Set<bigint>();
let installed = false;

function install(): void {
  if (installed) return;
  installed = true;
  ffi.uvSetDispatch(onPoll, onClose);
}

function report(e: Entry, err: unknown): void {
  if (e.onError) {
    try {
      e.onError(err);
      return;
    } catch (err2) {
      err = err2;
    }
  }
  // Never let an exception unwind into libuv through the koffi trampoline.
  setImmediate(() => {
    throw err;
  });
}

function onPoll(handle: bigint, status: number, _events: number): void {
  const e = live.get(handle);
  if (!e || e.closed || !e.active) return;
  if (status < 0) {
    report(e, new KvmkitError('KVMKIT_ERR_SYSCALL', `uv_poll on fd ${e.fd} failed: ${ffi.uvStrerror(status)}`, { details: { fd: e.fd, status } }));
    return;
  }
  try {
    e.onReadable();
  } catch (err) {
    report(e, err);
  }
}

function onClose(handle: bigint): void {
  if (!closing.delete(handle)) return;
  ffi.uvPollFree(handle);
}

/** Calls `onReadable` on the main thread whenever `fd` is readable. */
export function watchFd(fd: number, onReadable: () => void, opts: WatchOptions = {}): FdWatch {
  if (!isMainThread) {
    throw new KvmkitError('KVMKIT_ERR_UNSUPPORTED', 'watchFd works on the main thread only (it uses uv_default_loop())');
  }
  if (!Number.isInteger(fd) || fd < 0) throw new KvmkitError('KVMKIT_ERR_SYSCALL', `watchFd: bad fd ${fd}`, { details: { fd } });
  install();
  const opened = ffi.uvPollOpen(fd);
  if ('error' in opened) {
    throw new KvmkitError('KVMKIT_ERR_SYSCALL', `uv_poll_init(fd ${fd}) failed: ${ffi.uvStrerror(opened.error)}`, { details: { fd, status: opened.error } });
  }
  const handle = opened.handle;
  const entry: Entry = { fd, onReadable, onError: opts.onError, closed: false, active: true };
  live.set(handle, entry);
  const r = ffi.uvPollStart(handle, ffi.UV_READABLE);
  if (r < 0) {
    live.delete(handle);
    closing.add(handle);
    ffi.uvCloseHandle(handle);
    throw new KvmkitError('KVMKIT_ERR_SYSCALL', `uv_poll_start(fd ${fd}) failed: ${ffi.uvStrerror(r)}`, { details: { fd, status: r } });
  }
  if (opts.ref === false) ffi.uvRef(handle, false);
  return {
    fd,
    get closed() {
      return entry.closed;
    },
    ref() {
      if (!entry.closed) ffi.uvRef(handle, true);
    },
    unref() {
      if (!entry.closed) ffi.uvRef(handle, false);
    },
    get active() {
      return entry.active && !entry.closed;
    },
    setActive(active: boolean) {
      if (entry.closed || entry.active === active) return;
      entry.active = active;
      if (!active) {
        ffi.uvPollStop(handle);
        return;
      }
      const r = ffi.uvPollStart(handle, ffi.UV_READABLE);
      if (r < 0) {
        entry.active = false;
        throw new KvmkitError('KVMKIT_ERR_SYSCALL', `uv_poll_start(fd ${fd}) failed: ${ffi.uvStrerror(r)}`, { details: { fd, status: r } });
      }
    },
    close() {
      if (entry.closed) return;
      entry.closed = true;
      live.delete(handle);
      ffi.uvPollStop(handle);
      closing.add(handle);
      ffi.uvCloseHandle(handle);
    },
  };
}

/** Number of uv_poll handles alive or still closing (for leak tests). */
export function fdWatchCount(): { live: number; closing: number } {
  return { live: live.size, closing: closing.size };
}

/**
 * A non-blocking, close-on-exec eventfd. `signal(n)` adds n to the counter (any thread may write the fd);
 * `drain()` reads and resets it, returning the count (0n when nothing was pending).
 */
export class EventFd {
  readonly fd: number;
  private readonly buf = Buffer.alloc(8);
  private readonly out = Buffer.alloc(8);
  private isClosed = false;

  constructor(initval = 0) {
    this.fd = ffi.eventfd(initval);
  }

  static create(initval = 0): EventFd {
    return new EventFd(initval);
  }

  signal(n: bigint | number = 1n): void {
    if (this.isClosed) throw new KvmkitError('KVMKIT_ERR_STATE', 'eventfd is closed');
    this.out.writeBigUInt64LE(BigInt(n));
    const r = ffi.writeFd(this.fd, this.out, 8);
    if (r < 0 && r !== -11) throw new KvmkitError('KVMKIT_ERR_SYSCALL', `eventfd write failed: errno ${-r}`, { details: { errno: -r } });
  }

  drain(): bigint {
    if (this.isClosed) return 0n;
    const r = ffi.readFd(this.fd, this.buf, 8);
    if (r === 8) return this.buf.readBigUInt64LE(0);
    if (r === -11) return 0n; // EAGAIN: nothing pending
    throw new KvmkitError('KVMKIT_ERR_SYSCALL', `eventfd read failed: errno ${-r}`, { details: { errno: -r } });
  }

  get closed(): boolean {
    return this.isClosed;
  }

  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    ffi.closeFd(this.fd);
  }
}
