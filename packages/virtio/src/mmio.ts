import { EventFd, KvmkitError, isKvmkitError, silentLogger, watchFd, type BusDevice, type FdWatch, type GuestMemory, type Logger, type WorkerHandlerSpec } from '@kvmkit/kernel';
import { KVMKIT_VENDOR_ID, MMIO, VIRTIO_F, VIRTIO_MMIO_INT, VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VERSION, VIRTIO_STATUS, bit } from './constants.js';
import type { VirtioDevice, VirtioDeviceContext } from './device.js';
import { Virtqueue, type VirtqueueState } from './queue.js';
import { IoThread } from './iothread.js';

const S = VIRTIO_STATUS;

/** URL of the compiled vCPU-thread handler (dist/mmio-worker.js, also when this module runs from src under vitest). */
function workerModuleUrl(): string {
  const here = import.meta.url;
  return here.endsWith('.ts') ? new URL('../dist/mmio-worker.js', here).href : new URL('./mmio-worker.js', here).href;
}

/** The parts of a kernel `Vm` the transport uses (structural, so tests can fake it). */
export interface VirtioVm {
  readonly hasIrqchip: boolean;
  ioeventfd(opts: { fd: number; addr: bigint | number; len: number; datamatch?: bigint | number; deassign?: boolean }): void;
  irqfd(opts: { fd: number; gsi: number; deassign?: boolean }): void;
}

export interface VirtioMmioTransportOptions {
  memory: GuestMemory;
  log?: Logger;
  /** Fallback interrupt (no irqfd): called after InterruptStatus was set. */
  raiseIrq?: () => void;
}

export interface VirtioMmioState {
  status: number;
  deviceFeaturesSel: number;
  driverFeaturesSel: number;
  driverFeatures: bigint;
  queueSel: number;
  interruptStatus: number;
  configGeneration: number;
  queues: VirtqueueState[];
  device: unknown;
}

/**
 * virtio-mmio (version 2) register set over a VirtioDevice, as a BusDevice. Queue notifications arrive by
 * ioeventfd (see `attachKvm`) or, without it, as QueueNotify writes; interrupts go out by irqfd or `raiseIrq`.
 * Nothing the guest writes can make it throw: guest errors set DEVICE_NEEDS_RESET.
 */
export class VirtioMmioTransport implements BusDevice {
  readonly device: VirtioDevice;
  readonly memory: GuestMemory;
  readonly queues: Virtqueue[];
  readonly log: Logger;
  status = 0;
  deviceFeaturesSel = 0;
  driverFeaturesSel = 0;
  driverFeatures = 0n;
  queueSel = 0;
  configGeneration = 0;
  /** Times the device entered DEVICE_NEEDS_RESET (for tests/metrics). */
  needsResetCount = 0;
  lastError: unknown;

  /**
   * InterruptStatus, shared with the vCPU threads: `workerHandler()` lets them answer InterruptStatus reads
   * and InterruptACK writes without the hop to the main thread. Updated with Atomics on both sides.
   */
  private readonly isrShared = new SharedArrayBuffer(4);
  private readonly isr = new Int32Array(this.isrShared);
  private raiseIrq: (() => void) | undefined;
  private irqEventFd: EventFd | undefined;
  private kvm: { vm: VirtioVm; base: bigint; notifyFds: EventFd[]; registered: boolean[]; watches: FdWatch[]; irqGsi: number | undefined } | undefined;
  /** The device's I/O thread (VirtioDevice.ioThread()), when it has one and it is alive. */
  private io: IoThread | undefined;
  private paused = false;
  private pendingKicks = new Set<number>();
  private readonly inflight = new Set<Promise<void>>();
  private closed = false;

  constructor(device: VirtioDevice, opts: VirtioMmioTransportOptions) {
    this.device = device;
    this.memory = opts.memory;
    this.log = opts.log ?? silentLogger();
    this.raiseIrq = opts.raiseIrq;
    this.queues = device.queueSizes.map((n, i) => new Virtqueue(i, n));
    const self = this;
    const ctx: VirtioDeviceContext = {
      get memory() {
        return self.memory;
      },
      get log() {
        return self.log;
      },
      get driverFeatures() {
        return self.driverFeatures;
      },
      hasFeature: (b) => (self.driverFeatures & bit(b)) !== 0n,
      get active() {
        return self.live && !self.paused;
      },
      get ioThreadActive() {
        return self.io?.running ?? false;
      },
      queue: (i) => {
        const q = self.queues[i];
        if (!q) throw new KvmkitError('KVMKIT_ERR_VIRTIO_CONFIG', `${device.name}: no queue ${i}`);
        return q;
      },
      signalUsed: (q) => self.signalUsed(q),
      configChanged: () => self.configChanged(),
      needsReset: (reason, err) => self.needsReset(reason, err),
    };
    device.attach(ctx);
  }

  /** How notifications and interrupts are wired: ioeventfds registered, irqfd in use. */
  get wiring(): { ioeventfds: number; irqfd: boolean } {
    return { ioeventfds: this.kvm?.registered.filter(Boolean).length ?? 0, irqfd: this.irqEventFd !== undefined };
  }

  /** The device's I/O thread (undefined when its queues are served on the main thread). */
  get ioThread(): IoThread | undefined {
    return this.io?.alive ? this.io : undefined;
  }

  /** InterruptStatus (bit 0 used buffer, bit 1 configuration change). */
  get interruptStatus(): number {
    return Atomics.load(this.isr, 0) >>> 0;
  }

  set interruptStatus(v: number) {
    Atomics.store(this.isr, 0, v | 0);
  }

  /**
   * The vCPU-thread handler for this transport's window: InterruptStatus reads and InterruptACK writes are
   * answered on the vCPU thread (see mmio-worker.ts); everything else goes to the main thread as usual.
   */
  workerHandler(): WorkerHandlerSpec {
    return { module: workerModuleUrl(), shared: this.isrShared };
  }

  get isPaused(): boolean {
    return this.paused;
  }

  get offeredFeatures(): bigint {
    return this.device.offeredFeatures();
  }

  // ---- KVM wiring ----

  /**
   * Registers one ioeventfd per queue on base+QueueNotify (datamatch = queue index) and an irqfd on `gsi` when
   * the VM has an in-kernel irqchip (else `fallbackIrq`). The ioeventfds are watched on the main thread with
   * fdwatch, or, when the device asks for one (`VirtioDevice.ioThread()`), handed to its I/O thread, which then
   * serves the queues while the device is live (the main thread no longer reads them). A failing ioeventfd leaves
   * that queue on the ordinary MMIO-exit path (logged).
   */
  attachKvm(vm: VirtioVm, base: bigint, gsi: number, fallbackIrq?: () => void): void {
    const notifyFds: EventFd[] = [];
    const registered: boolean[] = [];
    const watches: FdWatch[] = [];
    this.kvm = { vm, base, notifyFds, registered, watches, irqGsi: undefined };
    for (let q = 0; q < this.queues.length; q++) {
      const efd = new EventFd();
      notifyFds.push(efd);
      try {
        vm.ioeventfd({ fd: efd.fd, addr: base + BigInt(MMIO.QUEUE_NOTIFY), len: 4, datamatch: q });
        registered.push(true);
      } catch (e) {
        registered.push(false);
        this.log.warn({ err: e, queue: q }, 'ioeventfd failed: queue notifications take MMIO exits');
      }
    }
    if (vm.hasIrqchip) {
      const efd = new EventFd();
      try {
        vm.irqfd({ fd: efd.fd, gsi });
        this.irqEventFd = efd;
        this.kvm.irqGsi = gsi;
      } catch (e) {
        efd.close();
        this.log.warn({ err: e, gsi }, 'irqfd failed: interrupts go through KVM_IRQ_LINE');
      }
    }
    if (!this.irqEventFd && fallbackIrq) this.raiseIrq = fallbackIrq;
    let spec;
    try {
      spec = this.device.ioThread();
    } catch (e) {
      this.log.warn({ err: e, device: this.device.name }, 'ioThread() failed: queues are served on the main thread');
    }
    if (spec) {
      try {
        this.io = new IoThread({
          spec,
          name: this.device.name,
          memory: this.memory,
          queueSizes: this.device.queueSizes,
          notifyFds: notifyFds.map((e) => e.fd),
          irqFd: this.irqEventFd?.fd ?? -1,
          isr: this.isrShared,
          log: this.log,
          onNeedsReset: (reason, err) => this.needsReset(reason, err),
          onIrq: () => this.raiseIrq?.(),
          onConfigChanged: () => this.configChanged(),
          onDead: (err) => this.ioThreadDied(err),
        });
      } catch (e) {
        this.log.warn({ err: e, device: this.device.name }, 'the I/O thread cannot start: queues are served on the main thread');
        this.io = undefined;
      }
    }
    if (!this.io) this.watchNotifyFds();
  }

  /** Main-thread fdwatch on every queue's notification eventfd. */
  private watchNotifyFds(): void {
    const k = this.kvm;
    if (!k || k.watches.length > 0 || this.closed) return;
    k.notifyFds.forEach((efd, q) => {
      k.watches.push(
        watchFd(
          efd.fd,
          () => {
            efd.drain();
            this.notify(q);
          },
          { ref: false, onError: (e) => this.needsReset('notify handler failed', e) },
        ),
      );
    });
  }

  /** The I/O thread crashed or hung: the device needs a reset, then its queues are served on the main thread. */
  private ioThreadDied(err: unknown): void {
    if (this.closed) return;
    this.needsReset('the I/O thread died', err);
    this.watchNotifyFds();
  }

  /** Takes the rings back from the I/O thread (blocking) before the main thread changes queue or device state. */
  private reclaimSync(): void {
    if (this.io?.running) this.io.stopSync(this.queues);
  }

  /** Hands the rings to the I/O thread while the device is live, takes them back otherwise. */
  private syncIoThread(): void {
    const io = this.io;
    if (!io?.alive) return;
    if (this.live && !this.paused) {
      if (!io.running) io.start(this.queues, this.driverFeatures, this.ringOpts());
    } else if (io.running) io.stopSync(this.queues);
  }

  /** Releases ioeventfds, irqfd, watches and the device's host resources. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.paused = true;
    await this.quiesce().catch(() => {});
    if (this.io) {
      await this.io.stop(this.queues).catch(() => {});
      await this.io.close().catch((e) => this.log.warn({ err: e }, 'closing the I/O thread failed'));
    }
    const k = this.kvm;
    if (k) {
      for (const w of k.watches) w.close();
      for (let i = 0; i < k.notifyFds.length; i++) {
        const efd = k.notifyFds[i]!;
        if (k.registered[i]) {
          try {
            k.vm.ioeventfd({ fd: efd.fd, addr: k.base + BigInt(MMIO.QUEUE_NOTIFY), len: 4, datamatch: i, deassign: true });
          } catch {
            /* VM already closed */
          }
        }
        efd.close();
      }
      if (this.irqEventFd && k.irqGsi !== undefined) {
        try {
          k.vm.irqfd({ fd: this.irqEventFd.fd, gsi: k.irqGsi, deassign: true });
        } catch {
          /* VM already closed */
        }
      }
    }
    this.irqEventFd?.close();
    this.irqEventFd = undefined;
    for (const q of this.queues) q.disable();
    await this.device.close();
  }

  // ---- interrupts ----

  private interrupt(bits: number): void {
    Atomics.or(this.isr, 0, bits);
    try {
      if (this.irqEventFd) this.irqEventFd.signal(1);
      else this.raiseIrq?.();
    } catch (e) {
      this.log.error({ err: e }, 'raising the virtio interrupt failed');
    }
  }

  signalUsed(q: number): void {
    if (!(this.status & S.DRIVER_OK)) return;
    const queue = this.queues[q];
    if (!queue || !queue.ready) return;
    if (queue.needsInterrupt()) this.interrupt(VIRTIO_MMIO_INT.VRING);
  }

  configChanged(): void {
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    if (this.status & S.DRIVER_OK) this.interrupt(VIRTIO_MMIO_INT.CONFIG);
  }

  needsReset(reason: string, err?: unknown): void {
    if (this.status & S.DEVICE_NEEDS_RESET) return;
    this.reclaimSync();
    this.needsResetCount++;
    this.lastError = err ?? reason;
    this.log.warn({ device: this.device.name, reason, err: err instanceof Error ? err.message : err }, 'virtio device needs reset');
    this.status |= S.DEVICE_NEEDS_RESET;
    if (this.status & S.DRIVER_OK) this.interrupt(VIRTIO_MMIO_INT.CONFIG);
  }

  // ---- queue processing ----

  private get live(): boolean {
    return (this.status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET | S.FAILED)) === S.DRIVER_OK && !this.memory.isClosed && !this.closed;
  }

  /** A notification for queue `q` (ioeventfd, QueueNotify write, or a kick). Never throws. */
  notify(q: number): void {
    if (!Number.isInteger(q) || q < 0 || q >= this.queues.length) return;
    if (this.paused) {
      this.pendingKicks.add(q);
      return;
    }
    if (!this.live || !this.queues[q]!.ready) return;
    if (this.io?.alive) {
      // Served by the I/O thread (which owns the rings while the device is live).
      this.io.kick(q);
      return;
    }
    try {
      const r = this.device.processQueue(q);
      if (r && typeof (r as Promise<void>).then === 'function') {
        const p: Promise<void> = (r as Promise<void>).then(
          () => {},
          (e) => this.deviceError(q, e),
        );
        this.inflight.add(p);
        void p.finally(() => this.inflight.delete(p));
      }
    } catch (e) {
      this.deviceError(q, e);
    }
  }

  private deviceError(q: number, e: unknown): void {
    const guest = isKvmkitError(e, 'KVMKIT_ERR_VIRTIO_QUEUE') || isKvmkitError(e, 'KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    if (!guest) this.log.error({ err: e, queue: q, device: this.device.name }, 'virtio device error');
    this.needsReset(guest ? `queue ${q}: ${(e as Error).message}` : `device error on queue ${q}`, e);
  }

  /** Processes every ready queue once (after DRIVER_OK, resume, restore). */
  kickAll(): void {
    for (let q = 0; q < this.queues.length; q++) if (this.queues[q]!.ready) this.notify(q);
  }

  /** Resolves when no processQueue promise and no device request is in flight. */
  async quiesce(): Promise<void> {
    for (let i = 0; i < 1000 && this.inflight.size > 0; i++) await Promise.all([...this.inflight]);
    await this.device.quiesce();
  }

  /** Stops taking notifications (they are remembered) and waits for in-flight work. */
  async pause(): Promise<void> {
    this.paused = true;
    // The I/O thread finishes the request in progress and hands back its exact queue indexes.
    if (this.io?.running) await this.io.stop(this.queues, { drain: true });
    await this.quiesce();
  }

  resume(): void {
    if (this.closed) return;
    this.paused = false;
    this.pendingKicks.clear();
    this.syncIoThread();
    // Every ready queue once: remembered notifications, and devices fed by host events restart their sources.
    this.kickAll();
  }

  // ---- reset / status ----

  private resetDevice(): void {
    this.reclaimSync();
    this.status = 0;
    this.driverFeatures = 0n;
    this.deviceFeaturesSel = this.driverFeaturesSel = this.queueSel = 0;
    this.interruptStatus = 0;
    for (const q of this.queues) q.reset();
    this.pendingKicks.clear();
    try {
      this.device.reset();
    } catch (e) {
      this.log.error({ err: e }, 'device reset failed');
    }
  }

  private writeStatus(v: number): void {
    v &= 0xff;
    if (v === 0) {
      this.resetDevice();
      return;
    }
    v = (v & ~S.DEVICE_NEEDS_RESET) | (this.status & S.DEVICE_NEEDS_RESET); // only the device sets NEEDS_RESET
    if (this.status & ~v) {
      this.log.debug({ old: this.status, value: v }, 'driver tried to clear status bits without a reset: ignored');
      return;
    }
    const added = v & ~this.status;
    if (added & S.FEATURES_OK) {
      const ok =
        (v & S.ACKNOWLEDGE) !== 0 &&
        (v & S.DRIVER) !== 0 &&
        (this.driverFeatures & ~this.offeredFeatures) === 0n &&
        (this.driverFeatures & bit(VIRTIO_F.VERSION_1)) !== 0n &&
        this.acceptFeatures(this.driverFeatures);
      if (!ok) {
        this.log.debug({ features: this.driverFeatures.toString(16) }, 'FEATURES_OK refused');
        v &= ~S.FEATURES_OK;
      }
    }
    if (added & S.DRIVER_OK && !(v & S.FEATURES_OK)) {
      this.log.debug('DRIVER_OK without FEATURES_OK: refused');
      v &= ~S.DRIVER_OK;
    }
    this.status = v;
    if (added & S.DRIVER_OK && v & S.DRIVER_OK) {
      try {
        this.device.activate();
      } catch (e) {
        this.needsReset('activate failed', e);
        return;
      }
      this.kickAll();
    }
  }

  private acceptFeatures(f: bigint): boolean {
    try {
      return this.device.acceptFeatures(f);
    } catch (e) {
      this.log.error({ err: e }, 'acceptFeatures failed');
      return false;
    }
  }

  private ringOpts(): { indirect: boolean; eventIdx: boolean } {
    return {
      indirect: (this.driverFeatures & bit(VIRTIO_F.RING_INDIRECT_DESC)) !== 0n,
      eventIdx: (this.driverFeatures & bit(VIRTIO_F.RING_EVENT_IDX)) !== 0n,
    };
  }

  // ---- BusDevice ----

  read(offset: number, data: Uint8Array): void {
    try {
      this.readInner(offset, data);
    } catch (e) {
      data.fill(0);
      this.log.error({ err: e, offset }, 'virtio-mmio read failed');
    }
  }

  write(offset: number, data: Uint8Array): void {
    try {
      this.writeInner(offset, data);
    } catch (e) {
      this.log.error({ err: e, offset }, 'virtio-mmio write failed');
    }
  }

  private readInner(offset: number, data: Uint8Array): void {
    if (offset >= MMIO.CONFIG) {
      this.device.readConfig(offset - MMIO.CONFIG, data);
      return;
    }
    data.fill(0);
    if (data.length !== 4 || offset & 3) return; // registers are 32-bit only
    const dv = new DataView(data.buffer, data.byteOffset, 4);
    dv.setUint32(0, this.readReg(offset) >>> 0, true);
  }

  private readReg(offset: number): number {
    const q = this.queues[this.queueSel];
    switch (offset) {
      case MMIO.MAGIC_VALUE:
        return VIRTIO_MMIO_MAGIC;
      case MMIO.VERSION:
        return VIRTIO_MMIO_VERSION;
      case MMIO.DEVICE_ID:
        return this.device.deviceId;
      case MMIO.VENDOR_ID:
        return KVMKIT_VENDOR_ID;
      case MMIO.DEVICE_FEATURES:
        return this.deviceFeaturesSel > 1 ? 0 : Number((this.offeredFeatures >> BigInt(32 * this.deviceFeaturesSel)) & 0xffff_ffffn);
      case MMIO.QUEUE_NUM_MAX:
        return q ? q.maxSize : 0;
      case MMIO.QUEUE_READY:
        return q && q.ready ? 1 : 0;
      case MMIO.INTERRUPT_STATUS:
        return this.interruptStatus;
      case MMIO.STATUS:
        return this.status;
      case MMIO.SHM_LEN_LOW:
      case MMIO.SHM_LEN_HIGH:
        return 0xffff_ffff; // no shared memory regions
      case MMIO.CONFIG_GENERATION:
        return this.configGeneration;
      default:
        return 0;
    }
  }

  private writeInner(offset: number, data: Uint8Array): void {
    if (offset >= MMIO.CONFIG) {
      if (this.status & S.FAILED) return;
      this.device.writeConfig(offset - MMIO.CONFIG, data);
      return;
    }
    if (data.length !== 4 || offset & 3) return;
    const v = new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
    const q = this.queues[this.queueSel];
    const queueWritable = q !== undefined && !q.ready;
    switch (offset) {
      case MMIO.DEVICE_FEATURES_SEL:
        this.deviceFeaturesSel = v;
        return;
      case MMIO.DRIVER_FEATURES_SEL:
        this.driverFeaturesSel = v;
        return;
      case MMIO.DRIVER_FEATURES: {
        if (this.status & S.FEATURES_OK || !(this.status & S.DRIVER) || this.driverFeaturesSel > 1) return;
        const shift = BigInt(32 * this.driverFeaturesSel);
        this.driverFeatures = (this.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(v) << shift);
        return;
      }
      case MMIO.QUEUE_SEL:
        this.queueSel = v;
        return;
      case MMIO.QUEUE_NUM:
        if (queueWritable) q.size = v;
        return;
      case MMIO.QUEUE_READY:
        if (!q) return;
        if (v === 0) {
          if (!q.ready) return;
          this.reclaimSync();
          q.disable();
          this.syncIoThread();
          return;
        }
        if (q.ready || !(this.status & S.FEATURES_OK)) return;
        this.reclaimSync();
        try {
          q.enable(this.memory, this.ringOpts());
        } catch (e) {
          this.needsReset(`queue ${q.index} setup rejected`, e);
        }
        this.syncIoThread();
        return;
      case MMIO.QUEUE_NOTIFY:
        this.notify(v);
        return;
      case MMIO.INTERRUPT_ACK:
        Atomics.and(this.isr, 0, ~v);
        return;
      case MMIO.STATUS:
        this.reclaimSync();
        this.writeStatus(v);
        this.syncIoThread();
        return;
      case MMIO.QUEUE_DESC_LOW:
        if (queueWritable) q.desc = (q.desc & ~0xffff_ffffn) | BigInt(v);
        return;
      case MMIO.QUEUE_DESC_HIGH:
        if (queueWritable) q.desc = (q.desc & 0xffff_ffffn) | (BigInt(v) << 32n);
        return;
      case MMIO.QUEUE_DRIVER_LOW:
        if (queueWritable) q.driver = (q.driver & ~0xffff_ffffn) | BigInt(v);
        return;
      case MMIO.QUEUE_DRIVER_HIGH:
        if (queueWritable) q.driver = (q.driver & 0xffff_ffffn) | (BigInt(v) << 32n);
        return;
      case MMIO.QUEUE_DEVICE_LOW:
        if (queueWritable) q.device = (q.device & ~0xffff_ffffn) | BigInt(v);
        return;
      case MMIO.QUEUE_DEVICE_HIGH:
        if (queueWritable) q.device = (q.device & 0xffff_ffffn) | (BigInt(v) << 32n);
        return;
      default:
        return;
    }
  }

  // ---- save / restore ----

  /** Full transport + queue + device state. Call after `pause()` so nothing is in flight. */
  saveState(): VirtioMmioState {
    // Exact indexes: normally the transport is paused (I/O thread stopped); otherwise take the rings back briefly.
    const wasRunning = this.io?.running ?? false;
    if (wasRunning) this.reclaimSync();
    const s = this.saveStateInner();
    if (wasRunning) this.syncIoThread();
    return s;
  }

  private saveStateInner(): VirtioMmioState {
    return {
      status: this.status,
      deviceFeaturesSel: this.deviceFeaturesSel,
      driverFeaturesSel: this.driverFeaturesSel,
      driverFeatures: this.driverFeatures,
      queueSel: this.queueSel,
      interruptStatus: this.interruptStatus,
      configGeneration: this.configGeneration,
      queues: this.queues.map((q) => q.saveState()),
      device: this.device.saveState(),
    };
  }

  /**
   * Restores a saved state (the device must have the same queue layout). Guest-controlled parts are
   * re-validated: a ring outside memory puts the device in DEVICE_NEEDS_RESET instead of failing; a state of
   * the wrong shape throws KVMKIT_ERR_STATE_FORMAT. The transport is left paused: nothing touches guest memory
   * (which the restorer may still be loading) until `resume()`, which then processes every ready queue.
   */
  restoreState(s: VirtioMmioState): void {
    const fail = (what: string) => new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `${this.device.name}: saved virtio state is invalid (${what})`, { details: { what } });
    if (!s || typeof s !== 'object' || !Array.isArray(s.queues)) throw fail('not an object with queues');
    if (s.queues.length !== this.queues.length) throw fail(`${s.queues.length} queues, device has ${this.queues.length}`);
    const isU16 = (x: unknown) => Number.isInteger(x) && (x as number) >= 0 && (x as number) <= 0xffff;
    const isAddr = (x: unknown) => typeof x === 'bigint' && x >= 0n && x < 1n << 64n;
    s.queues.forEach((q, i) => {
      if (!q || typeof q !== 'object' || !isU16(q.lastAvail) || !isU16(q.usedIdx) || !isU16(q.signalledUsed) || !Number.isInteger(q.size) || typeof q.ready !== 'boolean' || !isAddr(q.desc) || !isAddr(q.driver) || !isAddr(q.device)) {
        throw fail(`queue ${i}`);
      }
    });
    if (typeof s.driverFeatures !== 'bigint') throw fail('driverFeatures');
    for (const k of ['status', 'deviceFeaturesSel', 'driverFeaturesSel', 'queueSel', 'interruptStatus', 'configGeneration'] as const) {
      if (!Number.isInteger(s[k]) || s[k] < 0 || s[k] > 0xffff_ffff) throw fail(k);
    }
    this.resetDevice();
    this.paused = true;
    this.device.restoreState(s.device);
    this.status = s.status & 0xff;
    this.deviceFeaturesSel = s.deviceFeaturesSel;
    this.driverFeaturesSel = s.driverFeaturesSel;
    this.driverFeatures = s.driverFeatures & this.offeredFeatures;
    this.queueSel = s.queueSel;
    this.interruptStatus = s.interruptStatus & 3;
    this.configGeneration = s.configGeneration;
    for (let i = 0; i < this.queues.length; i++) {
      try {
        this.queues[i]!.restoreState(s.queues[i]!, this.memory, this.ringOpts());
      } catch (e) {
        this.needsReset(`queue ${i} restore rejected`, e);
      }
    }
    if ((this.status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET | S.FAILED)) === S.DRIVER_OK) {
      try {
        this.device.activate();
      } catch (e) {
        this.needsReset('activate after restore failed', e);
      }
    }
  }
}
