import { Worker } from 'node:worker_threads';
import { EventFd, KvmkitError, ffi, type ErrorCode, type GuestMemory, type Logger } from '@kvmkit/kernel';
import { CTL, QS, QUEUE_SLOT, ST, ctlWords, type IoThreadMessage } from './iothread-shared.js';
import type { VirtioDeviceContext } from './device.js';
import type { Virtqueue } from './queue.js';
import type { IoThreadWorkerData } from './iothread-worker.js';

/**
 * What a device returns from `VirtioDevice.ioThread()` to have its queues served in a dedicated worker thread.
 * `module` (a file: URL) exports, as `exportName` (default `default`), an `IoThreadDeviceFactory`; `data` must be
 * structured-cloneable (fd numbers are process-wide and may be passed as they are).
 */
export interface IoThreadSpec {
  module: string;
  exportName?: string;
  data?: unknown;
  /** After the rings ran empty, keep polling the avail rings this many µs (NO_NOTIFY set). Default 0. */
  pollUs?: number;
  /**
   * Host fds the I/O thread also waits on while it owns the rings (e.g. a NIC's TAP): when fd `i` is readable the
   * worker-side device's `fdReadable(i)` runs. Up to 16.
   */
  fds?: number[];
}

/**
 * The worker-side half of a device: `processQueue(q)` pops, serves and completes chains synchronously (blocking
 * is fine there) and returns; it may stop early (the I/O thread calls it again while chains are pending). It
 * gets a VirtioDeviceContext whose memory is the shared guest RAM and whose queues are the worker's.
 */
export interface IoThreadDevice {
  processQueue(q: number): void;
  /**
   * Host fd `spec.fds[index]` is readable (level-triggered: consume it). Return false to stop waiting on it until
   * the next queue notification (e.g. a NIC with no RX buffers left), anything else to keep waiting on it.
   */
  fdReadable?(index: number): boolean | void;
  /** The I/O thread exits (close the device's worker-side resources). */
  close?(): void;
}
export type IoThreadDeviceFactory = (data: unknown, ctx: VirtioDeviceContext) => IoThreadDevice | Promise<IoThreadDevice>;

export interface IoThreadOptions {
  spec: IoThreadSpec;
  name: string;
  memory: GuestMemory;
  queueSizes: readonly number[];
  /** Per queue: the notification eventfd the I/O thread waits on (-1: none; see `kick`). */
  notifyFds: readonly number[];
  /** irqfd, or -1 (then `onIrq` raises the interrupt on the main thread). */
  irqFd: number;
  /** The transport's InterruptStatus word. */
  isr: SharedArrayBuffer;
  log: Logger;
  onNeedsReset(reason: string, err?: unknown): void;
  onIrq(): void;
  onConfigChanged(): void;
  /** The thread died (crash, failed start): it never touches the rings again. */
  onDead(err: unknown): void;
}

/** Longest the main thread waits for the I/O thread to give the rings back (a request in progress finishing). */
const STOP_TIMEOUT_MS = 30_000;

function workerUrl(): URL {
  const here = import.meta.url;
  return here.endsWith('.ts') ? new URL('../dist/iothread-worker.js', here) : new URL('./iothread-worker.js', here);
}

const LOG_LEVELS: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: 1e9 };

/**
 * Main-thread owner of a device's I/O thread. `start()` hands the rings (queue programming and indexes) to the
 * worker, `stopSync()`/`stop()` take them back with the indexes the worker reached, exactly; between the two the
 * main thread must not touch the rings. One thread per device, serving all of its queues.
 */
export class IoThread {
  private readonly ctl: Int32Array;
  private readonly worker: Worker;
  private readonly stopFd: EventFd;
  private readonly notifyFds: readonly number[];
  private readonly kickBuf = Buffer.alloc(8);
  private dead = false;
  private closed = false;
  private readonly exited: Promise<void>;
  /** Set once the worker module loaded and the device factory ran. */
  ready = false;

  constructor(private readonly o: IoThreadOptions) {
    this.ctl = new Int32Array(new SharedArrayBuffer(4 * ctlWords(o.queueSizes.length)));
    this.ctl[CTL.POLL_US] = Math.max(0, Math.min(1_000_000, Math.floor(o.spec.pollUs ?? 0)));
    if ((o.spec.fds?.length ?? 0) > 16 || o.notifyFds.length > 14) throw new KvmkitError('KVMKIT_ERR_VIRTIO_IOTHREAD', `${o.name}: an I/O thread waits on at most 14 queues and 16 extra fds`);
    this.notifyFds = o.notifyFds;
    this.kickBuf.writeBigUInt64LE(1n);
    this.stopFd = new EventFd();
    const data: IoThreadWorkerData = {
      ctl: this.ctl.buffer as SharedArrayBuffer,
      isr: o.isr,
      memory: o.memory.share(),
      queueSizes: [...o.queueSizes],
      notifyFds: [...o.notifyFds],
      stopFd: this.stopFd.fd,
      extraFds: [...(o.spec.fds ?? [])],
      irqFd: o.irqFd,
      module: o.spec.module,
      exportName: o.spec.exportName ?? 'default',
      data: o.spec.data,
      name: o.name,
      logLevel: LOG_LEVELS[String((o.log as { level?: unknown }).level ?? 'info')] ?? 30,
    };
    try {
      this.worker = new Worker(workerUrl(), { workerData: data, name: `${o.name} io` });
    } catch (e) {
      this.stopFd.close();
      throw new KvmkitError('KVMKIT_ERR_VIRTIO_IOTHREAD', `${o.name}: cannot start the I/O thread: ${(e as Error).message}`, { cause: e });
    }
    this.worker.unref();
    this.worker.on('message', (m: IoThreadMessage) => this.onMessage(m));
    let firstError: unknown;
    this.worker.on('error', (e) => {
      firstError ??= e;
    });
    this.exited = new Promise((resolve) => {
      this.worker.on('exit', (code) => {
        const wasDead = this.dead;
        this.dead = true;
        Atomics.store(this.ctl, CTL.STATE, ST.DEAD);
        resolve();
        if (!this.closed && !wasDead) {
          const err = firstError ?? new Error(`I/O thread exited with code ${code}`);
          this.o.log.error({ err, device: o.name }, 'virtio I/O thread died');
          this.o.onDead(err);
        }
      });
    });
  }

  private onMessage(m: IoThreadMessage): void {
    if (!m || typeof m !== 'object') return;
    switch (m.t) {
      case 'log': {
        const l = this.o.log as unknown as Record<string, (o: unknown, msg: string) => void>;
        l[m.level]?.call(this.o.log, { ...m.obj, iothread: this.o.name }, m.msg);
        return;
      }
      case 'needsReset':
        // The worker already gave the rings back (FAILED was seen by start() if it ran meanwhile).
        Atomics.store(this.ctl, CTL.FAILED, 0);
        this.o.onNeedsReset(m.reason, m.error ? new KvmkitError(isCode(m.error.code) ? m.error.code : 'KVMKIT_ERR_VIRTIO_QUEUE', m.error.message) : undefined);
        return;
      case 'irq':
        if (!this.closed) this.o.onIrq();
        return;
      case 'configChanged':
        if (!this.closed) this.o.onConfigChanged();
        return;
      case 'ready':
        this.ready = true;
        return;
    }
  }

  /** The worker owns the rings (or was asked to take them). */
  get running(): boolean {
    const s = Atomics.load(this.ctl, CTL.STATE);
    return s === ST.RUN_REQ || s === ST.RUNNING || s === ST.STOP_REQ;
  }

  /** The thread died or was closed: the device's queues are served on the main thread again. */
  get alive(): boolean {
    return !this.dead && !this.closed;
  }

  get pollUs(): number {
    return this.ctl[CTL.POLL_US]!;
  }

  /** Counters: sessions started, poll() wake-ups, chains found by busy polling. */
  get counters(): { sessions: number; wakeups: number; pollHits: number } {
    return { sessions: Atomics.load(this.ctl, CTL.SESSIONS), wakeups: Atomics.load(this.ctl, CTL.WAKEUPS), pollHits: Atomics.load(this.ctl, CTL.POLL_HITS) };
  }

  /**
   * Hands the rings to the I/O thread: programming and indexes of every queue, negotiated ring features.
   * Returns false (and starts nothing) when the thread is not alive or a failure it reported is still pending.
   */
  start(queues: readonly Virtqueue[], driverFeatures: bigint, ring: { indirect: boolean; eventIdx: boolean }): boolean {
    if (!this.alive) return false;
    if (this.running) return true;
    if (Atomics.load(this.ctl, CTL.FAILED) !== 0) return false;
    const c = this.ctl;
    c[CTL.FEATURES_LO] = Number(driverFeatures & 0xffff_ffffn) | 0;
    c[CTL.FEATURES_HI] = Number((driverFeatures >> 32n) & 0xffff_ffffn) | 0;
    c[CTL.RING_FLAGS] = (ring.indirect ? 1 : 0) | (ring.eventIdx ? 2 : 0);
    for (const q of queues) {
      const b = CTL.QUEUES + QUEUE_SLOT * q.index;
      c[b + QS.READY] = q.ready ? 1 : 0;
      c[b + QS.SIZE] = q.size;
      const put = (at: number, v: bigint) => {
        c[b + at] = Number(v & 0xffff_ffffn) | 0;
        c[b + at + 1] = Number((v >> 32n) & 0xffff_ffffn) | 0;
      };
      put(QS.DESC_LO, q.desc);
      put(QS.DRIVER_LO, q.driver);
      put(QS.DEVICE_LO, q.device);
      c[b + QS.LAST_AVAIL] = q.lastAvail;
      c[b + QS.USED_IDX] = q.usedIdx;
      c[b + QS.SIGNALLED_USED] = q.signalledUsed;
    }
    // The seq-cst exchange publishes the slots written above.
    if (Atomics.compareExchange(c, CTL.STATE, ST.IDLE, ST.RUN_REQ) !== ST.IDLE) return false;
    Atomics.notify(c, CTL.STATE);
    return true;
  }

  /** Copies the indexes the worker reached into the main thread's queues. */
  private takeBack(queues: readonly Virtqueue[]): void {
    for (const q of queues) {
      const b = CTL.QUEUES + QUEUE_SLOT * q.index;
      if (!q.ready) continue;
      q.lastAvail = this.ctl[b + QS.LAST_AVAIL]! & 0xffff;
      q.usedIdx = this.ctl[b + QS.USED_IDX]! & 0xffff;
      q.signalledUsed = this.ctl[b + QS.SIGNALLED_USED]! & 0xffff;
    }
  }

  /** One step of taking the rings back; returns true when done. */
  private requestStop(drain = false): boolean {
    const c = this.ctl;
    for (;;) {
      const s = Atomics.load(c, CTL.STATE);
      if (s === ST.IDLE || s === ST.DEAD || s === ST.EXIT) return true;
      if (s === ST.RUN_REQ) {
        // A draining stop lets the worker take the session first (it may still be loading), then drain it.
        if (drain) return false;
        if (Atomics.compareExchange(c, CTL.STATE, ST.RUN_REQ, ST.IDLE) === ST.RUN_REQ) return true;
        continue;
      }
      if (s === ST.RUNNING) {
        Atomics.store(c, CTL.STOP_DRAIN, drain ? 1 : 0);
        if (Atomics.compareExchange(c, CTL.STATE, ST.RUNNING, ST.STOP_REQ) !== ST.RUNNING) continue;
        this.stopFd.signal(1);
      }
      return false; // STOP_REQ: the worker finishes what it is doing
    }
  }

  /**
   * Takes the rings back, blocking the main thread until the worker finished the request in progress (device
   * reset, queue disable: the MMIO write must not complete while the worker still touches the rings). The
   * queues get the worker's exact indexes. After STOP_TIMEOUT_MS the thread is declared dead. The worker stops
   * after the chain it is serving unless `drain`.
   */
  stopSync(queues: readonly Virtqueue[], opts: { drain?: boolean } = {}): void {
    if (this.requestStop(opts.drain)) return this.finishStop(queues);
    const deadline = performance.now() + STOP_TIMEOUT_MS;
    while (!this.requestStop()) {
      const left = deadline - performance.now();
      if (left <= 0) return this.declareDead(queues);
      Atomics.wait(this.ctl, CTL.STATE, Atomics.load(this.ctl, CTL.STATE), Math.min(left, 100));
    }
    this.finishStop(queues);
  }

  /**
   * Like stopSync, without blocking the event loop. `drain` (pause): the worker first serves the chains that
   * are pending when it sees the request (those the driver notified before the pause), then lets go.
   */
  async stop(queues: readonly Virtqueue[], opts: { drain?: boolean } = {}): Promise<void> {
    const deadline = performance.now() + STOP_TIMEOUT_MS;
    while (!this.requestStop(opts.drain)) {
      const left = deadline - performance.now();
      if (left <= 0) return this.declareDead(queues);
      const w = Atomics.waitAsync(this.ctl, CTL.STATE, Atomics.load(this.ctl, CTL.STATE), Math.min(left, 100));
      if (w.async) await w.value;
    }
    this.finishStop(queues);
  }

  private finishStop(queues: readonly Virtqueue[]): void {
    if (Atomics.load(this.ctl, CTL.STATE) === ST.DEAD) {
      // Died while it owned the rings: its indexes are unknown. The device must be reset by the driver.
      return;
    }
    this.takeBack(queues);
  }

  private declareDead(_queues: readonly Virtqueue[]): void {
    this.o.log.error({ device: this.o.name, timeoutMs: STOP_TIMEOUT_MS }, 'virtio I/O thread did not give the rings back: abandoned');
    this.dead = true;
    Atomics.store(this.ctl, CTL.STATE, ST.DEAD);
    void this.worker.terminate();
    this.o.onDead(new KvmkitError('KVMKIT_ERR_VIRTIO_IOTHREAD', `${this.o.name}: I/O thread did not stop within ${STOP_TIMEOUT_MS} ms`));
  }

  /** A notification for queue `q` that did not come through its ioeventfd (QueueNotify write, kickAll). */
  kick(q: number): void {
    const fd = this.notifyFds[q];
    if (fd === undefined || fd < 0 || !this.alive) return;
    ffi.writeFd(fd, this.kickBuf, 8);
  }

  /** Stops the thread (the rings must have been taken back) and waits for it to exit. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.dead) {
      // Any session was stopped by the owner; wake the idle loop with EXIT.
      this.requestStop();
      Atomics.store(this.ctl, CTL.STATE, ST.EXIT);
      Atomics.notify(this.ctl, CTL.STATE);
      this.stopFd.signal(1);
      const t = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 5000).unref());
      if ((await Promise.race([this.exited.then(() => 'exited' as const), t])) === 'timeout') {
        this.o.log.warn({ device: this.o.name }, 'virtio I/O thread did not exit: terminated');
        await this.worker.terminate();
      }
    }
    this.stopFd.close();
  }
}

function isCode(c: unknown): c is ErrorCode {
  return typeof c === 'string' && c.startsWith('KVMKIT_ERR_');
}
