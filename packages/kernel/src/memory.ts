import { KvmkitError } from './errors.js';

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
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

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
  /** Per region: a bitmap of pages the VMM wrote (KVM's dirty-log format) while host tracking is on. */
  private hostDirty: Array<Uint8Array | undefined>;

  constructor(regions: MemoryRegion[]) {
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
    this.hostDirty = sorted.map(() => undefined);
  }

  /**
   * Host write tracking for the region with KVM slot `slot`: KVM's dirty log sees only guest writes, so pages the
   * VMM writes (device DMA through `range()`/`write*()`/`fill()`) are recorded here and merged by
   * `Vm.getDirtyLog`. Turned on and off with the slot's dirty logging.
   */
  setHostTracking(slot: number, on: boolean): void {
    const i = this.regions.findIndex((r) => r.slot === slot);
    if (i < 0) return;
    const pages = Math.ceil(this.regions[i]!.size / 4096);
    this.hostDirty[i] = on ? (this.hostDirty[i] ?? new Uint8Array(Math.ceil(pages / 64) * 8)) : undefined;
  }

  /** Takes (returns and clears) the host-written page bitmap of slot `slot`; undefined when not tracking. */
  takeHostDirty(slot: number): Uint8Array | undefined {
    const i = this.regions.findIndex((r) => r.slot === slot);
    const bm = i < 0 ? undefined : this.hostDirty[i];
    if (!bm) return undefined;
    const out = bm.slice();
    bm.fill(0);
    return out;
  }

  /**
   * Records that the VMM wrote [gpa, gpa+len) through a view it keeps (e.g. a virtqueue's cached used ring),
   * for host write tracking. A no-op when tracking is off; never throws for ranges outside RAM.
   */
  markWritten(gpa: bigint | number, len: number): void {
    if (!this.hostDirty.some((b) => b !== undefined)) return;
    try {
      const off = this.locate(gpa, len);
      this.markDirty(this.at, off, len);
    } catch {
      /* outside RAM: nothing to record */
    }
  }

  private markDirty(i: number, off: number, len: number): void {
    const bm = this.hostDirty[i];
    if (!bm || len === 0) return;
    const last = Math.floor((off + len - 1) / 4096);
    for (let p = Math.floor(off / 4096); p <= last; p++) bm[p >> 3]! |= 1 << (p & 7);
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
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Offset of [gpa, gpa+len) in its region, whose index is left in `this.at`; throws when it is not inside one. */
  private locate(gpa: bigint | number, len: number): number {
    if (this.closed) throw new KvmkitError('KVMKIT_ERR_MEMORY_CLOSED', 'guest memory was released');
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
    this.range(gpa, len).fill(value);
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
