import { KvmkitError } from './errors.js';
import { MADV_DONTNEED, madvise, viewOf } from './kvm/ffi.js';

/** One contiguous range of guest RAM backed by host memory. */
export interface MemoryRegion {
  /** Guest physical address of the first byte. */
  gpa: bigint;
  /** Size in bytes (a multiple of 4096). */
  size: number;
  /** Host view of the whole region. */
  bytes: Uint8Array;
  /** Host virtual address of `bytes[0]` (0n when the region is not mmap'd, e.g. in unit tests). */
  hva: bigint;
  /** KVM memory slot number (-1 when not registered). */
  slot: number;
  /** Free-form tag (e.g. 'ram', 'ram-high'). */
  name: string;
  /**
   * True when `hva` is private anonymous memory (the kernel's default mapping): `fill(…, 0)` then gives whole
   * pages back with madvise(MADV_DONTNEED) (they read as zero) instead of writing, and touches no page.
   */
  anonymousPrivate?: boolean;
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * What a worker thread needs to open the same guest RAM (`GuestMemory.fromShared`): structured-cloneable.
 * `tracking` holds one Int32 per region (1 = host write tracking on) followed by one "closed" flag; `dirty` the
 * per-region bitmaps of VMM-written pages (KVM's dirty-log layout), shared so that writes made in any thread
 * reach the migration dirty log.
 */
export interface SharedMemoryDescriptor {
  regions: Array<{ gpa: bigint; size: number; hva: bigint; slot: number; name: string; anonymousPrivate?: boolean; buffer?: SharedArrayBuffer; byteOffset?: number }>;
  tracking: SharedArrayBuffer;
  dirty: SharedArrayBuffer[];
}

/**
 * Guest physical memory. Every guest-supplied address goes through `range()`/`read*`/`write*`, which throw
 * KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS instead of touching host memory outside guest RAM. A range must lie
 * inside one region (regions are not assumed contiguous).
 */
export class GuestMemory {
  readonly regions: readonly MemoryRegion[];
  private closed = false;
  private views: DataView[];
  private readonly starts: number[];
  private readonly ends: number[];
  /** Region index found by the last `locate` (saves an object per access). */
  private at = 0;
  /**
   * Per region: a bitmap of pages the VMM wrote (KVM's dirty-log format, as Int32 words: page p is bit p&31 of
   * word p>>5 on this little-endian host) while host tracking is on. SharedArrayBuffers, so that a worker's
   * GuestMemory (`fromShared`) records into the same bitmaps; bits are set and taken with Atomics.
   */
  private readonly hostDirty: Int32Array[];
  /** Per region: 1 while host write tracking is on; then one more Int32: 1 once the memory was closed. */
  private readonly tracking: Int32Array;

  constructor(regions: MemoryRegion[], shared?: { tracking: SharedArrayBuffer; dirty: SharedArrayBuffer[] }) {
    const sorted = [...regions].sort((a, b) => (a.gpa < b.gpa ? -1 : a.gpa > b.gpa ? 1 : 0));
    for (let i = 0; i < sorted.length; i++) {
      const r = sorted[i]!;
      if (r.size <= 0 || r.bytes.byteLength !== r.size) {
        throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `region ${r.name} has size ${r.size} but a ${r.bytes.byteLength}-byte view`);
      }
      if (i > 0) {
        const p = sorted[i - 1]!;
        if (p.gpa + BigInt(p.size) > r.gpa) {
          throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `regions ${p.name} and ${r.name} overlap`);
        }
      }
    }
    this.regions = Object.freeze(sorted);
    this.views = sorted.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength));
    // Guest-physical addresses as Numbers (exact below 2^53) for the bounds checks on every access.
    this.starts = sorted.map((r) => Number(r.gpa));
    this.ends = sorted.map((r) => Number(r.gpa) + r.size);
    if (shared) {
      this.tracking = new Int32Array(shared.tracking);
      this.hostDirty = shared.dirty.map((b) => new Int32Array(b));
    } else {
      this.tracking = new Int32Array(new SharedArrayBuffer(4 * (sorted.length + 1)));
      // Words of 64 pages (KVM's u64 layout), held as Int32 pairs.
      this.hostDirty = sorted.map((r) => new Int32Array(new SharedArrayBuffer(Math.ceil(Math.ceil(r.size / 4096) / 64) * 8)));
    }
  }

  /**
   * A descriptor of this memory for `GuestMemory.fromShared` in a worker thread (device I/O threads). Regions
   * must be mmap'd (hva) or backed by a SharedArrayBuffer (`GuestMemory.anonymous(size, gpa, true)`), else
   * KVMKIT_ERR_UNSUPPORTED. The worker's copy must not be used after this memory is closed (the owner stops its
   * workers first; `close()` also sets a shared flag that makes the worker's accesses throw KVMKIT_ERR_MEMORY_CLOSED).
   */
  share(): SharedMemoryDescriptor {
    if (this.closed) throw new KvmkitError('KVMKIT_ERR_MEMORY_CLOSED', 'guest memory was released');
    const regions = this.regions.map((r) => {
      const d: SharedMemoryDescriptor['regions'][number] = { gpa: r.gpa, size: r.size, hva: r.hva, slot: r.slot, name: r.name, anonymousPrivate: r.anonymousPrivate === true };
      if (r.hva === 0n) {
        if (!(r.bytes.buffer instanceof SharedArrayBuffer)) {
          throw new KvmkitError('KVMKIT_ERR_UNSUPPORTED', `region ${r.name} is neither mmap'd nor a SharedArrayBuffer: it cannot be shared with a worker`);
        }
        d.buffer = r.bytes.buffer;
        d.byteOffset = r.bytes.byteOffset;
      }
      return d;
    });
    return { regions, tracking: this.tracking.buffer as SharedArrayBuffer, dirty: this.hostDirty.map((b) => b.buffer as SharedArrayBuffer) };
  }

  /**
   * Opens guest RAM described by `share()` (in a worker thread): the same bounds-checked API, host write
   * tracking into the shared bitmaps. Malformed descriptors throw KVMKIT_ERR_MEMORY_LAYOUT.
   */
  static fromShared(d: SharedMemoryDescriptor): GuestMemory {
    const bad = (why: string) => new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `shared memory descriptor: ${why}`);
    if (!d || !Array.isArray(d.regions) || !(d.tracking instanceof SharedArrayBuffer) || !Array.isArray(d.dirty)) throw bad('not a descriptor');
    if (d.dirty.length !== d.regions.length || d.tracking.byteLength !== 4 * (d.regions.length + 1)) throw bad('region count mismatch');
    const regions: MemoryRegion[] = d.regions.map((r, i) => {
      if (typeof r.gpa !== 'bigint' || !Number.isSafeInteger(r.size) || r.size <= 0 || typeof r.hva !== 'bigint') throw bad(`region ${i} is malformed`);
      if (!(d.dirty[i] instanceof SharedArrayBuffer) || d.dirty[i]!.byteLength < Math.ceil(Math.ceil(r.size / 4096) / 64) * 8) throw bad(`region ${i}: dirty bitmap too small`);
      let bytes: Uint8Array;
      if (r.hva !== 0n) bytes = new Uint8Array(viewOf(r.hva, r.size));
      else if (r.buffer instanceof SharedArrayBuffer && (r.byteOffset ?? 0) + r.size <= r.buffer.byteLength) bytes = new Uint8Array(r.buffer, r.byteOffset ?? 0, r.size);
      else throw bad(`region ${i} has neither an address nor a buffer`);
      return { gpa: r.gpa, size: r.size, bytes, hva: r.hva, slot: r.slot, name: r.name, anonymousPrivate: r.hva !== 0n && r.anonymousPrivate === true };
    });
    return new GuestMemory(regions, { tracking: d.tracking, dirty: d.dirty });
  }

  /** Whether host write tracking is on for any region. */
  private trackingAny(): boolean {
    const t = this.tracking;
    for (let i = 0; i < this.hostDirty.length; i++) if (t[i] !== 0) return true;
    return false;
  }

  /**
   * Host write tracking for the region with KVM slot `slot`: KVM's dirty log sees only guest writes, so pages the
   * VMM writes (device DMA through `range()`/`write*()`/`fill()`) are recorded here and merged by
   * `Vm.getDirtyLog`. Turned on and off with the slot's dirty logging.
   */
  setHostTracking(slot: number, on: boolean): void {
    const i = this.regions.findIndex((r) => r.slot === slot);
    if (i < 0) return;
    if (on) {
      Atomics.store(this.tracking, i, 1);
    } else {
      Atomics.store(this.tracking, i, 0);
      this.hostDirty[i]!.fill(0);
    }
  }

  /** Takes (returns and clears) the host-written page bitmap of slot `slot`; undefined when not tracking. */
  takeHostDirty(slot: number): Uint8Array | undefined {
    const i = this.regions.findIndex((r) => r.slot === slot);
    if (i < 0 || Atomics.load(this.tracking, i) === 0) return undefined;
    const bm = this.hostDirty[i]!;
    const out = new Int32Array(bm.length);
    // Word by word with exchange: a bit another thread sets meanwhile lands either here or in the next take.
    for (let w = 0; w < bm.length; w++) if (bm[w] !== 0) out[w] = Atomics.exchange(bm, w, 0);
    return new Uint8Array(out.buffer);
  }

  /**
   * Records that the VMM wrote [gpa, gpa+len) through a view it keeps (e.g. a virtqueue's cached used ring) or
   * outside JS (a syscall into guest RAM), for host write tracking. A no-op when tracking is off; never throws
   * for ranges outside RAM.
   */
  markWritten(gpa: bigint | number, len: number): void {
    if (!this.trackingAny()) return;
    try {
      const off = this.locate(gpa, len);
      this.markDirty(this.at, off, len);
    } catch {
      /* outside RAM: nothing to record */
    }
  }

  private markDirty(i: number, off: number, len: number): void {
    if (this.tracking[i] === 0 || len === 0) return;
    const bm = this.hostDirty[i]!;
    const last = Math.floor((off + len - 1) / 4096);
    for (let p = Math.floor(off / 4096); p <= last; p++) {
      const bit = 1 << (p & 31);
      if ((bm[p >> 5]! & bit) === 0) Atomics.or(bm, p >> 5, bit);
    }
  }

  /** Convenience for tests and tools: one region of `size` bytes at GPA 0 over a fresh ArrayBuffer. */
  static anonymous(size: number, gpa = 0n, shared = false): GuestMemory {
    const buf = shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size);
    return new GuestMemory([{ gpa, size, bytes: new Uint8Array(buf), hva: 0n, slot: -1, name: 'ram' }]);
  }

  /** Total bytes of guest RAM. */
  get size(): number {
    return this.regions.reduce((a, r) => a + r.size, 0);
  }

  /** End (exclusive) of the highest region. */
  get end(): bigint {
    const last = this.regions[this.regions.length - 1];
    return last ? last.gpa + BigInt(last.size) : 0n;
  }

  /** Marks the memory released: every later access throws KVMKIT_ERR_MEMORY_CLOSED. */
  close(): void {
    this.closed = true;
    this.views = [];
    Atomics.store(this.tracking, this.hostDirty.length, 1);
  }

  /** True once this memory, or the memory it was shared from, was closed. */
  get isClosed(): boolean {
    return this.closed || this.tracking[this.hostDirty.length] !== 0;
  }

  /**
   * The host virtual address of [gpa, gpa+len) (bounds-checked like `range()`), for passing guest buffers to a
   * syscall (e.g. preadv). Throws KVMKIT_ERR_UNSUPPORTED for memory that is not mmap'd. Writes made there are
   * not seen by host write tracking: call `markWritten` for them.
   */
  hostAddress(gpa: bigint | number, len: number): number {
    const off = this.locate(gpa, len);
    const r = this.regions[this.at]!;
    if (r.hva === 0n) throw new KvmkitError('KVMKIT_ERR_UNSUPPORTED', `region ${r.name} is not mmap'd: no host address`);
    return Number(r.hva) + off;
  }

  /** Offset of [gpa, gpa+len) in its region, whose index is left in `this.at`; throws when it is not inside one. */
  private locate(gpa: bigint | number, len: number): number {
    if (this.closed || this.tracking[this.hostDirty.length] !== 0) throw new KvmkitError('KVMKIT_ERR_MEMORY_CLOSED', 'guest memory was released');
    let g: number;
    if (typeof gpa === 'number') {
      if (!Number.isSafeInteger(gpa) || gpa < 0) throw oob(gpa, len);
      g = gpa;
    } else {
      if (gpa < 0n || gpa > MAX_SAFE) throw oob(gpa, len);
      g = Number(gpa);
    }
    if (!(len >= 0) || !Number.isSafeInteger(len)) throw oob(g, len);
    const starts = this.starts;
    const ends = this.ends;
    for (let i = 0; i < starts.length; i++) {
      // g + len may round above 2^53, but then it is far above any region end: still refused.
      if (g >= starts[i]! && g + len <= ends[i]!) {
        this.at = i;
        return g - starts[i]!;
      }
    }
    throw oob(g, len);
  }

  /** True when [gpa, gpa+len) lies inside one region. Never throws for bad numbers. */
  contains(gpa: bigint | number, len: number): boolean {
    if (this.closed) return false;
    try {
      this.locate(gpa, len);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * A writable view of [gpa, gpa+len) that aliases guest memory. Throws when out of bounds. With host write
   * tracking on, its pages count as written (use `view()` to only read).
   */
  range(gpa: bigint | number, len: number): Uint8Array {
    const off = this.locate(gpa, len);
    const i = this.at;
    this.markDirty(i, off, len);
    return this.regions[i]!.bytes.subarray(off, off + len);
  }

  /** Like `range()` for reading: the caller promises not to write through it (no dirty tracking). */
  view(gpa: bigint | number, len: number): Uint8Array {
    const off = this.locate(gpa, len);
    return this.regions[this.at]!.bytes.subarray(off, off + len);
  }

  read(gpa: bigint | number, len: number): Uint8Array {
    return this.view(gpa, len).slice();
  }

  write(gpa: bigint | number, data: Uint8Array): void {
    this.range(gpa, data.byteLength).set(data);
  }

  fill(gpa: bigint | number, len: number, value = 0): void {
    const bytes = this.range(gpa, len);
    const r = this.regions[this.at]!;
    if (value !== 0 || !r.anonymousPrivate || len < 0x10000) {
      bytes.fill(value);
      return;
    }
    // Zeroing most of a private anonymous range: drop its whole pages (they read back as zeros, and a fresh
    // mapping's untouched pages are not faulted in just to be zeroed), write only the partial pages at the edges.
    const off = bytes.byteOffset - r.bytes.byteOffset;
    const a = Math.ceil(off / 4096) * 4096;
    const b = Math.floor((off + len) / 4096) * 4096;
    if (b <= a || madvise(r.hva + BigInt(a), b - a, MADV_DONTNEED) !== 0) {
      bytes.fill(0);
      return;
    }
    bytes.subarray(0, a - off).fill(0);
    bytes.subarray(b - off).fill(0);
  }

  readU8(gpa: bigint | number): number {
    const off = this.locate(gpa, 1);
    return this.views[this.at]!.getUint8(off);
  }
  readU16(gpa: bigint | number): number {
    const off = this.locate(gpa, 2);
    return this.views[this.at]!.getUint16(off, true);
  }
  readU32(gpa: bigint | number): number {
    const off = this.locate(gpa, 4);
    return this.views[this.at]!.getUint32(off, true);
  }
  readU64(gpa: bigint | number): bigint {
    const off = this.locate(gpa, 8);
    return this.views[this.at]!.getBigUint64(off, true);
  }
  writeU8(gpa: bigint | number, x: number): void {
    const off = this.locate(gpa, 1);
    const i = this.at;
    this.markDirty(i, off, 1);
    this.views[i]!.setUint8(off, x);
  }
  writeU16(gpa: bigint | number, x: number): void {
    const off = this.locate(gpa, 2);
    const i = this.at;
    this.markDirty(i, off, 2);
    this.views[i]!.setUint16(off, x, true);
  }
  writeU32(gpa: bigint | number, x: number): void {
    const off = this.locate(gpa, 4);
    const i = this.at;
    this.markDirty(i, off, 4);
    this.views[i]!.setUint32(off, x >>> 0, true);
  }
  writeU64(gpa: bigint | number, x: bigint): void {
    const off = this.locate(gpa, 8);
    const i = this.at;
    this.markDirty(i, off, 8);
    this.views[i]!.setBigUint64(off, BigInt.asUintN(64, x), true);
  }
}

function oob(gpa: bigint | number, len: number): KvmkitError {
  const safe = typeof gpa === 'bigint' ? gpa <= MAX_SAFE && gpa >= 0n : Number.isSafeInteger(gpa) && gpa >= 0;
  const g = safe ? `0x${gpa.toString(16)}` : String(gpa);
  return new KvmkitError('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS', `guest range ${g}+${len} is outside guest RAM`, {
    details: { gpa: g, len },
  });
}
