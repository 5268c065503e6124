import { KvmkitError } from '@kvmkit/kernel';

/** MC146818 register indexes. */
export const RTC = {
  SECONDS: 0x00, SECONDS_ALARM: 0x01, MINUTES: 0x02, MINUTES_ALARM: 0x03, HOURS: 0x04, HOURS_ALARM: 0x05,
  DAY_OF_WEEK: 0x06, DAY_OF_MONTH: 0x07, MONTH: 0x08, YEAR: 0x09, REG_A: 0x0a, REG_B: 0x0b, REG_C: 0x0c, REG_D: 0x0d,
  CENTURY: 0x32,
} as const;
export const REG_A_UIP = 0x80;
export const REG_B = { SET: 0x80, PIE: 0x40, AIE: 0x20, UIE: 0x10, SQWE: 0x08, DM_BINARY: 0x04, H24: 0x02, DSE: 0x01 } as const;
export const REG_C = { IRQF: 0x80, PF: 0x40, AF: 0x20, UF: 0x10 } as const;
export const REG_D_VRT = 0x80;

export interface CmosOptions {
  /** Host clock in ms since the epoch (tests inject a fixed one). */
  now?: () => number;
  /** Guest RAM in MiB, written to the BIOS memory-size bytes (0x15-0x18, 0x30-0x31, 0x34-0x35, 0x5b-0x5d). */
  memoryMiB?: number;
  /** vCPU count (byte 0x5f = count - 1, as QEMU/SeaBIOS use it). */
  cpus?: number;
}

/** Saved CMOS state (inside section 'platform-pc' v1). */
export interface CmosState {
  index: number;
  nmiDisabled: boolean;
  ram: Uint8Array;
  offsetMs: number;
  frozenMs: number | null;
  lastUpdateSec: number;
}

interface Fields {
  sec: number; min: number; hour: number; mday: number; mon: number; year: number;
}

const toBcd = (v: number) => ((Math.floor(v / 10) % 10) << 4) | v % 10;
const fromBcd = (v: number) => ((v >> 4) & 0x0f) * 10 + (v & 0x0f);
/** Guest time is clamped to years 1900-2199 so a guest writing nonsense cannot produce an invalid Date. */
const MIN_MS = Date.UTC(1900, 0, 1);
const MAX_MS = Date.UTC(2199, 11, 31, 23, 59, 59);

/**
 * CMOS RAM + MC146818 real-time clock at ports 0x70 (index, bit 7 = NMI disable) / 0x71 (data).
 * Time comes from the host clock (UTC) plus an offset the guest can change by writing the time registers
 * (directly, or while register B's SET bit freezes the clock). BCD or binary (register B DM), 24 h or 12 h (H24),
 * century in byte 0x32. Register A's UIP bit always reads 0 (an update is instantaneous), register C reports UF
 * when the second changed since the last read (no IRQ 8 is raised: periodic, alarm and update interrupts are not
 * emulated), register D reads VRT (valid RAM and time). Bytes 0x0e-0x7f are battery-backed RAM.
 */
export class Cmos {
  private index = 0;
  nmiDisabled = false;
  private readonly ram = new Uint8Array(128);
  private offsetMs = 0;
  private frozenMs: number | null = null;
  private lastUpdateSec: number;
  private readonly now: () => number;

  constructor(opts: CmosOptions = {}) {
    this.now = opts.now ?? Date.now;
    this.ram[RTC.REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
    this.ram[RTC.REG_B] = REG_B.H24;
    this.ram[RTC.REG_D] = REG_D_VRT;
    this.lastUpdateSec = Math.floor(this.guestMs() / 1000);
    if (opts.memoryMiB !== undefined) this.setMemorySize(opts.memoryMiB);
    if (opts.cpus !== undefined) this.ram[0x5f] = Math.max(0, Math.min(255, opts.cpus - 1));
  }

  private setMemorySize(mib: number): void {
    const kib = mib * 1024;
    this.ram[0x15] = 0x80; // 640 KiB base memory
    this.ram[0x16] = 0x02;
    const ext = Math.min(Math.max(kib - 1024, 0), 0xffff); // KiB above 1 MiB (capped)
    this.ram[0x17] = this.ram[0x30] = ext & 0xff;
    this.ram[0x18] = this.ram[0x31] = ext >> 8;
    const below4g = Math.min(mib, 3 * 1024); // the default layout puts RAM above 3 GiB beyond 4 GiB
    const above16 = Math.min(Math.max((below4g - 16) * 16, 0), 0xffff); // 64 KiB units above 16 MiB
    this.ram[0x34] = above16 & 0xff;
    this.ram[0x35] = above16 >> 8;
    const high = Math.max(mib - 3 * 1024, 0) * 16; // 64 KiB units above 4 GiB
    this.ram[0x5b] = high & 0xff;
    this.ram[0x5c] = (high >> 8) & 0xff;
    this.ram[0x5d] = (high >> 16) & 0xff;
  }

  private guestMs(): number {
    const t = this.frozenMs ?? this.now() + this.offsetMs;
    return Math.min(Math.max(t, MIN_MS), MAX_MS);
  }

  private fields(ms: number): Fields {
    const d = new Date(ms);
    return { sec: d.getUTCSeconds(), min: d.getUTCMinutes(), hour: d.getUTCHours(), mday: d.getUTCDate(), mon: d.getUTCMonth() + 1, year: d.getUTCFullYear() };
  }

  private get binary(): boolean {
    return (this.ram[RTC.REG_B]! & REG_B.DM_BINARY) !== 0;
  }

  private enc(v: number): number {
    return this.binary ? v & 0xff : toBcd(v);
  }

  private dec(v: number): number {
    return this.binary ? v : fromBcd(v);
  }

  private encHour(h: number): number {
    if (this.ram[RTC.REG_B]! & REG_B.H24) return this.enc(h);
    const pm = h >= 12;
    const h12 = h % 12 === 0 ? 12 : h % 12;
    return this.enc(h12) | (pm ? 0x80 : 0);
  }

  private decHour(v: number): number {
    if (this.ram[RTC.REG_B]! & REG_B.H24) return this.dec(v);
    const pm = (v & 0x80) !== 0;
    const h = this.dec(v & 0x7f) % 12;
    return pm ? h + 12 : h;
  }

  /** Bus read: offset 0 = index port (write-only: reads 0xff), 1 = data port. */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length === 0) return;
    data[0] = offset === 0 ? 0xff : this.readReg(this.index);
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    const v = data[0]!;
    if (offset === 0) {
      this.index = v & 0x7f;
      this.nmiDisabled = (v & 0x80) !== 0;
    } else {
      this.writeReg(this.index, v);
    }
  }

  readReg(i: number): number {
    i &= 0x7f;
    if (i <= RTC.YEAR || i === RTC.CENTURY) {
      if (i === RTC.SECONDS_ALARM || i === RTC.MINUTES_ALARM || i === RTC.HOURS_ALARM) return this.ram[i]!;
      const ms = this.guestMs();
      const f = this.fields(ms);
      switch (i) {
        case RTC.SECONDS: return this.enc(f.sec);
        case RTC.MINUTES: return this.enc(f.min);
        case RTC.HOURS: return this.encHour(f.hour);
        case RTC.DAY_OF_WEEK: return this.enc(new Date(ms).getUTCDay() + 1);
        case RTC.DAY_OF_MONTH: return this.enc(f.mday);
        case RTC.MONTH: return this.enc(f.mon);
        case RTC.YEAR: return this.enc(f.year % 100);
        default: return this.enc(Math.floor(f.year / 100));
      }
    }
    if (i === RTC.REG_A) return this.ram[i]! & ~REG_A_UIP;
    if (i === RTC.REG_C) {
      const sec = Math.floor(this.guestMs() / 1000);
      let v = 0;
      if (sec !== this.lastUpdateSec && this.frozenMs === null) v |= REG_C.UF;
      this.lastUpdateSec = sec;
      if (v & REG_C.UF && this.ram[RTC.REG_B]! & REG_B.UIE) v |= REG_C.IRQF;
      return v;
    }
    if (i === RTC.REG_D) return REG_D_VRT;
    return this.ram[i]!;
  }

  writeReg(i: number, v: number): void {
    i &= 0x7f;
    v &= 0xff;
    switch (i) {
      case RTC.SECONDS_ALARM:
      case RTC.MINUTES_ALARM:
      case RTC.HOURS_ALARM:
        this.ram[i] = v;
        return;
      case RTC.DAY_OF_WEEK:
        return; // derived from the date
      case RTC.SECONDS:
      case RTC.MINUTES:
      case RTC.HOURS:
      case RTC.DAY_OF_MONTH:
      case RTC.MONTH:
      case RTC.YEAR:
      case RTC.CENTURY:
        this.setField(i, v);
        return;
      case RTC.REG_A:
        this.ram[i] = v & ~REG_A_UIP;
        return;
      case RTC.REG_B: {
        const was = this.ram[i]! & REG_B.SET;
        this.ram[i] = v;
        if (v & REG_B.SET && !was) this.frozenMs = this.guestMs();
        if (!(v & REG_B.SET) && was && this.frozenMs !== null) {
          this.offsetMs = this.frozenMs - this.now();
          this.frozenMs = null;
        }
        return;
      }
      case RTC.REG_C:
      case RTC.REG_D:
        return; // read-only
      default:
        this.ram[i] = v;
    }
  }

  private setField(i: number, raw: number): void {
    const ms = this.guestMs();
    const f = this.fields(ms);
    const subMs = ms % 1000;
    const v = i === RTC.HOURS ? this.decHour(raw) : this.dec(raw);
    switch (i) {
      case RTC.SECONDS: f.sec = v; break;
      case RTC.MINUTES: f.min = v; break;
      case RTC.HOURS: f.hour = v; break;
      case RTC.DAY_OF_MONTH: f.mday = v; break;
      case RTC.MONTH: f.mon = v; break;
      case RTC.YEAR: f.year = Math.floor(f.year / 100) * 100 + (v % 100); break;
      default: f.year = v * 100 + (f.year % 100);
    }
    let t = Date.UTC(f.year, f.mon - 1, f.mday, f.hour, f.min, f.sec) + subMs;
    if (!Number.isFinite(t)) return;
    t = Math.min(Math.max(t, MIN_MS), MAX_MS);
    if (this.frozenMs !== null) this.frozenMs = t;
    else this.offsetMs = t - this.now();
  }

  /** Guest time as a Date (for logs and tests). */
  guestTime(): Date {
    return new Date(this.guestMs());
  }

  save(): CmosState {
    return { index: this.index, nmiDisabled: this.nmiDisabled, ram: this.ram.slice(), offsetMs: this.offsetMs, frozenMs: this.frozenMs, lastUpdateSec: this.lastUpdateSec };
  }

  restore(s: CmosState): void {
    const bad = (what: string) => new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `platform-pc CMOS state: ${what}`);
    if (typeof s !== 'object' || s === null) throw bad('not an object');
    if (!(s.ram instanceof Uint8Array) || s.ram.length !== 128) throw bad('ram must be 128 bytes');
    if (!Number.isInteger(s.index) || s.index < 0 || s.index > 0x7f) throw bad('index out of range');
    if (typeof s.offsetMs !== 'number' || !Number.isFinite(s.offsetMs)) throw bad('offsetMs must be a finite number');
    if (s.frozenMs !== null && (typeof s.frozenMs !== 'number' || !Number.isFinite(s.frozenMs))) throw bad('frozenMs must be null or a number');
    if (typeof s.nmiDisabled !== 'boolean') throw bad('nmiDisabled must be a boolean');
    this.index = s.index;
    this.nmiDisabled = s.nmiDisabled;
    this.ram.set(s.ram);
    this.offsetMs = s.offsetMs;
    this.frozenMs = s.frozenMs;
    this.lastUpdateSec = Number.isFinite(s.lastUpdateSec) ? s.lastUpdateSec : Math.floor(this.guestMs() / 1000);
  }
}
