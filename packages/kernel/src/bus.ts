import { KvmkitError } from './errors.js';

/**
 * A device on the PIO or MMIO bus. `offset` is relative to the start of the device's range; `data` is the
 * access (1, 2, 4 or 8 bytes, little endian). `read` fills `data`.
 */
export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

export interface BusEntry {
  base: number;
  size: number;
  name: string;
  device: BusDevice;
  /** Optional: handled on the vCPU thread (see WorkerHandlerSpec). */
  worker?: WorkerHandlerSpec;
}

/**
 * A device that can answer accesses on the vCPU thread itself (no hop to the main thread) names an ES module
 * that the vCPU worker imports. The module's export `exportName` is called once per worker as
 * `factory(shared, ctx)` and returns a `{ read?, write? }` handler. `shared` is passed through
 * structured clone, so state that main thread and workers must see must live in SharedArrayBuffers.
 * A handler returning `false` from read/write passes the access on to the main-thread device.
 */
export interface WorkerHandlerSpec {
  module: string;
  exportName?: string;
  shared?: unknown;
}

export interface WorkerHandlerContext {
  vcpu: number;
  kind: 'pio' | 'mmio';
  base: number;
}

export interface WorkerHandler {
  read?(offset: number, data: Uint8Array): boolean | void;
  write?(offset: number, data: Uint8Array): boolean | void;
}

export type WorkerHandlerFactory = (shared: unknown, ctx: WorkerHandlerContext) => WorkerHandler;

/**
 * A sorted, non-overlapping range map. Lookup is a binary search; registration rejects zero length,
 * overflow past `limit` and overlap with a coded error.
 */
export class Bus {
  private entries: BusEntry[] = [];
  constructor(readonly kind: 'pio' | 'mmio', readonly limit: number) {}

  register(base: number, size: number, device: BusDevice, name = 'device', worker?: WorkerHandlerSpec): BusEntry {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(size) || base < 0 || size <= 0) {
      throw new KvmkitError('KVMKIT_ERR_BUS_RANGE', `${this.kind} range for ${name} is invalid: base=${base} size=${size}`, {
        details: { base, size, name },
      });
    }
    if (base + size > this.limit) {
      throw new KvmkitError('KVMKIT_ERR_BUS_RANGE', `${this.kind} range for ${name} overflows the bus: 0x${base.toString(16)}+0x${size.toString(16)}`, {
        details: { base, size, name },
      });
    }
    for (const e of this.entries) {
      if (base < e.base + e.size && e.base < base + size) {
        throw new KvmkitError(
          'KVMKIT_ERR_BUS_OVERLAP',
          `${this.kind} range ${name} 0x${base.toString(16)}+0x${size.toString(16)} overlaps ${e.name} 0x${e.base.toString(16)}+0x${e.size.toString(16)}`,
          { details: { base, size, name, other: e.name } },
        );
      }
    }
    const entry: BusEntry = { base, size, name, device, ...(worker ? { worker } : {}) };
    this.entries.push(entry);
    this.entries.sort((a, b) => a.base - b.base);
    return entry;
  }

  unregister(base: number): boolean {
    const i = this.entries.findIndex((e) => e.base === base);
    if (i < 0) return false;
    this.entries.splice(i, 1);
    return true;
  }

  find(addr: number): BusEntry | undefined {
    const es = this.entries;
    let lo = 0;
    let hi = es.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const e = es[mid]!;
      if (addr < e.base) hi = mid - 1;
      else if (addr >= e.base + e.size) lo = mid + 1;
      else return e;
    }
    return undefined;
  }

  /** Dispatches a read; returns false when no device claims `addr` (data is then filled with 0xff). */
  read(addr: number, data: Uint8Array): boolean {
    const e = this.find(addr);
    if (!e) {
      data.fill(0xff);
      return false;
    }
    e.device.read(addr - e.base, data);
    return true;
  }

  write(addr: number, data: Uint8Array): boolean {
    const e = this.find(addr);
    if (!e) return false;
    e.device.write(addr - e.base, data);
    return true;
  }

  list(): readonly BusEntry[] {
    return this.entries;
  }
}

export class PioBus extends Bus {
  constructor() {
    super('pio', 0x10000);
  }
}

export class MmioBus extends Bus {
  constructor() {
    super('mmio', Number.MAX_SAFE_INTEGER);
  }
}
