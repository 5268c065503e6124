import * as fs from 'node:fs';
import { KvmkitError, ffi, type Logger } from '@kvmkit/kernel';
import { VIRTIO_ID, VirtioDevice, bit, type ChainBuf, type IoThreadSpec } from '@kvmkit/virtio';
import { BlkRequests, SECTOR, STATS_BYTES, VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S, VIRTIO_BLK_T, alignedBuffer, sharedStats, type BlkRequestOptions, type BlkStats } from './requests.js';
import type { BlkWorkerData } from './worker.js';

export { VIRTIO_BLK_F, VIRTIO_BLK_T, VIRTIO_BLK_S, SECTOR, VIRTIO_BLK_ID_BYTES, alignedBuffer } from './requests.js';
export type { BlkStats } from './requests.js';

export const BLK_CONFIG_SIZE = 60;
export const BLK_STATE_VERSION = 1;

/** Config space offsets (§5.2.4). */
export const BLK_CFG = {
  capacity: 0,
  size_max: 8,
  seg_max: 12,
  geometry: 16,
  blk_size: 20,
  topology: 24,
  writeback: 32,
  num_queues: 34,
  max_discard_sectors: 36,
  max_discard_seg: 40,
  discard_sector_alignment: 44,
  max_write_zeroes_sectors: 48,
  max_write_zeroes_seg: 52,
  write_zeroes_may_unmap: 56,
} as const;

export interface BlkDeviceOptions {
  path: string;
  readOnly: boolean;
  direct: boolean;
  serial: string;
  queueSize: number;
  /** Largest data segment (config size_max). */
  sizeMax: number;
  /** Most data segments per request (config seg_max). */
  segMax: number;
  /** Most sectors per DISCARD / WRITE_ZEROES segment. */
  maxDiscardSectors: number;
  /**
   * Serve reads, writes and flushes synchronously on the main thread instead of on libuv's threadpool.
   * `undefined` (auto): only for images on a memory-backed filesystem (tmpfs, ramfs) opened without
   * O_DIRECT, where a read or write is a memory copy that cannot wait on a disk.
   */
  syncIo?: boolean | undefined;
  /**
   * With syncIo: after serving a notification, keep polling the avail ring for this many µs (new requests are
   * served at once, and VIRTQ_USED_F_NO_NOTIFY tells the driver it need not notify meanwhile). 0 disables.
   * Default 0 (see DEFAULT_POLL_US).
   */
  pollUs?: number | undefined;
  /**
   * Serve the queue in a dedicated I/O thread (default true): every request synchronously there, the main
   * thread only handles register accesses. False: the main-thread paths (syncIo / threadpool).
   */
  ioThread?: boolean | undefined;
  log: Logger;
}

/**
 * Default busy-poll window after a notification on the synchronous path (µs): off. On the 2-core nested dev
 * host, polling 50 µs neither helped nor hurt measurably (the spinning main thread competes with the vCPU
 * thread for the two cores); it stays an option (`pollUs`).
 */
export const DEFAULT_POLL_US = 0;
/**
 * Default busy-poll window of the I/O thread after its rings ran empty (µs). See the README (measured).
 */
export const DEFAULT_IOTHREAD_POLL_US = 0;

/** URL of the compiled I/O thread module (dist/worker.js, also when this module runs from src under vitest). */
function workerModuleUrl(): string {
  const here = import.meta.url;
  return here.endsWith('.ts') ? new URL('../dist/worker.js', here).href : new URL('./worker.js', here).href;
}

/** Longest one notification may keep the main thread before the rest continues from a macrotask (ms). */
const TURN_BUDGET_MS = 1;

/**
 * virtio-blk over a raw image file. Requests are parsed and validated on the main thread, their I/O runs on
 * libuv's threadpool through fs.promises (the event loop never waits on the disk), and each request is
 * completed (status byte, used ring, interrupt) when its I/O finishes, so completions come in finishing order.
 * Guest data is copied: OUT payloads when the request is popped, IN payloads into guest memory only when the
 * read finished and the queue was not reset meanwhile.
 */
export class VirtioBlk extends VirtioDevice {
  readonly deviceId = VIRTIO_ID.BLOCK;
  readonly name: string;
  readonly queueSizes: number[];
  readonly features: bigint;
  readonly capacity: bigint; // sectors
  /** Counters, in a SharedArrayBuffer that the I/O thread counts into as well. */
  readonly stats: BlkStats;
  private readonly statsBuffer = new SharedArrayBuffer(STATS_BYTES);
  /** Whether the file really was opened with O_DIRECT. */
  direct = false;
  /** Whether reads/writes/flushes run synchronously on the main thread (see BlkDeviceOptions.syncIo). */
  syncIo = false;
  private fh: fs.promises.FileHandle | undefined;
  private buffered: Promise<fs.promises.FileHandle> | undefined;
  private readonly inflight = new Set<Promise<void>>();
  private readonly rekickPending = new Set<number>();
  private readonly idBytes: Uint8Array;
  private closed = false;
  /** The request code (shared with the I/O thread's copy, worker.ts). */
  private requests: BlkRequests | undefined;

  private constructor(
    readonly opts: BlkDeviceOptions,
    size: number,
    name: string,
  ) {
    super();
    this.stats = sharedStats(this.statsBuffer);
    this.name = name;
    this.queueSizes = [opts.queueSize];
    this.capacity = BigInt(size / SECTOR);
    let f = bit(VIRTIO_BLK_F.SIZE_MAX) | bit(VIRTIO_BLK_F.SEG_MAX) | bit(VIRTIO_BLK_F.BLK_SIZE) | bit(VIRTIO_BLK_F.FLUSH);
    if (opts.readOnly) f |= bit(VIRTIO_BLK_F.RO);
    else f |= bit(VIRTIO_BLK_F.DISCARD) | bit(VIRTIO_BLK_F.WRITE_ZEROES);
    this.features = f;
    const c = new DataView(new ArrayBuffer(BLK_CONFIG_SIZE));
    c.setBigUint64(BLK_CFG.capacity, this.capacity, true);
    c.setUint32(BLK_CFG.size_max, opts.sizeMax, true);
    c.setUint32(BLK_CFG.seg_max, opts.segMax, true);
    c.setUint32(BLK_CFG.blk_size, SECTOR, true);
    c.setUint16(BLK_CFG.num_queues, 1, true);
    c.setUint32(BLK_CFG.max_discard_sectors, opts.maxDiscardSectors, true);
    c.setUint32(BLK_CFG.max_discard_seg, 1, true);
    c.setUint32(BLK_CFG.discard_sector_alignment, 1, true);
    c.setUint32(BLK_CFG.max_write_zeroes_sectors, opts.maxDiscardSectors, true);
    c.setUint32(BLK_CFG.max_write_zeroes_seg, 1, true);
    c.setUint8(BLK_CFG.write_zeroes_may_unmap, 0);
    this.config = new Uint8Array(c.buffer);
    this.idBytes = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    this.idBytes.set(new TextEncoder().encode(opts.serial).subarray(0, VIRTIO_BLK_ID_BYTES));
  }

  /** The open function used (tests replace it to simulate filesystems without O_DIRECT). */
  static fsOpen: (p: string, flags: number) => Promise<fs.promises.FileHandle> = (p, flags) => fs.promises.open(p, flags);

  /** Opens the image (O_DIRECT when asked and supported) and builds the device. */
  static async open(opts: BlkDeviceOptions, name = 'virtio-blk'): Promise<VirtioBlk> {
    const st = statImage(opts.path);
    const base = opts.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    let fh: fs.promises.FileHandle;
    let direct = false;
    const openErr = (e: unknown) =>
      new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_FILE', `virtio-blk: cannot open ${opts.path}${opts.readOnly ? '' : ' for writing'}: ${(e as Error).message}`, {
        cause: e,
        details: { path: opts.path, code: (e as NodeJS.ErrnoException).code },
      });
    if (opts.direct) {
      try {
        fh = await VirtioBlk.fsOpen(opts.path, base | fs.constants.O_DIRECT);
        direct = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw openErr(e);
        opts.log.warn({ path: opts.path }, 'O_DIRECT is not supported on this filesystem: using the page cache');
        try {
          fh = await VirtioBlk.fsOpen(opts.path, base);
        } catch (e2) {
          throw openErr(e2);
        }
      }
    } else {
      try {
        fh = await VirtioBlk.fsOpen(opts.path, base);
      } catch (e) {
        throw openErr(e);
      }
    }
    const dev = new VirtioBlk(opts, st.size, name);
    dev.fh = fh;
    dev.direct = direct;
    dev.syncIo = opts.syncIo ?? (!direct && isMemoryBacked(opts.path));
    dev.requests = new BlkRequests(dev.requestOptions(false), () => dev.ctx, dev.stats, opts.log);
    return dev;
  }

  processQueue(q: number): void {
    const vq = this.ctx.queue(q);
    const pollMs = this.syncIo ? (this.opts.pollUs ?? DEFAULT_POLL_US) / 1000 : 0;
    const start = performance.now();
    let suppressed = false;
    const suppress = (on: boolean) => {
      if (on === suppressed) return;
      vq.suppressNotifications(on);
      suppressed = on;
    };
    try {
      // While this serves (and polls), the driver need not notify (VIRTQ_USED_F_NO_NOTIFY), as QEMU does while
      // it processes a queue: requests published meanwhile are picked up by the pop loop below.
      if (this.syncIo) suppress(true);
      for (;;) {
        const limited = this.requests!.drain(q, vq.size, this.syncIo, (c) => this.startAsync(c));
        // A driver that keeps the ring full must not starve the event loop (serial, timers, other devices).
        const overBudget = performance.now() - start >= TURN_BUDGET_MS;
        if (limited && !overBudget) continue;
        if (!overBudget && pollMs > 0 && this.ctx.active && vq.ready) {
          // Busy-poll the avail ring briefly: a driver that keeps requests flowing adds the next ones soon,
          // and serving them here saves its notification (a guest exit) and the main thread's wake-up (tens
          // of µs on a loaded or nested host). Completions were already signalled by drain().
          suppress(true);
          const until = performance.now() + pollMs;
          let more = vq.pending() > 0;
          for (let i = 0; !more; i++) {
            if ((i & 63) === 63 && performance.now() >= until) break;
            more = vq.pending() > 0;
          }
          if (more) continue;
        }
        // Leaving: notifications back on FIRST, then one more look — a request published before the driver
        // saw the flag cleared gets no notification (the seq-cst store orders the flag before the load).
        suppress(false);
        if (vq.pending() === 0) break;
        if (overBudget) {
          this.rekick(q); // give the event loop a turn, continue from a macrotask
          break;
        }
      }
    } finally {
      suppress(false);
    }
  }

  /** Continues serving queue `q` after the event loop had a turn (skipped while paused: resume kicks every queue). */
  private rekick(q: number): void {
    if (this.rekickPending.has(q)) return;
    this.rekickPending.add(q);
    setImmediate(() => {
      this.rekickPending.delete(q);
      if (this.closed || !this.ctx.active) return;
      try {
        this.processQueue(q);
      } catch (e) {
        this.ctx.needsReset(`queue ${q}: ${(e as Error).message}`, e);
      }
    });
  }

  /** What the request code needs (also sent to the I/O thread). */
  private requestOptions(syncAll: boolean): BlkRequestOptions {
    return {
      fd: this.fh!.fd,
      path: this.opts.path,
      readOnly: this.opts.readOnly,
      direct: this.direct,
      capacity: this.capacity,
      sizeMax: this.opts.sizeMax,
      segMax: this.opts.segMax,
      maxDiscardSectors: this.opts.maxDiscardSectors,
      idBytes: this.idBytes,
      syncAll,
    };
  }

  /**
   * The I/O thread (BlkDeviceOptions.ioThread, default on): worker.ts serves every request there with the same
   * request code (requests.ts), synchronously, counting into the shared stats.
   */
  override ioThread(): IoThreadSpec | undefined {
    if (this.opts.ioThread === false || !this.fh || this.closed) return undefined;
    const data: BlkWorkerData = { options: this.requestOptions(true), stats: this.statsBuffer };
    return { module: workerModuleUrl(), data, pollUs: this.opts.pollUs ?? DEFAULT_IOTHREAD_POLL_US };
  }

  /** The asynchronous path (main thread, threadpool I/O): completes when the I/O finished. */
  private startAsync(c: ChainBuf): void {
    const p = this.handle(c).then(
      (r) => this.requests!.complete(c, r.status, r.len, true),
      (e) => {
        this.opts.log.error({ err: e }, 'virtio-blk request failed');
        this.requests!.complete(c, VIRTIO_BLK_S.IOERR, 0, true);
      },
    );
    this.inflight.add(p);
    void p.finally(() => this.inflight.delete(p));
  }

  private async handle(c: ChainBuf): Promise<{ status: number; len: number }> {
    const mem = this.ctx.memory;
    const fh = this.fh;
    if (c.readableLength < 16 || !fh) return { status: VIRTIO_BLK_S.IOERR, len: 0 };
    const { type, sector } = this.requests!.header(c);
    const outLen = c.readableLength - 16; // payload after the header
    const inLen = c.writableLength - 1; // writable bytes before the status byte
    const S = VIRTIO_BLK_S;
    switch (type) {
      case VIRTIO_BLK_T.IN: {
        if (!this.requests!.checkSegments(c, true) || inLen % SECTOR !== 0 || !this.requests!.inRange(sector, inLen)) return { status: S.IOERR, len: 0 };
        const buf = this.direct ? alignedBuffer(inLen) : Buffer.allocUnsafe(inLen);
        await this.directFallback((f) => readAll(f, buf, sector * SECTOR));
        if (!c.valid || mem.isClosed) return { status: S.IOERR, len: 0 };
        c.write(mem, buf);
        this.stats.reads++;
        this.stats.bytesRead += inLen;
        return { status: S.OK, len: inLen };
      }
      case VIRTIO_BLK_T.OUT: {
        if (this.opts.readOnly) return { status: S.IOERR, len: 0 };
        if (!this.requests!.checkSegments(c, false) || outLen % SECTOR !== 0 || !this.requests!.inRange(sector, outLen)) return { status: S.IOERR, len: 0 };
        const data = c.read(mem, 16, outLen);
        const buf = this.direct ? alignedBuffer(outLen) : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
        if (this.direct) buf.set(data);
        await this.directFallback((f) => writeAll(f, buf, sector * SECTOR));
        this.stats.writes++;
        this.stats.bytesWritten += outLen;
        return { status: S.OK, len: 0 };
      }
      case VIRTIO_BLK_T.FLUSH:
        await fh.datasync();
        this.stats.flushes++;
        return { status: S.OK, len: 0 };
      case VIRTIO_BLK_T.GET_ID: {
        const n = Math.min(inLen, VIRTIO_BLK_ID_BYTES);
        c.write(mem, this.idBytes.subarray(0, n));
        this.stats.getIds++;
        return { status: S.OK, len: n };
      }
      case VIRTIO_BLK_T.DISCARD:
      case VIRTIO_BLK_T.WRITE_ZEROES: {
        const isWz = type === VIRTIO_BLK_T.WRITE_ZEROES;
        const seg = this.requests!.checkDiscard(c, type);
        if ('status' in seg) return seg;
        const segSector = seg.sector;
        const num = seg.num;
        if (isWz) {
          await this.directFallback((f) => this.writeZeroes(f, segSector * SECTOR, num * SECTOR));
          this.stats.writeZeroes++;
        } else {
          // Discard is advisory (§5.2.6.2): punch a hole so the host frees the blocks. Filesystems that cannot
          // (EOPNOTSUPP) keep the data, which the spec allows. The range was checked against the capacity above.
          if (num > 0) {
            const r = ffi.fallocate(this.fh!.fd, ffi.FALLOC_FL_PUNCH_HOLE | ffi.FALLOC_FL_KEEP_SIZE, segSector * SECTOR, num * SECTOR);
            if (r < 0 && r !== -95 /* EOPNOTSUPP */) return { status: S.IOERR, len: 0 };
          }
          this.stats.discards++;
        }
        return { status: S.OK, len: 0 };
      }
      default:
        return { status: S.UNSUPP, len: 0 };
    }
  }

  /**
   * Runs `op` on the image; with O_DIRECT, an EINVAL (an offset/length the host device's logical block size
   * does not allow, e.g. 512-byte I/O on a 4Kn disk) is retried once through a buffered fd (logged once).
   */
  private async directFallback(op: (fh: fs.promises.FileHandle) => Promise<void>): Promise<void> {
    try {
      await op(this.fh!);
    } catch (e) {
      if (!this.direct || (e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
      if (!this.buffered) {
        this.opts.log.warn({ path: this.opts.path }, 'O_DIRECT refused an unaligned request: such requests use the page cache');
        this.buffered = VirtioBlk.fsOpen(this.opts.path, this.opts.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
      }
      this.stats.directFallbacks++;
      await op(await this.buffered);
    }
  }

  private async writeZeroes(fh: fs.promises.FileHandle, pos: number, len: number): Promise<void> {
    const chunk = Math.min(len, 1 << 20);
    const zero = this.direct ? alignedBuffer(chunk) : Buffer.alloc(chunk);
    for (let off = 0; off < len; off += chunk) await writeAll(fh, zero.subarray(0, Math.min(chunk, len - off)), pos + off);
  }

  override async quiesce(): Promise<void> {
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
  }

  /**
   * Requests in the device's hands: on the main thread, those whose I/O has not finished; while the I/O thread
   * owns the queue, those the driver made available and the device has not completed yet (it serves them without
   * further notice, and a pause completes them first). 0 while paused.
   */
  get inflightCount(): number {
    if (this.closed) return 0;
    try {
      const ctx = this.ctx;
      if (ctx.ioThreadActive) {
        const q = ctx.queue(0);
        if (!q.ready || ctx.memory.isClosed) return 0;
        return (ctx.memory.readU16(q.driver + 2n) - ctx.memory.readU16(q.device + 2n)) & 0xffff;
      }
    } catch {
      /* not attached, or rings outside memory */
    }
    return this.inflight.size;
  }

  override saveState(): unknown {
    return { version: BLK_STATE_VERSION, capacity: this.capacity, readOnly: this.opts.readOnly, stats: { ...this.stats } };
  }

  override restoreState(s: unknown): void {
    const o = (s ?? {}) as { version?: unknown; capacity?: unknown; readOnly?: unknown; stats?: Partial<BlkStats> };
    if (o.version !== BLK_STATE_VERSION) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `${this.name}: state version ${String(o.version)} is not supported`);
    if (BigInt(o.capacity as bigint) !== this.capacity) {
      throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `${this.name}: saved capacity ${String(o.capacity)} sectors differs from the image (${this.capacity})`, {
        details: { saved: String(o.capacity), image: String(this.capacity) },
      });
    }
    if (o.stats) for (const k of Object.keys(this.stats) as (keyof BlkStats)[]) if (typeof o.stats[k] === 'number') this.stats[k] = o.stats[k]!;
  }

  override async close(): Promise<void> {
    await this.quiesce();
    this.closed = true;
    this.requests?.close();
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
    const b = this.buffered;
    this.buffered = undefined;
    await (await b?.catch(() => undefined))?.close();
  }
}

async function readAll(fh: fs.promises.FileHandle, buf: Buffer, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, pos + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  if (done < buf.length) buf.fill(0, done);
}

async function writeAll(fh: fs.promises.FileHandle, buf: Uint8Array, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, pos + done);
    if (bytesWritten <= 0) throw new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_IO', 'short write');
    done += bytesWritten;
  }
}

/** statfs f_type of memory-backed filesystems, where file I/O is a memory copy. */
const MEMORY_FS = new Set([0x01021994 /* TMPFS_MAGIC */, 0x858458f6 /* RAMFS_MAGIC */]);

/** Whether `path` lies on tmpfs or ramfs (false when statfs fails). */
export function isMemoryBacked(path: string): boolean {
  try {
    return MEMORY_FS.has(Number(fs.statfsSync(path).type));
  } catch {
    return false;
  }
}

/** Checks an image path: exists, regular file, size a non-zero multiple of 512. Coded errors otherwise. */
export function statImage(path: string): fs.Stats {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (e) {
    throw new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_FILE', `virtio-blk: image ${path} cannot be read: ${(e as Error).message}`, {
      cause: e,
      details: { path, code: (e as NodeJS.ErrnoException).code },
    });
  }
  if (!st.isFile()) throw new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_FILE', `virtio-blk: image ${path} is not a regular file`, { details: { path } });
  if (st.size === 0 || st.size % SECTOR !== 0) {
    throw new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_SIZE', `virtio-blk: image ${path} is ${st.size} bytes, not a non-zero multiple of 512`, { details: { path, size: st.size } });
  }
  return st;
}
