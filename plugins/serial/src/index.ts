import * as fs from 'node:fs';
import { KvmkitError, checkOptions, type Plugin, type MachineApi, type Logger } from '@kvmkit/kernel';
import { Uart16550, type UartState } from './uart.js';
import { MIRROR_INTS } from './fastpath.js';

export { Uart16550, FIFO_SIZE, UART_REG, IER, IIR, FCR, LCR, MCR, LSR, MSR, DEFAULT_BACKLOG_LIMIT } from './uart.js';
export type { UartOptions, UartState } from './uart.js';
export { default as serialFastPath, MIRROR_LSR, MIRROR_INTS } from './fastpath.js';

export const SERIAL_STATE_VERSION = 1;
const VERSION = '0.1.0';
/** Legacy PC COM ports and the ttyS index Linux gives them. */
/** URL of the vCPU-thread handler module (the built file, also when running from src/ under vitest). */
function fastPathModule(): string {
  const here = import.meta.url;
  return here.endsWith('.ts') ? new URL('../dist/fastpath.js', here).href : new URL('./fastpath.js', here).href;
}

const ID_RE = /^[a-z0-9][a-z0-9._-]{0,31}$/i;
const LEGACY_PORTS: Record<number, number> = { 0x3f8: 0, 0x2f8: 1, 0x3e8: 2, 0x2e8: 3 };

export interface SerialOptions {
  /** Second and further UARTs: a distinct id; the plugin is then named `serial-<id>`. */
  id?: string;
  /** Base I/O port (default 0x3f8). */
  port?: number;
  /** IRQ line (default 4). */
  irq?: number;
  /** Add `console=ttyS<n>` to the kernel cmdline (default true without `id`, false with one). */
  console?: boolean;
  /** Where guest output goes: 'stdout' (default), 'none', or a file. */
  output?: 'stdout' | 'none' | { file: string; append?: boolean };
  /** Where guest input comes from: 'auto' (stdin when it is a TTY; default without `id`), 'stdin', 'none'. */
  input?: 'auto' | 'stdin' | 'none';
  /** Programmatic output sink (tests); called with each batch of transmitted bytes. */
  sink?: (bytes: Uint8Array) => void;
  /** Bytes of output kept for `output()` / `waitFor()` (default 1 MiB). */
  history?: number;
  /** Gate the IRQ output with MCR.OUT2 as PC boards do (default false, like QEMU). */
  out2Gate?: boolean;
  /** Answer LSR reads on the vCPU thread from a shared mirror (default true). */
  fastPath?: boolean;
}

/** What the plugin publishes with `machine.provide(<plugin name>, api)`. */
export interface SerialApi {
  /** Called with every batch of bytes the guest transmits; returns an unsubscribe function. */
  onData(cb: (bytes: Uint8Array) => void): () => void;
  /** Feeds bytes to the guest (queued behind the RX FIFO; never overruns it). */
  inject(bytes: Uint8Array | string): void;
  /** Everything the guest transmitted so far (the last `history` bytes). */
  output(): Uint8Array;
  /** `output()` decoded as UTF-8. */
  text(): string;
  /** Resolves with the matched text once the output (so far or later) matches; rejects on timeout or stop. */
  waitFor(pattern: string | RegExp, timeoutMs?: number): Promise<string>;
  /** Delivers buffered output now (normally batched per event-loop turn). */
  flush(): void;
  /** The UART (for inspection). */
  readonly uart: Uart16550;
}

interface Waiter {
  pattern: string | RegExp;
  resolve(s: string): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

function validate(o: unknown): SerialOptions {
  if (o === undefined || o === null) return {};
  if (typeof o !== 'object' || Array.isArray(o)) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'serial: options must be an object');
  const { sink, output, ...rest } = o as Record<string, unknown>;
  checkOptions('serial', rest, {
    id: { type: 'string' },
    port: { type: 'integer' },
    irq: { type: 'integer' },
    console: { type: 'boolean' },
    input: { type: ['auto', 'stdin', 'none'] },
    history: { type: 'integer' },
    out2Gate: { type: 'boolean' },
    fastPath: { type: 'boolean' },
  });
  const r = rest as SerialOptions;
  if (r.id !== undefined && !ID_RE.test(r.id)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `serial: option id must be letters, digits, . _ - (got ${JSON.stringify(r.id)})`, { details: { key: 'id' } });
  }
  if (r.port !== undefined && (r.port < 0 || r.port > 0xfff8)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `serial: option port must be an I/O port 0..0xfff8 (got ${r.port})`, { details: { key: 'port' } });
  }
  if (r.irq !== undefined && (r.irq < 0 || r.irq > 23)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `serial: option irq must be 0..23 (got ${r.irq})`, { details: { key: 'irq' } });
  }
  if (r.history !== undefined && (r.history < 0 || r.history > 256 * 1024 * 1024)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `serial: option history must be 0..256 MiB (got ${r.history})`, { details: { key: 'history' } });
  }
  if (sink !== undefined && typeof sink !== 'function') {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'serial: option sink must be a function (bytes: Uint8Array) => void', { details: { key: 'sink' } });
  }
  if (output !== undefined && output !== 'stdout' && output !== 'none') {
    const f = output as { file?: unknown; append?: unknown };
    if (typeof f !== 'object' || f === null || typeof f.file !== 'string' || f.file === '' || (f.append !== undefined && typeof f.append !== 'boolean')) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `serial: option output must be 'stdout', 'none' or { file: string, append?: boolean } (got ${JSON.stringify(output)})`, {
        details: { key: 'output' },
      });
    }
  }
  return o as SerialOptions;
}

/** The kernel cmdline `console=` value for a UART at `port`. */
export function consoleArg(port: number): string {
  const idx = LEGACY_PORTS[port];
  return idx !== undefined ? `console=ttyS${idx}` : `console=uart8250,io,0x${port.toString(16)}`;
}

/** Output side of one UART: batching, history, sinks, waiters. Exported for tests. */
export class SerialOutput {
  private pending: number[] = [];
  private scheduled: NodeJS.Immediate | undefined;
  private history: Uint8Array;
  private histLen = 0;
  private textBuf = '';
  private readonly decoder = new TextDecoder('utf-8');
  private readonly listeners = new Set<(b: Uint8Array) => void>();
  private waiters: Waiter[] = [];
  private closed = false;
  fd: number | undefined;

  constructor(
    private readonly historyLimit: number,
    private readonly toStdout: boolean,
    private readonly sink: ((b: Uint8Array) => void) | undefined,
    private readonly log: Logger,
  ) {
    this.history = new Uint8Array(Math.min(historyLimit, 64 * 1024));
  }

  push(b: number): void {
    this.pending.push(b);
    if (this.pending.length >= 4096) this.flush();
    else if (this.scheduled === undefined) this.scheduled = setImmediate(() => this.flush());
  }

  flush(): void {
    if (this.scheduled !== undefined) {
      clearImmediate(this.scheduled);
      this.scheduled = undefined;
    }
    if (this.pending.length === 0) return;
    const chunk = Uint8Array.from(this.pending);
    this.pending = [];
    this.appendHistory(chunk);
    this.textBuf += this.decoder.decode(chunk, { stream: true });
    if (this.textBuf.length > this.historyLimit) this.textBuf = this.textBuf.slice(this.textBuf.length - this.historyLimit);
    if (this.toStdout) process.stdout.write(chunk);
    if (this.fd !== undefined) {
      try {
        fs.writeSync(this.fd, chunk);
      } catch (e) {
        this.log.error({ err: e }, 'serial output file write failed; output to file disabled');
        this.closeFile();
      }
    }
    for (const cb of [this.sink, ...this.listeners]) {
      if (!cb) continue;
      try {
        cb(chunk);
      } catch (e) {
        this.log.error({ err: e }, 'serial output listener threw');
      }
    }
    this.checkWaiters();
  }

  private appendHistory(chunk: Uint8Array): void {
    const limit = this.historyLimit;
    if (limit === 0) return;
    if (chunk.length >= limit) {
      if (this.history.length < limit) this.history = new Uint8Array(limit);
      this.history.set(chunk.subarray(chunk.length - limit));
      this.histLen = limit;
      return;
    }
    const need = this.histLen + chunk.length;
    if (need > this.history.length && this.history.length < limit) {
      const grown = new Uint8Array(Math.min(limit, Math.max(need, this.history.length * 2)));
      grown.set(this.history.subarray(0, this.histLen));
      this.history = grown;
    }
    if (need > this.history.length) {
      const drop = need - this.history.length;
      this.history.copyWithin(0, drop, this.histLen);
      this.histLen -= drop;
    }
    this.history.set(chunk, this.histLen);
    this.histLen += chunk.length;
  }

  output(): Uint8Array {
    this.flush();
    return this.history.slice(0, this.histLen);
  }

  text(): string {
    this.flush();
    return this.textBuf;
  }

  onData(cb: (b: Uint8Array) => void): () => void {
    this.listeners.add(cb);
    return () => this.listeners.delete(cb);
  }

  private match(p: string | RegExp): string | undefined {
    if (typeof p === 'string') return this.textBuf.includes(p) ? p : undefined;
    const m = this.textBuf.match(p);
    return m ? m[0] : undefined;
  }

  private checkWaiters(): void {
    if (this.waiters.length === 0) return;
    const left: Waiter[] = [];
    for (const w of this.waiters) {
      const m = this.match(w.pattern);
      if (m !== undefined) {
        clearTimeout(w.timer);
        w.resolve(m);
      } else left.push(w);
    }
    this.waiters = left;
  }

  waitFor(pattern: string | RegExp, timeoutMs = 30_000): Promise<string> {
    if (typeof pattern !== 'string' && !(pattern instanceof RegExp)) {
      return Promise.reject(new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'serial.waitFor: pattern must be a string or RegExp'));
    }
    this.flush();
    const m = this.match(pattern);
    if (m !== undefined) return Promise.resolve(m);
    if (this.closed) {
      return Promise.reject(new KvmkitError('KVMKIT_ERR_STATE', `serial: the machine stopped and the output never matched ${String(pattern)}`, { details: { tail: this.textBuf.slice(-500) } }));
    }
    return new Promise<string>((resolve, reject) => {
      const w: Waiter = {
        pattern,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters = this.waiters.filter((x) => x !== w);
          reject(new KvmkitError('KVMKIT_ERR_TIMEOUT', `serial: no output matching ${String(pattern)} within ${timeoutMs} ms`, {
            details: { pattern: String(pattern), timeoutMs, tail: this.textBuf.slice(-500) },
          }));
        }, timeoutMs),
      };
      this.waiters.push(w);
    });
  }

  /** Flushes, closes the file, and rejects waiters that can no longer match. */
  close(): void {
    this.flush();
    this.decoder.decode();
    this.closed = true;
    this.closeFile();
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(new KvmkitError('KVMKIT_ERR_STATE', `serial: the machine stopped and the output never matched ${String(w.pattern)}`, { details: { tail: this.textBuf.slice(-500) } }));
    }
    this.waiters = [];
  }

  /** Re-opens after a close (machine restarted). */
  reopen(): void {
    this.closed = false;
  }

  private closeFile(): void {
    if (this.fd !== undefined) {
      try {
        fs.closeSync(this.fd);
      } catch {
        /* already closed */
      }
      this.fd = undefined;
    }
  }
}

const CTRL_A = 0x01;

/** Reads stdin (raw mode when a TTY) into the UART; Ctrl-A x stops the machine, Ctrl-A Ctrl-A sends Ctrl-A. */
class StdinInput {
  private escape = false;
  private wasRaw = false;
  private active = false;
  private readonly onData = (d: Buffer) => this.handle(d);
  private readonly onExit = () => this.stop();

  constructor(
    private readonly deliver: (b: Uint8Array) => void,
    private readonly quit: () => void,
    private readonly log: Logger,
  ) {}

  start(): void {
    if (this.active) return;
    this.active = true;
    const stdin = process.stdin;
    if (stdin.isTTY) {
      this.wasRaw = stdin.isRaw;
      stdin.setRawMode(true);
      this.log.info('serial console on stdin (raw mode): Ctrl-A x stops the VM');
    }
    stdin.on('data', this.onData);
    stdin.resume();
    process.once('exit', this.onExit);
  }

  private handle(d: Buffer): void {
    const out: number[] = [];
    for (const b of d) {
      if (this.escape) {
        this.escape = false;
        if (b === 0x78 /* x */ || b === 0x58) {
          this.quit();
          continue;
        }
        if (b === CTRL_A) {
          out.push(CTRL_A);
          continue;
        }
        out.push(CTRL_A, b);
        continue;
      }
      if (b === CTRL_A && process.stdin.isTTY) {
        this.escape = true;
        continue;
      }
      out.push(b);
    }
    if (out.length > 0) this.deliver(Uint8Array.from(out));
  }

  stop(): void {
    if (!this.active) return;
    this.active = false;
    const stdin = process.stdin;
    stdin.off('data', this.onData);
    stdin.pause();
    if (stdin.isTTY) {
      try {
        stdin.setRawMode(this.wasRaw);
      } catch {
        /* terminal gone */
      }
    }
    process.off('exit', this.onExit);
  }
}

/** The plugin factory: a 16550A UART (default COM1: 0x3f8, IRQ 4). */
export default function serial(options: SerialOptions = {}): Plugin {
  const opts = options ?? {};
  // An invalid id is reported by validateOptions; keep the name valid so that error is the one raised.
  const id = typeof opts.id === 'string' && ID_RE.test(opts.id) ? opts.id : undefined;
  const name = id === undefined ? 'serial' : `serial-${id}`;
  const wantConsole = opts.console ?? id === undefined;
  return {
    name,
    version: VERSION,
    kernel: '^0.1.0',
    provides: wantConsole ? ['console'] : ['serial+'],
    options,
    validateOptions(o) {
      validate(o);
    },
    apply(machine: MachineApi, { log }) {
      const o = validate(options);
      const port = o.port ?? 0x3f8;
      const irqWant = o.irq ?? 4;
      const outputMode = o.output ?? 'stdout';
      const inputMode = o.input ?? (id === undefined ? 'auto' : 'none');
      const out = new SerialOutput(o.history ?? 1024 * 1024, outputMode === 'stdout', o.sink, log);
      let setLine: (level: boolean) => void = () => {};
      const fast = o.fastPath ?? true;
      const mirrorBuf = fast ? new SharedArrayBuffer(MIRROR_INTS * 4) : undefined;
      const uart = new Uart16550({
        setIrq: (level) => setLine(level),
        transmit: (b) => out.push(b),
        out2Gate: o.out2Gate ?? false,
        ...(mirrorBuf ? { lsrMirror: new Int32Array(mirrorBuf) } : {}),
      });
      const stdin = new StdinInput(
        (b) => uart.enqueueInput(b),
        () => machine.requestStop({ reason: 'user', exitCode: 0, message: 'Ctrl-A x on the serial console' }),
        log,
      );
      const api: SerialApi = {
        onData: (cb) => out.onData(cb),
        inject: (b) => uart.enqueueInput(typeof b === 'string' ? new TextEncoder().encode(b) : b),
        output: () => out.output(),
        text: () => out.text(),
        waitFor: (p, t) => out.waitFor(p, t),
        flush: () => out.flush(),
        uart,
      };
      machine.provide(name, api);

      machine.hooks.devices.tapPromise(name, async (reg) => {
        const irq = reg.allocateIrq(name, irqWant);
        setLine = (level) => reg.setIrq(irq, level);
        reg.addPio(port, 8, uart, name, mirrorBuf ? { module: fastPathModule(), shared: mirrorBuf } : undefined);
        if (wantConsole) reg.addCmdline(consoleArg(port));
        if (typeof outputMode === 'object') {
          try {
            out.fd = fs.openSync(outputMode.file, outputMode.append ? 'a' : 'w', 0o644);
          } catch (e) {
            throw new KvmkitError('KVMKIT_ERR_SERIAL_OUTPUT', `serial: cannot open output file ${outputMode.file}: ${(e as Error).message}`, {
              cause: e,
              details: { file: outputMode.file },
            });
          }
        }
        out.reopen();
        log.debug({ port: `0x${port.toString(16)}`, irq }, 'UART 16550A registered');
      });
      machine.hooks.beforeRun.tapPromise(name, async () => {
        if (inputMode === 'stdin' || (inputMode === 'auto' && process.stdin.isTTY)) stdin.start();
      });
      // A start() that fails after beforeRun never reaches afterStop: give the terminal back here too.
      machine.hooks.failed.tap(name, () => stdin.stop());
      machine.hooks.afterStop.tapPromise(name, async () => {
        stdin.stop();
        out.close();
      });
      machine.hooks.saveState.tapPromise(name, async (w) => {
        w.write(name, SERIAL_STATE_VERSION, uart.save());
      });
      machine.hooks.restoreState.tapPromise(name, async (r) => {
        if (!r.has(name)) {
          log.warn({ section: name }, 'saved state has no section for this UART; it keeps its reset state');
          return;
        }
        uart.restore(r.read<UartState>(name, SERIAL_STATE_VERSION));
      });
    },
  };
}

export { serial };
