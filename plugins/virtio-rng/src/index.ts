import { randomFillSync } from 'node:crypto';
import { KvmkitError, checkOptions, type Plugin } from '@kvmkit/kernel';
import { VIRTIO_ID, VirtioDevice, useVirtioMmio } from '@kvmkit/virtio';

const VERSION = '0.1.0';
export const RNG_STATE_VERSION = 1;
/** Most requests served per event-loop turn (a guest that keeps the ring full cannot starve the loop). */
export const TURN_CHAINS = 256;

export interface VirtioRngOptions {
  /** IRQ line (default: next free). */
  irq?: number;
  /** Queue size (power of 2, 1..32768; default 256). */
  queueSize?: number;
  /** Most bytes handed out per request (default 64 KiB); larger requests get this many. */
  maxRequest?: number;
  /** Entropy source (tests); default crypto.randomFillSync (the kernel CSPRNG, same as /dev/urandom). */
  source?: (buf: Uint8Array) => void;
}

/** virtio entropy device (§5.4): one request queue; each chain's writable buffers are filled with random bytes. */
export class VirtioRng extends VirtioDevice {
  readonly deviceId = VIRTIO_ID.RNG;
  readonly name = 'virtio-rng';
  readonly queueSizes: number[];
  readonly features = 0n;
  /** Bytes delivered (kept across save/restore, for metrics). */
  bytesServed = 0;
  requests = 0;
  private readonly maxRequest: number;
  private readonly source: (buf: Uint8Array) => void;
  private rekickPending = false;

  constructor(opts: VirtioRngOptions = {}) {
    super();
    this.queueSizes = [opts.queueSize ?? 256];
    this.maxRequest = opts.maxRequest ?? 65536;
    this.source = opts.source ?? ((b) => randomFillSync(b));
  }

  /**
   * Fills every available chain's writable buffers (up to maxRequest bytes) straight in guest memory, at most
   * TURN_CHAINS chains per event-loop turn (the rest from a macrotask); one interrupt decision per turn.
   */
  processQueue(q: number): void {
    const vq = this.ctx.queue(q);
    const mem = this.ctx.memory;
    let done = 0;
    try {
      for (let c = vq.pop(); c; c = done < TURN_CHAINS ? vq.pop() : null) {
        let left = this.maxRequest;
        let written = 0;
        for (const b of c.writable) {
          if (left === 0) break;
          const n = Math.min(b.len, left);
          if (n === 0) continue;
          this.source(mem.range(b.addr, n));
          written += n;
          left -= n;
        }
        vq.pushUsed(c, written);
        this.bytesServed += written;
        this.requests++;
        done++;
      }
    } finally {
      if (done) this.ctx.signalUsed(q);
    }
    if (done >= TURN_CHAINS && vq.pending() > 0) this.rekick(q);
  }

  private rekick(q: number): void {
    if (this.rekickPending) return;
    this.rekickPending = true;
    setImmediate(() => {
      this.rekickPending = false;
      if (!this.ctx.active) return;
      try {
        this.processQueue(q);
      } catch (e) {
        this.ctx.needsReset(`queue ${q}: ${(e as Error).message}`, e);
      }
    });
  }

  override saveState(): unknown {
    return { version: RNG_STATE_VERSION, bytesServed: this.bytesServed, requests: this.requests };
  }

  override restoreState(s: unknown): void {
    const o = (s ?? {}) as { version?: unknown; bytesServed?: unknown; requests?: unknown };
    if (o.version !== RNG_STATE_VERSION) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `virtio-rng state version ${String(o.version)} is not supported`);
    this.bytesServed = Number(o.bytesServed) || 0;
    this.requests = Number(o.requests) || 0;
  }
}

function validate(o: unknown): VirtioRngOptions {
  const opts = checkOptions('virtio-rng', o, {
    irq: { type: 'integer' },
    queueSize: { type: 'integer' },
    maxRequest: { type: 'integer' },
  }, true) as VirtioRngOptions;
  if (opts.source !== undefined && typeof opts.source !== 'function') {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'virtio-rng: option source must be a function', { details: { plugin: 'virtio-rng', key: 'source' } });
  }
  for (const k of Object.keys(o ?? {})) {
    if (!['irq', 'queueSize', 'maxRequest', 'source'].includes(k)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `virtio-rng: unknown option ${k}`, { details: { plugin: 'virtio-rng', key: k } });
    }
  }
  const qs = opts.queueSize;
  if (qs !== undefined && (qs < 1 || qs > 32768 || (qs & (qs - 1)) !== 0)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `virtio-rng: queueSize ${qs} is not a power of 2 in 1..32768`, { details: { plugin: 'virtio-rng', key: 'queueSize' } });
  }
  if (opts.maxRequest !== undefined && opts.maxRequest < 1) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'virtio-rng: maxRequest must be >= 1', { details: { plugin: 'virtio-rng', key: 'maxRequest' } });
  }
  return opts;
}

/** Plugin factory: `virtioRng({ irq? })`. Provides `virtio-device+` and `rng`. */
export default function virtioRng(options: VirtioRngOptions = {}): Plugin {
  return {
    name: 'virtio-rng',
    version: VERSION,
    kernel: '^0.1.0',
    provides: ['virtio-device+', 'rng'],
    options,
    validateOptions: (o) => void validate(o),
    apply(machine) {
      const opts = validate(options);
      const get = useVirtioMmio(machine, 'virtio-rng', () => new VirtioRng(opts), opts.irq !== undefined ? { irq: opts.irq } : {});
      machine.provide('virtio-rng', { registration: get });
    },
  };
}
