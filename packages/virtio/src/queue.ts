import { KvmkitError, type GuestMemory } from '@kvmkit/kernel';
import { VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F, VIRTQ_MAX_SIZE, VIRTQ_USED_F_NO_NOTIFY } from './constants.js';

/**
 * A guest-caused virtqueue error (malformed ring or descriptor chain). The transport turns it into
 * DEVICE_NEEDS_RESET; it never reaches the VMM's caller.
 */
export class VirtqueueError extends KvmkitError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('KVMKIT_ERR_VIRTIO_QUEUE', message, { details });
  }
}

/** One guest buffer of a chain; [addr, addr+len) was checked to lie inside one guest RAM region. */
export interface DescBuf {
  addr: bigint;
  len: number;
}

/** Limit on the bytes one direction of a chain may describe (used.len is a u32). */
export const MAX_CHAIN_BYTES = 0xffff_ffff;

/**
 * A validated descriptor chain: device-readable buffers, then device-writable buffers.
 * `valid` turns false when the queue was reset after the chain was popped (the device must then neither
 * touch the buffers nor complete the chain).
 */
export class DescriptorChain {
  readonly readable: DescBuf[] = [];
  readonly writable: DescBuf[] = [];
  readableLength = 0;
  writableLength = 0;
  /** Number of descriptors walked (main table + indirect). */
  descriptors = 0;

  constructor(
    readonly queue: Virtqueue,
    readonly head: number,
    readonly epoch: number,
    /** The same chain in ChainBuf form (its own copy): read/write go through it, one copy loop for both forms. */
    private readonly buf: ChainBuf,
  ) {}

  get valid(): boolean {
    return this.queue.epoch === this.epoch && this.queue.ready;
  }

  /** Copies up to `len` readable bytes starting at `offset` (default: all). */
  read(mem: GuestMemory, offset = 0, len = this.readableLength - offset): Uint8Array {
    return this.buf.read(mem, offset, len);
  }

  /** Writes `data` into the writable buffers starting at writable offset `offset`; returns bytes written. */
  write(mem: GuestMemory, data: Uint8Array, offset = 0): number {
    return this.buf.write(mem, data, offset);
  }
}

const TWO32 = 2 ** 32;

/**
 * The allocation-free form of a validated chain (`Virtqueue.popInto`), for hot paths: guest addresses and lengths
 * as Numbers in typed arrays, reused from one pop to the next. Buffers `[0, readable)` are device-readable,
 * `[readable, count)` device-writable; every `[addr[i], addr[i]+len[i])` was checked to lie inside one guest RAM
 * region. `valid` turns false when the queue was reset or disabled after the pop.
 */
export class ChainBuf {
  queue: Virtqueue | undefined;
  head = 0;
  epoch = 0;
  /** Buffers in the chain (readable first). */
  count = 0;
  /** Number of device-readable buffers (they come first). */
  readable = 0;
  readableLength = 0;
  writableLength = 0;
  /** Number of descriptors walked (main table + indirect). */
  descriptors = 0;
  addr: Float64Array;
  len: Uint32Array;

  constructor(capacity = 8) {
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
  }

  get valid(): boolean {
    const q = this.queue;
    return q !== undefined && q.epoch === this.epoch && q.ready;
  }

  /** Forgets the chain (count 0). */
  clear(queue: Virtqueue | undefined, head: number, epoch: number): void {
    this.queue = queue;
    this.head = head;
    this.epoch = epoch;
    this.count = this.readable = this.readableLength = this.writableLength = this.descriptors = 0;
  }

  /** Appends a buffer (the caller validated it). */
  push(addr: number, len: number, writable: boolean): void {
    if (this.count === this.addr.length) {
      const a = new Float64Array(this.addr.length * 2);
      a.set(this.addr);
      const l = new Uint32Array(this.len.length * 2);
      l.set(this.len);
      this.addr = a;
      this.len = l;
    }
    this.addr[this.count] = addr;
    this.len[this.count] = len;
    this.count++;
    if (writable) this.writableLength += len;
    else {
      this.readable++;
      this.readableLength += len;
    }
  }

  /** A copy that owns its arrays (e.g. to keep a chain across an await while the original is reused). */
  clone(): ChainBuf {
    const c = new ChainBuf(Math.max(1, this.count));
    c.clear(this.queue, this.head, this.epoch);
    for (let i = 0; i < this.count; i++) c.push(this.addr[i]!, this.len[i]!, i >= this.readable);
    c.descriptors = this.descriptors;
    return c;
  }

  /** The object form (BigInt addresses), e.g. for code written against DescriptorChain. */
  toChain(): DescriptorChain {
    const c = new DescriptorChain(this.queue!, this.head, this.epoch, this.clone());
    for (let i = 0; i < this.count; i++) {
      const b = { addr: BigInt(this.addr[i]!), len: this.len[i]! };
      if (i < this.readable) c.readable.push(b);
      else c.writable.push(b);
    }
    c.readableLength = this.readableLength;
    c.writableLength = this.writableLength;
    c.descriptors = this.descriptors;
    return c;
  }

  /** Copies up to `len` readable bytes starting at readable offset `offset` (default: all). */
  read(mem: GuestMemory, offset = 0, len = this.readableLength - offset): Uint8Array {
    len = Math.max(0, Math.min(len, this.readableLength - offset));
    const out = new Uint8Array(len);
    let pos = 0;
    let skip = offset;
    for (let i = 0; i < this.readable && pos < len; i++) {
      const bl = this.len[i]!;
      if (skip >= bl) {
        skip -= bl;
        continue;
      }
      const n = Math.min(bl - skip, len - pos);
      out.set(mem.view(this.addr[i]! + skip, n), pos);
      pos += n;
      skip = 0;
    }
    return out;
  }

  /** Writes `data` into the writable buffers from writable offset `offset`; returns bytes written (dirty-tracked after the copy). */
  write(mem: GuestMemory, data: Uint8Array, offset = 0): number {
    let pos = 0;
    let skip = offset;
    for (let i = this.readable; i < this.count && pos < data.length; i++) {
      const bl = this.len[i]!;
      if (skip >= bl) {
        skip -= bl;
        continue;
      }
      const n = Math.min(bl - skip, data.length - pos);
      const at = this.addr[i]! + skip;
      mem.view(at, n).set(data.subarray(pos, pos + n));
      mem.markWritten(at, n);
      pos += n;
      skip = 0;
    }
    return pos;
  }
}

export interface VirtqueueState {
  size: number;
  ready: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
  lastAvail: number;
  usedIdx: number;
  signalledUsed: number;
}

/**
 * A split virtqueue (virtio 1.x §2.7). The transport programs `size`/addresses and calls `enable()`;
 * devices `pop()` validated chains and `pushUsed()` completions. Everything read from guest memory is
 * validated; violations throw VirtqueueError.
 */
export class Virtqueue {
  /** Queue size programmed by the driver (QueueNum). */
  size: number;
  ready = false;
  desc = 0n;
  driver = 0n;
  device = 0n;
  lastAvail = 0;
  usedIdx = 0;
  /** used idx at the last interrupt decision (EVENT_IDX). */
  signalledUsed = 0;
  /** Bumped by reset(): chains popped before become invalid. */
  epoch = 0;
  private lastPopped: DescriptorChain | ChainBuf | undefined;
  /** pop()'s walk target (converted to a DescriptorChain). */
  private readonly scratch = new ChainBuf();
  indirect = false;
  eventIdx = false;

  private mem: GuestMemory | undefined;
  private descTable: DataView | undefined;
  private avail: DataView | undefined;
  private used: DataView | undefined;
  private availIdx16: Uint16Array | undefined;
  private usedIdx16: Uint16Array | undefined;
  private usedFlags16: Uint16Array | undefined;
  private usedEvent16: Uint16Array | undefined;
  private availEvent16: Uint16Array | undefined;
  /** `device` as a Number (exact: validated inside guest RAM at enable). */
  private deviceN = 0;

  constructor(
    readonly index: number,
    readonly maxSize: number,
  ) {
    if (!Number.isInteger(maxSize) || maxSize < 1 || maxSize > VIRTQ_MAX_SIZE || (maxSize & (maxSize - 1)) !== 0) {
      throw new KvmkitError('KVMKIT_ERR_VIRTIO_CONFIG', `queue ${index}: size ${maxSize} is not a power of 2 in 1..32768`);
    }
    this.size = maxSize;
  }

  /** Back to the reset state (not ready, addresses 0, indexes 0). */
  reset(): void {
    this.ready = false;
    this.size = this.maxSize;
    this.desc = this.driver = this.device = 0n;
    this.lastAvail = this.usedIdx = this.signalledUsed = 0;
    this.epoch++;
    this.drop();
  }

  private drop(): void {
    this.mem = this.descTable = this.avail = this.used = undefined;
    this.availIdx16 = this.usedIdx16 = this.usedFlags16 = this.usedEvent16 = this.availEvent16 = undefined;
  }

  /** Disables without resetting indexes (QueueReady=0). */
  disable(): void {
    this.ready = false;
    this.epoch++;
    this.drop();
  }

  /**
   * Validates size and ring addresses against guest memory and marks the queue ready.
   * Throws VirtqueueError when the driver's programming is invalid.
   */
  enable(mem: GuestMemory, opts: { indirect: boolean; eventIdx: boolean }): void {
    const n = this.size;
    if (!Number.isInteger(n) || n < 1 || n > this.maxSize || (n & (n - 1)) !== 0) {
      throw new VirtqueueError(`queue ${this.index}: size ${n} is not a power of 2 <= ${this.maxSize}`, { queue: this.index, size: n });
    }
    const ev = opts.eventIdx ? 2 : 0;
    const descLen = 16 * n;
    const availLen = 4 + 2 * n + ev;
    const usedLen = 4 + 8 * n + ev;
    const check = (what: string, addr: bigint, len: number, align: bigint) => {
      if (addr % align !== 0n) throw new VirtqueueError(`queue ${this.index}: ${what} ring 0x${addr.toString(16)} is not ${align}-byte aligned`, { queue: this.index, what });
      if (!mem.contains(addr, len)) throw new VirtqueueError(`queue ${this.index}: ${what} ring 0x${addr.toString(16)}+${len} is outside guest RAM`, { queue: this.index, what });
    };
    check('descriptor', this.desc, descLen, 16n);
    check('available', this.driver, availLen, 2n);
    check('used', this.device, usedLen, 4n);
    const view = (addr: bigint, len: number) => {
      const r = mem.view(addr, len);
      return new DataView(r.buffer, r.byteOffset, r.byteLength);
    };
    const u16 = (addr: bigint) => {
      const r = mem.view(addr, 2);
      return new Uint16Array(r.buffer, r.byteOffset, 1);
    };
    this.mem = mem;
    this.descTable = view(this.desc, descLen);
    this.avail = view(this.driver, availLen);
    this.used = view(this.device, usedLen);
    this.availIdx16 = u16(this.driver + 2n);
    this.usedIdx16 = u16(this.device + 2n);
    this.usedFlags16 = u16(this.device);
    this.usedEvent16 = opts.eventIdx ? u16(this.driver + BigInt(4 + 2 * n)) : undefined;
    this.availEvent16 = opts.eventIdx ? u16(this.device + BigInt(4 + 8 * n)) : undefined;
    this.deviceN = Number(this.device);
    this.indirect = opts.indirect;
    this.eventIdx = opts.eventIdx;
    this.ready = true;
  }

  /** Driver's avail idx (acquire). */
  private availIdx(): number {
    return Atomics.load(this.availIdx16!, 0);
  }

  /** Number of chains the driver has made available and the device has not popped. Throws if > size. */
  pending(): number {
    if (!this.ready) return 0;
    const p = (this.availIdx() - this.lastAvail) & 0xffff;
    if (p > this.size) {
      throw new VirtqueueError(`queue ${this.index}: avail idx moved ${p} entries ahead of a ${this.size}-entry ring`, { queue: this.index, pending: p });
    }
    return p;
  }

  /**
   * The next available chain, validated, or null when the ring is empty. With EVENT_IDX, an empty ring
   * publishes avail_event = last_avail_idx (so the driver notifies on the next buffer) and re-checks.
   */
  pop(): DescriptorChain | null {
    if (!this.popInto(this.scratch)) return null;
    const chain = this.scratch.toChain();
    this.lastPopped = chain;
    return chain;
  }

  /**
   * Like `pop()`, into a reusable ChainBuf (no allocation per chain; Number addresses). Returns false when the
   * ring is empty. Same validation and EVENT_IDX behaviour as `pop()`; `unpop(out)` gives it back.
   */
  popInto(out: ChainBuf): boolean {
    if (!this.ready) return false;
    let p = this.pending();
    if (p === 0) {
      if (!this.availEvent16) return false;
      Atomics.store(this.availEvent16, 0, this.lastAvail); // seq-cst store: also a full fence
      this.mem!.markWritten(this.deviceN + 4 + 8 * this.size, 2);
      p = this.pending();
      if (p === 0) return false;
    }
    const head = this.avail!.getUint16(4 + 2 * (this.lastAvail % this.size), true);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    this.lastPopped = undefined;
    if (head >= this.size) {
      throw new VirtqueueError(`queue ${this.index}: head index ${head} >= queue size ${this.size}`, { queue: this.index, head });
    }
    this.walk(head, out);
    this.lastPopped = out;
    return true;
  }

  /**
   * Gives back the chain `pop()` returned (or `popInto()` filled) last, not completed: the next pop returns it
   * again (e.g. a NIC that popped an RX buffer and then found no frame). Only that chain, only before any other
   * pop; a chain from before a queue reset is ignored (the reset already forgot it). Anything else throws
   * VirtqueueError (a device bug).
   */
  unpop(c: DescriptorChain | ChainBuf): void {
    if (!c.valid) return;
    if (c !== this.lastPopped) throw new VirtqueueError(`queue ${this.index}: unpop of a chain that is not the one popped last`, { queue: this.index, head: c.head });
    this.lastAvail = (this.lastAvail - 1) & 0xffff;
    this.lastPopped = undefined;
  }

  private walk(head: number, chain: ChainBuf): void {
    const mem = this.mem!;
    chain.clear(this, head, this.epoch);
    let table = this.descTable!;
    let tableSize = this.size;
    let idx = head;
    let inIndirect = false;
    let count = 0; // descriptors walked in the current table
    let total = 0;
    const q = this.index;
    for (;;) {
      if (idx >= tableSize) throw new VirtqueueError(`queue ${q}: descriptor index ${idx} >= table size ${tableSize}`, { queue: q, head, idx });
      if (++count > tableSize) throw new VirtqueueError(`queue ${q}: descriptor chain from head ${head} loops or exceeds ${tableSize} entries`, { queue: q, head });
      if (++total > this.size + VIRTQ_MAX_SIZE) throw new VirtqueueError(`queue ${q}: descriptor chain too long`, { queue: q, head });
      const off = idx * 16;
      const lo = table.getUint32(off, true);
      const hi = table.getUint32(off + 4, true);
      const len = table.getUint32(off + 8, true);
      const flags = table.getUint16(off + 12, true);
      const next = table.getUint16(off + 14, true);
      // Addresses of 2^53 and above are not Numbers; they are outside guest RAM anyway (reported as such).
      const addr = hi < 0x20_0000 ? hi * TWO32 + lo : -1;
      const hex = () => ((BigInt(hi) << 32n) | BigInt(lo)).toString(16);
      if (flags & VIRTQ_DESC_F.INDIRECT) {
        if (!this.indirect) throw new VirtqueueError(`queue ${q}: indirect descriptor without VIRTIO_F_INDIRECT_DESC`, { queue: q, head });
        if (inIndirect) throw new VirtqueueError(`queue ${q}: nested indirect descriptor`, { queue: q, head });
        if (flags & VIRTQ_DESC_F.NEXT) throw new VirtqueueError(`queue ${q}: indirect descriptor with NEXT set`, { queue: q, head });
        if (len === 0 || len % 16 !== 0 || len / 16 > VIRTQ_MAX_SIZE) {
          throw new VirtqueueError(`queue ${q}: indirect table length ${len} is not a non-zero multiple of 16 (max ${VIRTQ_MAX_SIZE} entries)`, { queue: q, head, len });
        }
        if (addr < 0 || !mem.contains(addr, len)) throw new VirtqueueError(`queue ${q}: indirect table 0x${hex()}+${len} is outside guest RAM`, { queue: q, head });
        const r = mem.view(addr, len);
        table = new DataView(r.buffer, r.byteOffset, r.byteLength);
        tableSize = len / 16;
        idx = 0;
        count = 0;
        inIndirect = true;
        chain.descriptors++;
        continue;
      }
      if (addr < 0 || !mem.contains(addr, len)) {
        throw new VirtqueueError(`queue ${q}: buffer 0x${hex()}+${len} is outside guest RAM`, { queue: q, head, len });
      }
      chain.descriptors++;
      if (flags & VIRTQ_DESC_F.WRITE) {
        chain.push(addr, len, true);
        if (chain.writableLength > MAX_CHAIN_BYTES) throw new VirtqueueError(`queue ${q}: writable length exceeds 4 GiB`, { queue: q, head });
      } else {
        if (chain.count > chain.readable) throw new VirtqueueError(`queue ${q}: device-readable descriptor after a device-writable one`, { queue: q, head });
        chain.push(addr, len, false);
        if (chain.readableLength > MAX_CHAIN_BYTES) throw new VirtqueueError(`queue ${q}: readable length exceeds 4 GiB`, { queue: q, head });
      }
      if (!(flags & VIRTQ_DESC_F.NEXT)) return;
      idx = next;
    }
  }

  /**
   * Sets or clears VIRTQ_USED_F_NO_NOTIFY in used.flags (a device that is polling the avail ring tells the
   * driver it need not notify). Drivers that negotiated EVENT_IDX ignore the flag. After clearing it, a device
   * must look at the avail ring once more (`pending()`): the seq-cst store orders the two.
   */
  suppressNotifications(on: boolean): void {
    if (!this.ready || !this.usedFlags16) return;
    Atomics.store(this.usedFlags16, 0, on ? VIRTQ_USED_F_NO_NOTIFY : 0);
    this.mem!.markWritten(this.deviceN, 2);
  }

  /**
   * Re-arms notifications before a device goes to sleep on this queue: clears VIRTQ_USED_F_NO_NOTIFY and, with
   * EVENT_IDX, publishes avail_event = last_avail_idx (so the driver notifies for its next buffer even when the
   * device stopped popping at a limit rather than at an empty ring); then, ordered after those seq-cst stores,
   * returns whether chains are pending (look again when true: they were published before the driver could see
   * the re-arm).
   */
  rearm(): boolean {
    if (!this.ready) return false;
    if (this.usedFlags16 && Atomics.load(this.usedFlags16, 0) !== 0) {
      Atomics.store(this.usedFlags16, 0, 0);
      this.mem!.markWritten(this.deviceN, 2);
    }
    if (this.availEvent16) {
      Atomics.store(this.availEvent16, 0, this.lastAvail);
      this.mem!.markWritten(this.deviceN + 4 + 8 * this.size, 2);
    }
    return this.pending() > 0;
  }

  /**
   * Puts `head` with `len` written bytes on the used ring: the element first, then (seq-cst) the index, so
   * the driver never sees an index covering an unwritten element. Returns false (and writes nothing) for a
   * chain popped before a reset.
   */
  pushUsed(chain: DescriptorChain | ChainBuf | number, len: number): boolean {
    if (typeof chain !== 'number' && !chain.valid) return false;
    if (!this.ready) return false;
    const head = typeof chain === 'number' ? chain : chain.head;
    const off = 4 + 8 * (this.usedIdx % this.size);
    this.used!.setUint32(off, head, true);
    this.used!.setUint32(off + 4, len >>> 0, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    Atomics.store(this.usedIdx16!, 0, this.usedIdx);
    // The used ring is written through views cached at activation: record it for dirty tracking.
    this.mem!.markWritten(this.deviceN + off, 8);
    this.mem!.markWritten(this.deviceN + 2, 2);
    return true;
  }

  /**
   * Whether the driver wants an interrupt for the used entries added since the last call:
   * EVENT_IDX → vring_need_event(used_event, new, old); otherwise avail.flags & NO_INTERRUPT.
   */
  needsInterrupt(): boolean {
    if (!this.ready) return false;
    const newIdx = this.usedIdx;
    const old = this.signalledUsed;
    this.signalledUsed = newIdx;
    if (this.usedEvent16) {
      const ev = Atomics.load(this.usedEvent16, 0);
      return ((newIdx - ev - 1) & 0xffff) < ((newIdx - old) & 0xffff);
    }
    if (newIdx === old) return false;
    return (this.avail!.getUint16(0, true) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  saveState(): VirtqueueState {
    return {
      size: this.size,
      ready: this.ready,
      desc: this.desc,
      driver: this.driver,
      device: this.device,
      lastAvail: this.lastAvail,
      usedIdx: this.usedIdx,
      signalledUsed: this.signalledUsed,
    };
  }

  /** Restores programming and indexes; re-enables (re-validating) when the saved queue was ready. */
  restoreState(s: VirtqueueState, mem: GuestMemory, opts: { indirect: boolean; eventIdx: boolean }): void {
    this.reset();
    const u16 = (x: unknown) => (Number.isInteger(x) && (x as number) >= 0 && (x as number) <= 0xffff ? (x as number) : 0);
    this.size = Number.isInteger(s.size) ? s.size : this.maxSize;
    this.desc = BigInt(s.desc);
    this.driver = BigInt(s.driver);
    this.device = BigInt(s.device);
    this.lastAvail = u16(s.lastAvail);
    this.usedIdx = u16(s.usedIdx);
    this.signalledUsed = u16(s.signalledUsed);
    if (s.ready) this.enable(mem, opts);
  }
}
