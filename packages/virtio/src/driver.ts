import type { GuestMemory } from '@kvmkit/kernel';
import { MMIO, VIRTIO_F, VIRTIO_STATUS, VIRTQ_DESC_F, bit } from './constants.js';

/** Where a register access goes: a BusDevice (the transport) or a real MMIO bus. */
export interface RegisterPort {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

export interface DriverQueue {
  size: number;
  desc: bigint;
  avail: bigint;
  used: bigint;
  nextDesc: number;
  availIdx: number;
  lastUsed: number;
}

export interface DriverBuffer {
  /** Guest address; allocated from the driver's arena when omitted. */
  addr?: bigint;
  len: number;
  /** Device-writable. */
  write?: boolean;
  /** Initial contents (device-readable buffers). */
  data?: Uint8Array;
}

/**
 * A minimal virtio-mmio *driver* running on the host side, for tests: negotiates features, lays out split
 * rings in guest memory (from an arena), adds chains (direct or indirect) and reads the used ring.
 * Not a device-side API; devices never use it.
 */
export class VirtioTestDriver {
  readonly queues: DriverQueue[] = [];
  features = 0n;
  private next: bigint;

  constructor(
    readonly port: RegisterPort,
    readonly mem: GuestMemory,
    arena: bigint = 0x10000n,
    private readonly arenaEnd: bigint = mem.end,
  ) {
    this.next = arena;
  }

  r32(off: number): number {
    const b = new Uint8Array(4);
    this.port.read(off, b);
    return new DataView(b.buffer).getUint32(0, true);
  }

  w32(off: number, v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0, true);
    this.port.write(off, b);
  }

  readConfig(off: number, len: number): Uint8Array {
    const b = new Uint8Array(len);
    this.port.read(MMIO.CONFIG + off, b);
    return b;
  }

  alloc(len: number, align = 16): bigint {
    const a = BigInt(align);
    const p = ((this.next + a - 1n) / a) * a;
    if (p + BigInt(len) > this.arenaEnd) throw new Error('test driver arena exhausted');
    this.next = p + BigInt(len);
    this.mem.fill(p, len, 0);
    return p;
  }

  deviceFeatures(): bigint {
    this.w32(MMIO.DEVICE_FEATURES_SEL, 0);
    const lo = BigInt(this.r32(MMIO.DEVICE_FEATURES));
    this.w32(MMIO.DEVICE_FEATURES_SEL, 1);
    const hi = BigInt(this.r32(MMIO.DEVICE_FEATURES));
    return (hi << 32n) | lo;
  }

  /**
   * Reset, ACKNOWLEDGE, DRIVER, features (`want` & offered, VERSION_1 always), FEATURES_OK, queues, DRIVER_OK.
   * Returns the final status.
   */
  init(opts: { want?: bigint; queueSizes?: number[]; driverOk?: boolean } = {}): number {
    const S = VIRTIO_STATUS;
    this.w32(MMIO.STATUS, 0);
    this.w32(MMIO.STATUS, S.ACKNOWLEDGE);
    this.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
    const offered = this.deviceFeatures();
    this.features = (opts.want ?? offered) & offered;
    this.features |= bit(VIRTIO_F.VERSION_1) & offered;
    this.w32(MMIO.DRIVER_FEATURES_SEL, 0);
    this.w32(MMIO.DRIVER_FEATURES, Number(this.features & 0xffff_ffffn));
    this.w32(MMIO.DRIVER_FEATURES_SEL, 1);
    this.w32(MMIO.DRIVER_FEATURES, Number(this.features >> 32n));
    this.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    if (!(this.r32(MMIO.STATUS) & S.FEATURES_OK)) return this.r32(MMIO.STATUS);
    this.queues.length = 0;
    for (let q = 0; ; q++) {
      this.w32(MMIO.QUEUE_SEL, q);
      const max = this.r32(MMIO.QUEUE_NUM_MAX);
      if (max === 0) break;
      const size = Math.min(max, opts.queueSizes?.[q] ?? max);
      const dq: DriverQueue = {
        size,
        desc: this.alloc(16 * size, 16),
        avail: this.alloc(6 + 2 * size, 2),
        used: this.alloc(6 + 8 * size, 4),
        nextDesc: 0,
        availIdx: 0,
        lastUsed: 0,
      };
      this.w32(MMIO.QUEUE_NUM, size);
      this.w32(MMIO.QUEUE_DESC_LOW, Number(dq.desc & 0xffff_ffffn));
      this.w32(MMIO.QUEUE_DESC_HIGH, Number(dq.desc >> 32n));
      this.w32(MMIO.QUEUE_DRIVER_LOW, Number(dq.avail & 0xffff_ffffn));
      this.w32(MMIO.QUEUE_DRIVER_HIGH, Number(dq.avail >> 32n));
      this.w32(MMIO.QUEUE_DEVICE_LOW, Number(dq.used & 0xffff_ffffn));
      this.w32(MMIO.QUEUE_DEVICE_HIGH, Number(dq.used >> 32n));
      this.w32(MMIO.QUEUE_READY, 1);
      this.queues.push(dq);
    }
    if (opts.driverOk !== false) this.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    return this.r32(MMIO.STATUS);
  }

  private writeDesc(table: bigint, i: number, addr: bigint, len: number, flags: number, next: number): void {
    const d = table + BigInt(16 * i);
    this.mem.writeU64(d, addr);
    this.mem.writeU32(d + 8n, len);
    this.mem.writeU16(d + 12n, flags);
    this.mem.writeU16(d + 14n, next);
  }

  /** Adds a chain and publishes it on the avail ring (does not notify). Returns the head and buffer addresses. */
  add(q: number, bufs: DriverBuffer[], opts: { indirect?: boolean } = {}): { head: number; addrs: bigint[] } {
    const dq = this.queues[q]!;
    const addrs = bufs.map((b) => {
      const a = b.addr ?? this.alloc(Math.max(1, b.len), 8);
      if (b.data) this.mem.write(a, b.data);
      return a;
    });
    let head: number;
    if (opts.indirect) {
      const table = this.alloc(16 * bufs.length, 16);
      bufs.forEach((b, i) => this.writeDesc(table, i, addrs[i]!, b.len, (b.write ? VIRTQ_DESC_F.WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F.NEXT : 0), i + 1));
      head = dq.nextDesc;
      dq.nextDesc = (dq.nextDesc + 1) % dq.size;
      this.writeDesc(dq.desc, head, table, 16 * bufs.length, VIRTQ_DESC_F.INDIRECT, 0);
    } else {
      const idx = bufs.map((_, i) => (dq.nextDesc + i) % dq.size);
      dq.nextDesc = (dq.nextDesc + bufs.length) % dq.size;
      head = idx[0]!;
      bufs.forEach((b, i) => this.writeDesc(dq.desc, idx[i]!, addrs[i]!, b.len, (b.write ? VIRTQ_DESC_F.WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F.NEXT : 0), idx[i + 1] ?? 0));
    }
    this.mem.writeU16(dq.avail + 4n + BigInt(2 * (dq.availIdx % dq.size)), head);
    dq.availIdx = (dq.availIdx + 1) & 0xffff;
    this.mem.writeU16(dq.avail + 2n, dq.availIdx);
    return { head, addrs };
  }

  kick(q: number): void {
    this.w32(MMIO.QUEUE_NOTIFY, q);
  }

  /** Used elements added since the last call. */
  takeUsed(q: number): Array<{ id: number; len: number }> {
    const dq = this.queues[q]!;
    const idx = this.mem.readU16(dq.used + 2n);
    const out: Array<{ id: number; len: number }> = [];
    while (dq.lastUsed !== idx) {
      const e = dq.used + 4n + BigInt(8 * (dq.lastUsed % dq.size));
      out.push({ id: this.mem.readU32(e), len: this.mem.readU32(e + 4n) });
      dq.lastUsed = (dq.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Sets used_event (EVENT_IDX): interrupt wanted once used idx passes `v`. */
  setUsedEvent(q: number, v: number): void {
    const dq = this.queues[q]!;
    this.mem.writeU16(dq.avail + 4n + BigInt(2 * dq.size), v);
  }

  availEvent(q: number): number {
    const dq = this.queues[q]!;
    return this.mem.readU16(dq.used + 4n + BigInt(8 * dq.size));
  }

  setAvailFlags(q: number, flags: number): void {
    this.mem.writeU16(this.queues[q]!.avail, flags);
  }

  interruptStatus(): number {
    return this.r32(MMIO.INTERRUPT_STATUS);
  }

  ack(bits: number): void {
    this.w32(MMIO.INTERRUPT_ACK, bits);
  }
}
