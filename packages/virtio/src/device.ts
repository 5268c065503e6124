import type { GuestMemory, Logger } from '@kvmkit/kernel';
import { VIRTIO_F, bit } from './constants.js';
import type { Virtqueue } from './queue.js';
import type { IoThreadSpec } from './iothread.js';

/** What a device sees of its transport. */
export interface VirtioDeviceContext {
  readonly memory: GuestMemory;
  readonly log: Logger;
  /** Features the driver accepted (valid once FEATURES_OK). */
  readonly driverFeatures: bigint;
  hasFeature(bitNumber: number): boolean;
  /**
   * True while the device may touch the rings: DRIVER_OK, not DEVICE_NEEDS_RESET/FAILED, not paused, not
   * closed. Devices fed by host events (e.g. a NIC's RX) check it and stop their sources when false; the
   * transport kicks every queue again on resume.
   */
  readonly active: boolean;
  /** True while the device's I/O thread owns the rings (main-thread code must then leave them alone). */
  readonly ioThreadActive?: boolean;
  queue(index: number): Virtqueue;
  /** Raise a used-buffer interrupt for queue `q` if the driver wants one (EVENT_IDX / NO_INTERRUPT aware). */
  signalUsed(q: number): void;
  /** The config space changed: bump the generation and send a config-change interrupt. */
  configChanged(): void;
  /** Enter DEVICE_NEEDS_RESET (with a config-change interrupt once DRIVER_OK). */
  needsReset(reason: string, err?: unknown): void;
}

/**
 * A virtio device, declared once and independent of the transport (virtio-mmio here, PCI later).
 * Subclasses set deviceId, queueSizes, features and config, and implement processQueue.
 */
export abstract class VirtioDevice {
  /** Virtio device id (§5: 1 net, 2 block, 4 rng, …). */
  abstract readonly deviceId: number;
  /** Name for logs. */
  abstract readonly name: string;
  /** QueueNumMax of each queue (powers of 2). */
  abstract readonly queueSizes: readonly number[];
  /** Device-specific feature bits. The transport always adds VERSION_1 and, unless `ringFeatures` is false, INDIRECT_DESC and EVENT_IDX. */
  abstract readonly features: bigint;
  /** Offer VIRTIO_F_RING_INDIRECT_DESC and VIRTIO_F_RING_EVENT_IDX. */
  ringFeatures = true;
  /** Device configuration space (little endian). Mutate then call ctx.configChanged(). */
  config: Uint8Array = new Uint8Array(0);

  private context: VirtioDeviceContext | undefined;

  /** Called by the transport once. */
  attach(ctx: VirtioDeviceContext): void {
    this.context = ctx;
  }

  get ctx(): VirtioDeviceContext {
    if (!this.context) throw new Error(`virtio device ${this.name} is not attached to a transport`);
    return this.context;
  }

  /** All feature bits offered. */
  offeredFeatures(): bigint {
    let f = this.features | bit(VIRTIO_F.VERSION_1);
    if (this.ringFeatures) f |= bit(VIRTIO_F.RING_INDIRECT_DESC) | bit(VIRTIO_F.RING_EVENT_IDX);
    return f;
  }

  /**
   * Device-specific feature dependency check at FEATURES_OK (e.g. net: GUEST_TSO4 needs GUEST_CSUM).
   * Returning false leaves FEATURES_OK clear, as the spec asks.
   */
  acceptFeatures(_features: bigint): boolean {
    return true;
  }

  /** Config space read (bytes past the end read as 0). */
  readConfig(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (offset < this.config.length) data.set(this.config.subarray(offset, Math.min(this.config.length, offset + data.length)));
  }

  /** Config space write; read-only by default (ignored). */
  writeConfig(_offset: number, _data: Uint8Array): void {}

  /** DRIVER_OK was set (features are final, queues programmed). */
  activate(): void {}

  /**
   * The driver notified queue `q` (or the transport kicks it after DRIVER_OK/resume). Pop chains with
   * `ctx.queue(q).pop()`, complete with `pushUsed`, then `ctx.signalUsed(q)`. May be async; a thrown
   * VirtqueueError (guest-caused) or any other error puts the device in DEVICE_NEEDS_RESET.
   */
  abstract processQueue(q: number): void | Promise<void>;

  /**
   * Serve this device's queues in a dedicated I/O thread (see iothread.ts): return the worker-side module and its
   * data, or undefined (the default) to have `processQueue` called on the main thread. Asked once, when the
   * transport is wired to KVM (ioeventfds); the main-thread `processQueue` is still used if the thread cannot start
   * or dies.
   */
  ioThread(): IoThreadSpec | undefined {
    return undefined;
  }

  /** Device-specific reset (status written 0). Queues are reset by the transport. */
  reset(): void {}

  /** Resolves when no request is in flight (called before save and on pause). */
  quiesce(): Promise<void> {
    return Promise.resolve();
  }

  /** Device-specific state (a JSON-safe plain object; bigint and Uint8Array allowed). */
  saveState(): unknown {
    return {};
  }

  restoreState(_state: unknown): void {}

  /** Releases host resources (files, fds). */
  close(): void | Promise<void> {}
}
