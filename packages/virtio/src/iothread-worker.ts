/**
 * The I/O thread: a worker_thread that serves a virtio device's queues off the main thread (see iothread.ts for
 * the owner side and iothread-shared.ts for the control block). It imports the device's worker-side module,
 * opens the same guest RAM (`GuestMemory.fromShared`), and while it owns the rings (STATE = RUNNING):
 *   drain every queue with pending chains → optionally busy-poll the avail rings for `pollUs` µs with
 *   VIRTQ_USED_F_NO_NOTIFY set → notifications back on, one more look → block in poll(2) on the queues'
 *   ioeventfds and the stop eventfd.
 * Interrupts: the InterruptStatus bit is set in the transport's shared ISR word (Atomics.or) and the irqfd is
 * written (eventfds are process-wide), or, without an irqfd, the owner is asked to raise the line.
 * Every error is contained: a guest error (malformed chain) or a device error ends the session with the indexes
 * written back and FAILED set (the owner puts the device in DEVICE_NEEDS_RESET); nothing escapes to crash the VMM.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { GuestMemory, ffi, isKvmkitError, type Logger, type SharedMemoryDescriptor } from '@kvmkit/kernel';
import { CTL, QS, QUEUE_SLOT, ST, type IoThreadMessage } from './iothread-shared.js';
import { Virtqueue } from './queue.js';
import type { VirtioDeviceContext } from './device.js';
import type { IoThreadDevice, IoThreadDeviceFactory } from './iothread.js';
import { VIRTIO_MMIO_INT } from './constants.js';

export interface IoThreadWorkerData {
  ctl: SharedArrayBuffer;
  isr: SharedArrayBuffer;
  memory: SharedMemoryDescriptor;
  queueSizes: number[];
  /** Per queue: the notification eventfd (-1: none). */
  notifyFds: number[];
  stopFd: number;
  /** Extra host fds (IoThreadSpec.fds). */
  extraFds: number[];
  /** irqfd (-1: ask the owner to raise the interrupt). */
  irqFd: number;
  module: string;
  exportName: string;
  data: unknown;
  name: string;
  logLevel: number;
}

const LEVELS = { debug: 20, info: 30, warn: 40, error: 50 } as const;

function post(m: IoThreadMessage): void {
  try {
    parentPort?.postMessage(m);
  } catch {
    /* owner gone */
  }
}

function plain(obj: unknown): Record<string, unknown> {
  if (!obj || typeof obj !== 'object') return { value: String(obj) };
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
    if (v instanceof Error) out[k] = { message: v.message, code: (v as { code?: unknown }).code, stack: v.stack };
    else if (typeof v === 'bigint') out[k] = v.toString();
    else if (v === null || ['string', 'number', 'boolean', 'undefined'].includes(typeof v)) out[k] = v;
    else {
      try {
        out[k] = JSON.parse(JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x)));
      } catch {
        out[k] = String(v);
      }
    }
  }
  return out;
}

/** A Logger-shaped object that forwards to the owner's logger (levels below `min` are dropped here). */
function workerLogger(min: number): Logger {
  const level = (l: keyof typeof LEVELS) => (objOrMsg: unknown, msg?: string) => {
    if (LEVELS[l] < min) return;
    if (typeof objOrMsg === 'string') post({ t: 'log', level: l, obj: {}, msg: objOrMsg });
    else post({ t: 'log', level: l, obj: plain(objOrMsg), msg: msg ?? '' });
  };
  const log = {
    debug: level('debug'),
    info: level('info'),
    warn: level('warn'),
    error: level('error'),
    trace: () => {},
    fatal: level('error'),
    child: () => log,
    isLevelEnabled: (l: string) => (LEVELS as Record<string, number>)[l] !== undefined && (LEVELS as Record<string, number>)[l]! >= min,
  };
  return log as unknown as Logger;
}

async function main(d: IoThreadWorkerData): Promise<void> {
  const ctl = new Int32Array(d.ctl);
  const isr = new Int32Array(d.isr);
  // Whatever happens, the owner must never wait for a dead thread.
  process.on('exit', () => {
    Atomics.store(ctl, CTL.STATE, ST.DEAD);
    Atomics.notify(ctl, CTL.STATE);
  });
  const log = workerLogger(d.logLevel);
  const memory = GuestMemory.fromShared(d.memory);
  const queues = d.queueSizes.map((n, i) => new Virtqueue(i, n));
  let driverFeatures = 0n;
  let failure: { reason: string; err?: unknown } | undefined;
  /** Serving the chains pending at a draining stop request (ctx.active stays true meanwhile). */
  let draining = false;
  const irqBuf = Buffer.alloc(8);
  irqBuf.writeBigUInt64LE(1n);
  const drainBuf = Buffer.alloc(8);

  const interrupt = (bits: number) => {
    Atomics.or(isr, 0, bits);
    if (d.irqFd >= 0) {
      const r = ffi.writeFd(d.irqFd, irqBuf, 8);
      if (r < 0 && r !== -11) log.error({ errno: -r }, 'irqfd write failed');
    } else post({ t: 'irq' });
  };

  const ctx: VirtioDeviceContext = {
    memory,
    log,
    get driverFeatures() {
      return driverFeatures;
    },
    hasFeature: (b) => (driverFeatures & (1n << BigInt(b))) !== 0n,
    get active() {
      return failure === undefined && (draining || Atomics.load(ctl, CTL.STATE) === ST.RUNNING) && !memory.isClosed;
    },
    queue: (i) => {
      const q = queues[i];
      if (!q) throw new RangeError(`${d.name}: no queue ${i}`);
      return q;
    },
    signalUsed: (i) => {
      const q = queues[i];
      if (failure === undefined && q && q.ready && q.needsInterrupt()) interrupt(VIRTIO_MMIO_INT.VRING);
    },
    configChanged: () => post({ t: 'configChanged' }),
    needsReset: (reason, err) => {
      failure ??= { reason, err };
    },
  };

  const mod = (await import(d.module)) as Record<string, unknown>;
  const factory = mod[d.exportName] as IoThreadDeviceFactory | undefined;
  if (typeof factory !== 'function') throw new Error(`${d.module} has no export ${d.exportName} (an I/O thread device factory)`);
  const device: IoThreadDevice = await factory(d.data, ctx);
  post({ t: 'ready' });

  // poll(2) set: the queues' notification eventfds, the extra fds still wanted, the stop eventfd (last).
  const notifyFds = d.notifyFds.filter((fd) => fd >= 0);
  const extra = d.extraFds ?? [];
  const extraOn = extra.map(() => true);
  let fds: number[] = [];
  let fdExtra: number[] = []; // poll index - notifyFds.length → extra index
  const rebuild = () => {
    fdExtra = [];
    extra.forEach((_, i) => {
      if (extraOn[i]) fdExtra.push(i);
    });
    fds = [...notifyFds, ...fdExtra.map((i) => extra[i]!), d.stopFd];
  };
  rebuild();
  const drainFd = (fd: number) => void ffi.readFd(fd, drainBuf, 8);
  const extraReady = (i: number) => {
    let keep: boolean | void = true;
    try {
      keep = device.fdReadable?.(i);
    } catch (e) {
      log.error({ err: e, fd: extra[i] }, 'I/O thread fd handler failed');
      failure ??= { reason: `fd handler failed: ${(e as Error).message}`, err: e };
    }
    if (keep === false || !device.fdReadable) {
      extraOn[i] = false;
      rebuild();
    }
  };

  const loadQueues = () => {
    driverFeatures = (BigInt(ctl[CTL.FEATURES_HI]! >>> 0) << 32n) | BigInt(ctl[CTL.FEATURES_LO]! >>> 0);
    const flags = ctl[CTL.RING_FLAGS]!;
    const opts = { indirect: (flags & 1) !== 0, eventIdx: (flags & 2) !== 0 };
    for (const q of queues) {
      const b = CTL.QUEUES + QUEUE_SLOT * q.index;
      q.reset();
      const u64 = (lo: number) => (BigInt(ctl[b + lo + 1]! >>> 0) << 32n) | BigInt(ctl[b + lo]! >>> 0);
      q.size = ctl[b + QS.SIZE]!;
      q.desc = u64(QS.DESC_LO);
      q.driver = u64(QS.DRIVER_LO);
      q.device = u64(QS.DEVICE_LO);
      q.lastAvail = ctl[b + QS.LAST_AVAIL]! & 0xffff;
      q.usedIdx = ctl[b + QS.USED_IDX]! & 0xffff;
      q.signalledUsed = ctl[b + QS.SIGNALLED_USED]! & 0xffff;
      // The owner validated this programming; a failure here is reported like any guest error.
      if (ctl[b + QS.READY]) q.enable(memory, opts);
    }
  };
  const writeBack = () => {
    for (const q of queues) {
      const b = CTL.QUEUES + QUEUE_SLOT * q.index;
      ctl[b + QS.LAST_AVAIL] = q.lastAvail;
      ctl[b + QS.USED_IDX] = q.usedIdx;
      ctl[b + QS.SIGNALLED_USED] = q.signalledUsed;
      q.disable(); // no ring access until the next session
    }
  };
  const running = () => Atomics.load(ctl, CTL.STATE) === ST.RUNNING;
  /** VIRTQ_USED_F_NO_NOTIFY on every ready queue: set while serving or polling (as QEMU does), cleared before sleeping. */
  let suppressed = false;
  const suppress = (on: boolean) => {
    if (suppressed === on) return;
    suppressed = on;
    for (const q of queues) if (q.ready) q.suppressNotifications(on);
  };

  const serve = (q: number): void => {
    try {
      device.processQueue(q);
    } catch (e) {
      const guest = isKvmkitError(e, 'KVMKIT_ERR_VIRTIO_QUEUE') || isKvmkitError(e, 'KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
      if (!guest) log.error({ err: e, queue: q, device: d.name }, 'virtio device error in the I/O thread');
      failure ??= { reason: guest ? `queue ${q}: ${(e as Error).message}` : `device error on queue ${q}`, err: e };
    }
  };
  /** Serves every ready queue with pending chains; true when any had some. */
  const serveAll = (): boolean => {
    let any = false;
    for (const q of queues) {
      if (failure || !running()) return any;
      if (q.ready && q.pending() > 0) {
        any = true;
        suppress(true); // the driver need not notify for what it adds while we serve: the loop picks it up
        serve(q.index);
      }
    }
    return any;
  };

  const session = () => {
    Atomics.add(ctl, CTL.SESSIONS, 1);
    failure = undefined;
    drainFd(d.stopFd);
    try {
      loadQueues();
      for (const fd of notifyFds) drainFd(fd);
      if (extraOn.some((on) => !on)) {
        extraOn.fill(true);
        rebuild();
      }
      // A kick of every ready queue (DRIVER_OK, resume, restore): chains published while nobody served them.
      for (const q of queues) if (q.ready && !failure && running()) serve(q.index);
      suppressed = false;
      while (!failure && running()) {
        let any: boolean;
        try {
          any = serveAll();
        } catch (e) {
          failure ??= { reason: (e as Error).message, err: e };
          break;
        }
        if (any) {
          if (extraOn.some((on) => !on)) {
            // The driver added buffers: wait on the fds a device had set aside again.
            extraOn.fill(true);
            rebuild();
          }
          continue;
        }
        const pollUs = ctl[CTL.POLL_US]!;
        if (pollUs > 0) {
          suppress(true);
          const until = performance.now() + pollUs / 1000;
          let hit = false;
          for (let i = 0; !hit; i++) {
            if ((i & 63) === 63 && (performance.now() >= until || !running())) break;
            for (const q of queues) if (q.ready && q.pending() > 0) hit = true;
          }
          if (hit) {
            Atomics.add(ctl, CTL.POLL_HITS, 1);
            continue;
          }
        }
        // Notifications back on FIRST (NO_NOTIFY cleared; with EVENT_IDX avail_event = last_avail, also when the
        // device stopped at a limit rather than at an empty ring), then one more look: a chain published before
        // the driver saw the re-arm gets no notification (the seq-cst stores order it before the loads).
        suppressed = false;
        let more = false;
        for (const q of queues) if (q.ready && q.rearm()) more = true;
        if (more) continue;
        if (!running()) break;
        let r: number;
        do r = ffi.pollIn(fds, -1);
        while (r === -4); // EINTR
        if (r < 0) {
          failure ??= { reason: `poll failed: errno ${-r}` };
          break;
        }
        Atomics.add(ctl, CTL.WAKEUPS, 1);
        const nq = notifyFds.length;
        let notified = false;
        for (let i = 0; i < nq; i++) {
          if (r & (1 << i)) {
            drainFd(fds[i]!);
            notified = true;
          }
        }
        if (r & (1 << (fds.length - 1))) drainFd(d.stopFd);
        const ready: number[] = [];
        for (let k = 0; k < fdExtra.length; k++) if (r & (1 << (nq + k))) ready.push(fdExtra[k]!);
        for (const i of ready) if (running() && !failure) extraReady(i);
        if (notified && extraOn.some((on) => !on)) {
          // A notification (new buffers, say): wait on the fds a device had set aside again.
          extraOn.fill(true);
          rebuild();
        }
      }
      suppress(false);
      if (!failure && Atomics.load(ctl, CTL.STATE) === ST.STOP_REQ && ctl[CTL.STOP_DRAIN] === 1) {
        // Pause: serve what the driver made available before the request (a bounded count per queue; with the
        // vCPUs paused the rings do not grow anyway), so notified requests complete before the pause.
        draining = true;
        for (const q of queues) {
          if (!q.ready) continue;
          const start = q.lastAvail;
          const want = q.pending();
          while (!failure && q.ready && ((q.lastAvail - start) & 0xffff) < want && q.pending() > 0) serve(q.index);
        }
      }
    } catch (e) {
      failure ??= { reason: `I/O thread error: ${(e as Error).message}`, err: e };
    } finally {
      draining = false;
    }
    writeBack();
    const f = failure;
    if (f) {
      Atomics.store(ctl, CTL.FAILED, 1);
      const code = f.err instanceof Error ? (f.err as unknown as { code?: unknown }).code : undefined;
      const err = f.err instanceof Error ? { message: f.err.message, ...(typeof code === 'string' ? { code } : {}) } : undefined;
      post({ t: 'needsReset', reason: f.reason, ...(err ? { error: err } : {}) });
    }
    // Back to the owner (from RUNNING or STOP_REQ).
    Atomics.store(ctl, CTL.STATE, ST.IDLE);
    Atomics.notify(ctl, CTL.STATE);
  };

  for (;;) {
    const s = Atomics.load(ctl, CTL.STATE);
    if (s === ST.EXIT) break;
    if (s === ST.RUN_REQ) {
      if (Atomics.compareExchange(ctl, CTL.STATE, ST.RUN_REQ, ST.RUNNING) === ST.RUN_REQ) {
        Atomics.notify(ctl, CTL.STATE); // an owner waiting to drain-stop a session the worker had not taken yet
        session();
      }
      continue;
    }
    if (s === ST.RUNNING || s === ST.STOP_REQ) {
      // Not ours (cannot happen): hand the rings back.
      Atomics.store(ctl, CTL.STATE, ST.IDLE);
      Atomics.notify(ctl, CTL.STATE);
      continue;
    }
    Atomics.wait(ctl, CTL.STATE, s);
  }
  try {
    device.close?.();
  } catch (e) {
    log.warn({ err: e }, 'I/O thread device close failed');
  }
}

await main(workerData as IoThreadWorkerData);
