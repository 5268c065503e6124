/** Little-endian value of a 1-4 byte port access. */
export function leValue(data: Uint8Array): number {
  let v = 0;
  for (let i = Math.min(data.length, 4) - 1; i >= 0; i--) v = v * 256 + data[i]!;
  return v;
}

/** Debug-exit port (0xf4): a write of 1-4 bytes stops the VM with exitCode = value & 0xff. Reads return 0. */
export class DebugExit {
  constructor(private readonly exit: (code: number, value: number) => void) {}
  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  write(_offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    const value = leValue(data);
    this.exit(value & 0xff, value);
  }
}

export interface BootTime {
  /** Milliseconds since the VMM process started (performance.now()). */
  ms: number;
  /** The value the guest wrote. */
  value: number;
}

/** Boot-timer port (0xf5): each write records the time since process start. */
export class BootTimer {
  readonly times: BootTime[] = [];
  constructor(
    private readonly onMark: (t: BootTime) => void,
    private readonly clock: () => number = () => performance.now(),
    private readonly limit = 1024,
  ) {}
  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  write(_offset: number, data: Uint8Array): void {
    const t: BootTime = { ms: Math.round(this.clock() * 1000) / 1000, value: leValue(data) };
    if (this.times.length < this.limit) this.times.push(t);
    this.onMark(t);
  }
}

/** POST code port (0x80): writes are dropped (Linux uses it for I/O delays), reads return the last code. */
export class PostCode {
  last = 0;
  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length > 0) data[0] = this.last;
  }
  write(_offset: number, data: Uint8Array): void {
    if (data.length > 0) this.last = data[0]!;
  }
}

/**
 * System control port B (0x61) for machines WITHOUT the in-kernel PIT (with KVM_CREATE_PIT2 and
 * KVM_PIT_SPEAKER_DUMMY, KVM answers 0x61 itself from the PIT's channel 2). Bits 0-3 are stored; bit 4
 * (refresh) toggles on every read; bit 5 (PIT channel 2 output) reads 1 so that a guest polling for the
 * channel 2 terminal count (Linux's pit_calibrate_tsc loop) ends at once instead of spinning forever.
 */
export class PortB {
  private value = 0;
  private refresh = 0;
  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length === 0) return;
    this.refresh ^= 0x10;
    data[0] = (this.value & 0x0f) | this.refresh | 0x20;
  }
  write(_offset: number, data: Uint8Array): void {
    if (data.length > 0) this.value = data[0]! & 0x0f;
  }
}
