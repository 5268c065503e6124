/** Progress of a long write/read: bytes done, rate, ETA. */
export interface ProgressInfo {
  phase: string;
  bytes: number;
  total: number;
  /** bytes per second since the phase started */
  rate: number;
  /** estimated milliseconds left (NaN when unknown) */
  etaMs: number;
}

export type ProgressCallback = (p: ProgressInfo) => void;

const MiB = 1024 * 1024;

/**
 * Reports progress to a callback and, when `tty` (default: process.stderr.isTTY), as one rewritten line on
 * stderr, at most every 100 ms.
 */
export class Progress {
  private readonly t0 = performance.now();
  private last = 0;
  bytes = 0;
  private shown = false;
  constructor(
    readonly phase: string,
    readonly total: number,
    private readonly cb?: ProgressCallback,
    private readonly tty: boolean = process.stderr.isTTY === true,
  ) {}

  info(): ProgressInfo {
    const dt = (performance.now() - this.t0) / 1000;
    const rate = dt > 0 ? this.bytes / dt : 0;
    return { phase: this.phase, bytes: this.bytes, total: this.total, rate, etaMs: rate > 0 ? ((this.total - this.bytes) / rate) * 1000 : NaN };
  }

  add(n: number): void {
    this.bytes += n;
    const now = performance.now();
    if (now - this.last < 100 && this.bytes < this.total) return;
    this.last = now;
    const i = this.info();
    this.cb?.(i);
    if (this.tty) {
      this.shown = true;
      const eta = Number.isFinite(i.etaMs) ? `${(i.etaMs / 1000).toFixed(1)} s` : '?';
      process.stderr.write(`\r${this.phase}: ${(i.bytes / MiB).toFixed(0)}/${(i.total / MiB).toFixed(0)} MiB  ${(i.rate / MiB).toFixed(0)} MiB/s  ETA ${eta}   `);
    }
  }

  done(): void {
    if (this.shown) process.stderr.write('\n');
  }
}
