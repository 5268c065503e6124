import { KvmkitError, ffi, watchFd, type FdWatch, type GuestMemory, type Logger } from '@kvmkit/kernel';
import { ChainBuf, VIRTIO_ID, VirtioDevice, bit } from '@kvmkit/virtio';
import { TUN, VNET_HDR_SIZE, type Tap } from './tap.js';

/** virtio-net feature bits (§5.1.3). */
export const VIRTIO_NET_F = {
  CSUM: 0,
  GUEST_CSUM: 1,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_ECN: 9,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_ECN: 13,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
} as const;

export const VIRTIO_NET_S_LINK_UP = 1;
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
/** v2 adds `held` (a frame read from the TAP, not yet in a guest buffer); v1 sections still restore. */
export const NET_STATE_VERSION = 2;
/** Largest frame handled: 64 KiB GSO frame + Ethernet/VLAN header. */
export const MAX_FRAME = 65536 + 14 + 4;
export const RXQ = 0;
export const TXQ = 1;
/** Most chains one queue serves per event-loop turn (then TX continues from a macrotask, RX on the next poll). */
export const TURN_CHAINS = 256;
/** Most iovecs one TAP readv/writev takes (UIO_MAXIOV); a chain with more buffers goes through the bounce buffer. */
export const IOV_MAX = 1024;
const TWO32 = 4294967296;
/** num_buffers = 1 (le16), written at offset 10 of every RX header (no MRG_RXBUF: one chain per frame). */
const NUM_BUFFERS_1 = Uint8Array.of(1, 0);

export interface NetStats {
  rxPackets: number;
  rxBytes: number;
  rxDropped: number;
  txPackets: number;
  txBytes: number;
  txDropped: number;
}

export interface VirtioNetDeviceOptions {
  mac: Uint8Array;
  queueSize: number;
  /** Offer checksum/TSO offloads (both directions). */
  offload: boolean;
  log: Logger;
}

/**
 * virtio-net (§5.1) with one RX/TX queue pair over a TAP (IFF_VNET_HDR: the guest's 12-byte virtio_net_hdr is
 * passed to and from the TAP unchanged, so checksum offload and TSO work end to end).
 * TX: each chain (header + frame) is one write(2) to the TAP. RX: the TAP fd is watched on the main thread
 * (fdwatch); frames go into posted RX chains; while the guest has no RX buffers the watch is suspended and at
 * most one frame is held back, and the guest's next RX notification resumes it.
 * Nothing read from the TAP is lost across save/restore: the held frame is part of the saved state.
 * With a multi-queue TAP this fd's queue is attached only once the device first runs (DRIVER_OK, not paused)
 * and detached on reset, so a migration destination holding the same TAP takes no frames before it runs.
 */
/** Host write tracking for `len` bytes the kernel wrote into chain `c`'s writable buffers (readv bypasses GuestMemory). */
function markWritten(mem: GuestMemory, c: ChainBuf, len: number): void {
  for (let i = c.readable; i < c.count && len > 0; i++) {
    const n = Math.min(len, c.len[i]!);
    mem.markWritten(c.addr[i]!, n);
    len -= n;
  }
}

export class VirtioNet extends VirtioDevice {
  readonly deviceId = VIRTIO_ID.NET;
  readonly name = 'virtio-net';
  readonly queueSizes: number[];
  readonly features: bigint;
  readonly stats: NetStats = { rxPackets: 0, rxBytes: 0, rxDropped: 0, txPackets: 0, txBytes: 0, txDropped: 0 };
  /** Host buffer for copied RX frames, and the spill iovec behind a chain's buffers in readv (sees truncation). */
  private readonly rxBuf = Buffer.alloc(VNET_HDR_SIZE + MAX_FRAME);
  private readonly txBuf = Buffer.alloc(VNET_HDR_SIZE + MAX_FRAME);
  /** The TX chain being sent and the RX chain being filled (reused: popInto fills them, no allocation per packet). */
  private readonly txChain = new ChainBuf(4);
  private readonly rxChain = new ChainBuf(4);
  /** [host address, length] pairs for readv/writev; written as 32-bit halves (no BigInt per packet; x86-64 is little endian). */
  private readonly iov = new BigUint64Array(2 * (IOV_MAX + 1));
  private readonly iov32 = new Uint32Array(this.iov.buffer);
  private rxSpill = -1;
  /** Whether guest RAM has host addresses (a real VM; not GuestMemory.anonymous): then readv/writev on guest buffers. */
  private hostIo: boolean | undefined;
  private txRekick = false;
  private held: Buffer | undefined;
  private watch: FdWatch | undefined;
  private linkUp = true;
  private closed = false;

  constructor(
    readonly tap: Tap,
    readonly opts: VirtioNetDeviceOptions,
  ) {
    super();
    this.queueSizes = [opts.queueSize, opts.queueSize];
    let f = bit(VIRTIO_NET_F.MAC) | bit(VIRTIO_NET_F.STATUS);
    if (opts.offload) {
      for (const b of [VIRTIO_NET_F.CSUM, VIRTIO_NET_F.GUEST_CSUM, VIRTIO_NET_F.HOST_TSO4, VIRTIO_NET_F.HOST_TSO6, VIRTIO_NET_F.GUEST_TSO4, VIRTIO_NET_F.GUEST_TSO6]) f |= bit(b);
    }
    this.features = f;
    this.config = new Uint8Array(10); // mac[6], status le16, max_virtqueue_pairs le16
    this.config.set(opts.mac, 0);
    this.writeStatusField();
    new DataView(this.config.buffer).setUint16(8, 1, true);
    // Not running yet: the kernel queues nothing for us (see rx(), which attaches the queue).
    this.tap.detachQueue();
  }

  /** Frames read from the TAP but not yet in a guest buffer (0 or 1). */
  get rxHeld(): number {
    return this.held ? 1 : 0;
  }

  get mac(): string {
    return [...this.config.subarray(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':');
  }

  get link(): boolean {
    return this.linkUp;
  }

  private writeStatusField(): void {
    new DataView(this.config.buffer).setUint16(6, this.linkUp ? VIRTIO_NET_S_LINK_UP : 0, true);
  }

  /** Link up/down: updates config `status` and sends a config-change interrupt. */
  setLink(up: boolean): void {
    if (up === this.linkUp) return;
    this.linkUp = up;
    this.writeStatusField();
    try {
      this.ctx.configChanged();
    } catch {
      /* not attached yet */
    }
  }

  override acceptFeatures(f: bigint): boolean {
    const has = (b: number) => (f & bit(b)) !== 0n;
    if ((has(VIRTIO_NET_F.GUEST_TSO4) || has(VIRTIO_NET_F.GUEST_TSO6)) && !has(VIRTIO_NET_F.GUEST_CSUM)) return false;
    if ((has(VIRTIO_NET_F.HOST_TSO4) || has(VIRTIO_NET_F.HOST_TSO6)) && !has(VIRTIO_NET_F.CSUM)) return false;
    return true;
  }

  /** TUNSETOFFLOAD flags matching what the driver accepted to receive. */
  offloadFlags(): number {
    const has = (b: number) => this.ctx.hasFeature(b);
    let o = 0;
    if (has(VIRTIO_NET_F.GUEST_CSUM)) {
      o |= TUN.TUN_F_CSUM;
      if (has(VIRTIO_NET_F.GUEST_TSO4)) o |= TUN.TUN_F_TSO4;
      if (has(VIRTIO_NET_F.GUEST_TSO6)) o |= TUN.TUN_F_TSO6;
    }
    return o;
  }

  /** [host address, length] as iovec `i` (addresses are below 2^53: exact as a Number). */
  private setIov(i: number, addr: number, len: number): void {
    const v = this.iov32;
    v[4 * i] = addr >>> 0;
    v[4 * i + 1] = (addr / TWO32) >>> 0;
    v[4 * i + 2] = len;
    v[4 * i + 3] = 0;
  }

  private useHostIo(mem: GuestMemory): boolean {
    if (this.hostIo === undefined) {
      this.hostIo = mem.regions.length > 0 && mem.regions.every((r) => r.hva !== 0n);
      // SAFETY: rxBuf is a Buffer owned by this device for its whole life (Node never moves a Buffer's bytes).
      this.rxSpill = Number(ffi.bufferAddress(this.rxBuf));
    }
    return this.hostIo;
  }

  override activate(): void {
    const o = this.offloadFlags();
    const r = this.tap.setOffload(o);
    if (r < 0) throw new KvmkitError('KVMKIT_ERR_VIRTIO_NET_TAP', `TUNSETOFFLOAD(0x${o.toString(16)}) failed: errno ${-r}`, { details: { errno: -r } });
    if (!this.watch) this.watch = watchFd(this.tap.fd, () => this.rx(), { ref: false, onError: (e) => this.ctx.needsReset('virtio-net rx failed', e) });
    else this.watch.setActive(true);
    this.rx();
  }

  override reset(): void {
    this.watch?.setActive(false);
    this.held = undefined;
    if (!this.closed) {
      this.tap.setOffload(0);
      // A reset NIC takes no frames (a multi-queue TAP drops them instead of queueing stale ones).
      this.tap.detachQueue();
    }
  }

  processQueue(q: number): void {
    if (q === TXQ) this.tx();
    else if (q === RXQ) {
      // New RX buffers: deliver a held frame, resume reading the TAP.
      this.rx();
    }
  }

  /**
   * Sends every available TX chain, at most TURN_CHAINS per event-loop turn (the rest from a macrotask, so a
   * guest that keeps the ring full cannot starve the loop). While it runs, VIRTQ_USED_F_NO_NOTIFY tells the
   * driver it need not notify (chains it adds meanwhile are picked up here); the flag is cleared and the ring
   * looked at once more before leaving. One interrupt decision per turn (EVENT_IDX / NO_INTERRUPT aware).
   */
  private tx(): void {
    if (this.closed) return;
    const vq = this.ctx.queue(TXQ);
    if (!vq.ready) return;
    let done = 0;
    let more = false;
    const c = this.txChain;
    try {
      vq.suppressNotifications(true);
      for (;;) {
        if (!vq.popInto(c)) {
          // Ring empty: clear NO_NOTIFY, then look once more (the seq-cst store orders the two).
          vq.suppressNotifications(false);
          if (vq.pending() === 0) break;
          vq.suppressNotifications(true);
          continue;
        }
        this.sendChain(c);
        vq.pushUsed(c, 0);
        if (++done >= TURN_CHAINS && vq.pending() > 0) {
          // More than a turn's worth: NO_NOTIFY stays set, the macrotask continues (the driver need not kick:
          // a kick is a VM exit; QEMU keeps notifications off between its TX bursts the same way).
          more = true;
          break;
        }
      }
    } finally {
      if (!more) vq.suppressNotifications(false);
      if (done) this.ctx.signalUsed(TXQ);
    }
    if (more) this.rekickTx();
  }

  /**
   * One TX chain (vnet header + frame) → one write(2) straight from guest memory when it is one buffer (the usual
   * layout), else one writev(2) straight from its buffers (up to IOV_MAX); without host addresses (unit-test memory)
   * or with more buffers, a gather into the reusable bounce buffer. (writev of one buffer costs more in the kernel
   * than write: measured 0.15-0.3 µs per frame on a TAP here.)
   */
  private sendChain(c: ChainBuf): void {
    const n = c.readableLength;
    if (n < VNET_HDR_SIZE || n > VNET_HDR_SIZE + MAX_FRAME || !this.linkUp) {
      this.stats.txDropped++;
      return;
    }
    const mem = this.ctx.memory;
    const cnt = c.readable;
    let r: number;
    if (cnt === 1) {
      // SAFETY (writeAt): hostAddress bounds-checks the buffer; guest RAM stays mapped until the machine stops.
      r = this.useHostIo(mem) ? this.tap.writeAt(mem.hostAddress(c.addr[0]!, n), n) : this.tap.write(mem.view(c.addr[0]!, n));
    } else if (cnt <= IOV_MAX && this.useHostIo(mem)) {
      for (let i = 0; i < cnt; i++) this.setIov(i, mem.hostAddress(c.addr[i]!, c.len[i]!), c.len[i]!);
      // SAFETY: the iovecs lie in guest RAM (bounds-checked by hostAddress), mapped until the machine stops.
      r = this.tap.writev(this.iov, cnt);
    } else {
      // Gather into the reusable bounce buffer (one copy, no allocation).
      let pos = 0;
      for (let i = 0; i < cnt; i++) {
        this.txBuf.set(mem.view(c.addr[i]!, c.len[i]!), pos);
        pos += c.len[i]!;
      }
      r = this.tap.write(this.txBuf.subarray(0, n));
    }
    if (r === n) {
      this.stats.txPackets++;
      this.stats.txBytes += n - VNET_HDR_SIZE;
    } else {
      this.stats.txDropped++;
    }
  }

  /** Continues TX after the event loop had a turn (skipped while paused or reset: resume/activate kick the queue). */
  private rekickTx(): void {
    if (this.txRekick) return;
    this.txRekick = true;
    setImmediate(() => {
      this.txRekick = false;
      if (this.closed || !this.ctx.active) return;
      try {
        this.tx();
      } catch (e) {
        this.ctx.needsReset(`queue ${TXQ}: ${(e as Error).message}`, e);
      }
    });
  }

  /** Moves frames from the TAP into RX chains until either runs out. */
  rx(): void {
    if (this.closed) return;
    if (!this.ctx.active) {
      // Paused, reset pending or needs-reset: leave frames in the TAP; resume/activate kicks RX again.
      this.watch?.setActive(false);
      return;
    }
    if (!this.tap.attached) {
      const r = this.tap.attachQueue();
      if (r < 0) throw new KvmkitError('KVMKIT_ERR_VIRTIO_NET_TAP', `TUNSETQUEUE(IFF_ATTACH_QUEUE) on ${this.tap.name} failed: errno ${-r}`, { details: { errno: -r } });
    }
    const vq = this.ctx.queue(RXQ);
    const mem = this.ctx.memory;
    let delivered = 0;
    try {
      const c = this.rxChain;
      for (let turn = 0; turn < TURN_CHAINS; turn++) {
        if (!vq.ready || !vq.popInto(c)) {
          // No RX buffer: stop polling the TAP until the driver posts buffers, keeping at most one frame
          // already waiting there (so it is part of a snapshot taken meanwhile).
          if (!this.held) {
            const r = this.tap.read(this.rxBuf);
            if (r >= VNET_HDR_SIZE) this.held = Buffer.from(this.rxBuf.subarray(0, r));
            else if (r < 0 && r !== -11) throw new KvmkitError('KVMKIT_ERR_VIRTIO_NET_TAP', `TAP read failed: errno ${-r}`, { details: { errno: -r } });
          }
          this.watch?.setActive(false);
          break;
        }
        if (this.held) {
          const frame = this.held;
          this.held = undefined;
          this.deliverCopy(c, frame);
          delivered++;
          continue;
        }
        const first = c.readable; // writable buffers are [readable, count)
        const cnt = c.count - first;
        let r: number;
        if (cnt === 1 && c.len[first]! >= VNET_HDR_SIZE + MAX_FRAME && this.linkUp) {
          // One device-writable buffer that holds any frame the TAP can hand us: read(2) straight into guest
          // memory (no spill needed, and read costs the kernel less than readv). Only then: a read into a shorter
          // buffer truncates a longer frame silently (read returns the bytes copied).
          // markWritten after the read: a dirty-log round taken between a mark and the write cannot lose it
          const at = c.addr[first]!;
          const len = c.len[first]!;
          // SAFETY (readAt): hostAddress bounds-checks the buffer; guest RAM stays mapped until the machine stops.
          r = this.useHostIo(mem) ? this.tap.readAt(mem.hostAddress(at, len), len) : this.tap.read(mem.view(at, len));
          if (r >= VNET_HDR_SIZE && r <= len) {
            // num_buffers (offset 10) = 1: no MRG_RXBUF, one chain per frame.
            mem.writeU16(at + 10, 1);
            mem.markWritten(c.addr[first]!, r);
            vq.pushUsed(c, r);
            delivered++;
            this.stats.rxPackets++;
            this.stats.rxBytes += r - VNET_HDR_SIZE;
            continue;
          }
        } else if (this.linkUp && cnt < IOV_MAX && this.useHostIo(mem)) {
          // readv(2) straight into the chain's buffers, then the spill buffer: a frame longer than the chain runs
          // into the spill (r > writableLength) instead of being truncated silently.
          for (let i = 0; i < cnt; i++) this.setIov(i, mem.hostAddress(c.addr[first + i]!, c.len[first + i]!), c.len[first + i]!);
          this.setIov(cnt, this.rxSpill, this.rxBuf.length);
          // SAFETY: guest buffers bounds-checked by hostAddress (mapped until the machine stops); rxBuf lives with us.
          r = this.tap.readv(this.iov, cnt + 1);
          if (r >= VNET_HDR_SIZE) {
            const wl = c.writableLength;
            markWritten(mem, c, Math.min(r, wl));
            if (r <= wl) {
              // num_buffers (offset 10) = 1 (the TAP leaves those 2 bytes of the 12-byte header alone)
              if (c.len[first]! >= VNET_HDR_SIZE) mem.writeU16(c.addr[first]! + 10, 1);
              else c.write(mem, NUM_BUFFERS_1, 10);
              vq.pushUsed(c, r);
              this.stats.rxPackets++;
              this.stats.rxBytes += r - VNET_HDR_SIZE;
            } else {
              // Longer than the chain: dropped, the chain completes empty (as deliverCopy does).
              this.stats.rxDropped++;
              vq.pushUsed(c, 0);
            }
            delivered++;
            continue;
          }
        } else {
          // Link down, no host addresses (unit-test memory) or too many buffers: read into the host buffer, copy.
          r = this.tap.read(this.rxBuf);
          if (r >= VNET_HDR_SIZE) {
            this.deliverCopy(c, this.rxBuf.subarray(0, r));
            delivered++;
            continue;
          }
        }
        if (r === -11) {
          // TAP drained: the chain goes back to the ring untouched (as far as the driver can tell).
          vq.unpop(c);
          break;
        }
        if (r < 0) {
          vq.unpop(c);
          throw new KvmkitError('KVMKIT_ERR_VIRTIO_NET_TAP', `TAP read failed: errno ${-r}`, { details: { errno: -r } });
        }
        if (r < VNET_HDR_SIZE) {
          vq.unpop(c); // not a frame: skip it, the chain is used for the next one
          continue;
        }
        // Defensive (a read(2) never returns more than its buffer): dropped, the chain completes empty.
        this.stats.rxDropped++;
        vq.pushUsed(c, 0);
        delivered++;
      }
      if (!this.held && this.watch && !this.watch.active && vq.ready) this.watch.setActive(true);
    } finally {
      if (delivered) this.ctx.signalUsed(RXQ);
    }
  }

  /** A frame from a host buffer into chain `c` (one copy); dropped (chain completed empty) when it does not fit or the link is down. */
  private deliverCopy(c: ChainBuf, frame: Buffer): void {
    const vq = this.ctx.queue(RXQ);
    if (!this.linkUp || c.writableLength < frame.length) {
      this.stats.rxDropped++;
      vq.pushUsed(c, 0);
      return;
    }
    frame.writeUInt16LE(1, 10);
    const n = c.write(this.ctx.memory, frame);
    vq.pushUsed(c, n);
    this.stats.rxPackets++;
    this.stats.rxBytes += n - VNET_HDR_SIZE;
  }

  override saveState(): unknown {
    // The held frame was taken from the TAP: it exists nowhere else, so it travels with the state.
    return { version: NET_STATE_VERSION, mac: this.config.slice(0, 6), linkUp: this.linkUp, stats: { ...this.stats }, ...(this.held ? { held: new Uint8Array(this.held) } : {}) };
  }

  override restoreState(s: unknown): void {
    const o = (s ?? {}) as { version?: unknown; mac?: unknown; linkUp?: unknown; stats?: Partial<NetStats>; held?: unknown };
    const fail = (what: string) => new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `virtio-net state: ${what}`, { details: { what } });
    if (o.version !== 1 && o.version !== NET_STATE_VERSION) throw fail(`version ${String(o.version)} is not supported`);
    if (o.held !== undefined && (!(o.held instanceof Uint8Array) || o.held.length < VNET_HDR_SIZE || o.held.length > VNET_HDR_SIZE + MAX_FRAME)) throw fail('held frame is not 12..65602 bytes');
    if (o.mac instanceof Uint8Array && o.mac.length === 6) this.config.set(o.mac, 0);
    this.linkUp = o.linkUp !== false;
    this.writeStatusField();
    if (o.stats) for (const k of Object.keys(this.stats) as (keyof NetStats)[]) if (typeof o.stats[k] === 'number') this.stats[k] = o.stats[k]!;
    // Delivered first once the device runs (resume kicks the RX queue).
    this.held = o.held instanceof Uint8Array ? Buffer.from(o.held) : undefined;
  }

  override close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watch?.close();
    this.watch = undefined;
    this.tap.close();
  }
}
