import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync, rmSync, writeFileSync } from 'node:fs';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KvmkitError } from '@kvmkit/kernel';

/**
 * Helpers around the probe guest (test/guests/probe) and the C floor VMM (bench/cfloor).
 * See README "Probe guest".
 */

/** Where the probe guest's sources live, relative to the repository root. */
export const PROBE_DIR = 'test/guests/probe';
/** Where the C floor VMM's sources live, relative to the repository root. */
export const CFLOOR_DIR = 'bench/cfloor';

export const TESTKIT_ERROR_CODES = {
  KVMKIT_ERR_TESTKIT_BUILD: 'building the probe guest or cfloor with make failed (or gcc/make is missing)',
  KVMKIT_ERR_TESTKIT_ROOT: 'the kvmkit repository root (with test/guests/probe) was not found',
  KVMKIT_ERR_TESTKIT_QEMU: 'qemu-system-x86_64 is missing or failed to start the guest',
  KVMKIT_ERR_TESTKIT_SPAWN: 'a helper process could not be started',
} as const;

/** One `PROBE <test> key=value ... word ...` line. */
export interface ProbeLine {
  test: string;
  /** key=value tokens (values kept as strings; numbers are decimal). */
  fields: Record<string, string>;
  /** Tokens without '=' (e.g. `up` in `PROBE smp cpu=1 up`). */
  words: string[];
  /** The line from `PROBE` on. */
  raw: string;
}

export interface ProbeOutput {
  /** Every PROBE line except `PROBE DONE`, in order. */
  lines: ProbeLine[];
  /** From the first `PROBE DONE status=N` line. */
  done?: { status: number };
}

const PROBE_RE = /(?:^|[^A-Za-z0-9_])PROBE ([^\r\n]*)/;
// Terminal escape sequences (firmware, QEMU) that may precede a PROBE line on the same line.
const ANSI_RE = /\x1b(?:\[[0-9;?]*[ -\/]*[@-~]|[@-Z\\-_])/g;

/** Parses the probe guest's serial output. Non-PROBE lines (firmware, QEMU noise) and ANSI escapes are ignored. */
export function parseProbeOutput(text: string): ProbeOutput {
  const out: ProbeOutput = { lines: [] };
  for (const rawLine of text.split(/\r?\n|\r/)) {
    const m = PROBE_RE.exec(rawLine.replace(ANSI_RE, ''));
    if (!m) continue;
    const tokens = m[1]!.trim().split(/\s+/).filter((t) => t.length > 0);
    if (tokens.length === 0) continue;
    const [test, ...rest] = tokens as [string, ...string[]];
    const fields: Record<string, string> = {};
    const words: string[] = [];
    for (const t of rest) {
      const eq = t.indexOf('=');
      if (eq > 0) fields[t.slice(0, eq)] = t.slice(eq + 1);
      else words.push(t);
    }
    if (test === 'DONE') {
      const status = fields['status'] !== undefined && /^\d+$/.test(fields['status']) ? Number(fields['status']) : NaN;
      if (out.done === undefined && Number.isFinite(status)) out.done = { status };
      continue;
    }
    out.lines.push({ test, fields, words, raw: `PROBE ${m[1]!.trim()}` });
  }
  return out;
}

/** The probe cmdline for a test: `probe.test=<test> probe.<k>=<v> ...`. Keys and values must be token-safe. */
export function probeCmdline(test: string, params: Record<string, string | number | bigint> = {}): string {
  const parts = [['test', test] as const, ...Object.entries(params)].map(([k, v]) => {
    const s = String(v);
    if (!/^[A-Za-z0-9_.-]+$/.test(k) || !/^[A-Za-z0-9_.:,x-]*$/.test(s)) {
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `probe parameter ${k}=${s} is not a plain token`, { details: { key: k, value: s } });
    }
    return `probe.${k}=${s}`;
  });
  return parts.join(' ');
}

/**
 * QEMU's isa-debug-exit makes the process exit with (value << 1) | 1. Returns the guest's value,
 * or null when the exit code cannot come from the debug-exit device (even codes, signals).
 */
export function decodeQemuExit(code: number | null): number | null {
  if (code === null || code < 0 || (code & 1) === 0) return null;
  return code >> 1;
}

/** Absolute path of an executable on PATH, or undefined. */
export function findExecutable(name: string, path = process.env['PATH'] ?? ''): string | undefined {
  for (const dir of path.split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      /* not here */
    }
  }
  return undefined;
}

export interface RootOptions {
  /** Repository root; default: found by walking up from this module to a dir with test/guests/probe. */
  root?: string;
}

/** The kvmkit repository root (the directory holding test/guests/probe/Makefile). */
export function repoRoot(opts: RootOptions = {}): string {
  if (opts.root) return resolve(opts.root);
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, PROBE_DIR, 'Makefile'))) return dir;
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  throw new KvmkitError('KVMKIT_ERR_TESTKIT_ROOT', `no ${PROBE_DIR}/Makefile above ${dirname(fileURLToPath(import.meta.url))}`);
}

function make(dir: string, target: string, what: string): string {
  const cmd = `make -C ${dir}`;
  const missing = ['make', 'gcc', 'ld'].filter((t) => !findExecutable(t));
  if (missing.length > 0) {
    if (existsSync(target)) return target; // prebuilt output, nothing to build it with
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_BUILD', `${what} needs ${missing.join(', ')} to build (${cmd}); install build-essential`, {
      details: { missing, command: cmd },
    });
  }
  try {
    execFileSync('make', ['-s', '-C', dir], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
  } catch (e) {
    const err = e as { stderr?: Buffer; stdout?: Buffer };
    const output = `${err.stdout?.toString() ?? ''}${err.stderr?.toString() ?? ''}`;
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_BUILD', `${cmd} failed: ${output.trim().split('\n').slice(-5).join(' | ')}`, {
      cause: e,
      details: { command: cmd, output },
    });
  }
  if (!existsSync(target)) {
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_BUILD', `${cmd} did not produce ${target}`, { details: { command: cmd } });
  }
  return target;
}

/** Path of test/guests/probe/build/probe.elf, built (`make -C test/guests/probe`) when missing or stale. */
export function probeElfPath(opts: RootOptions = {}): string {
  const dir = join(repoRoot(opts), PROBE_DIR);
  return make(dir, join(dir, 'build', 'probe.elf'), 'the probe guest');
}

/** Path of bench/cfloor/build/cfloor, built (`make -C bench/cfloor`, which also builds the flat guests). */
export function cfloorPath(opts: RootOptions = {}): string {
  const dir = join(repoRoot(opts), CFLOOR_DIR);
  return make(dir, join(dir, 'build', 'cfloor'), 'cfloor');
}

/** Path of a flat guest built with cfloor (bench/cfloor/guests/<name>.S → build/<name>.bin). */
export function cfloorFlatGuestPath(name: 'pio-loop' | 'mmio-loop' | 'count-exit' | 'bad-port', opts: RootOptions = {}): string {
  cfloorPath(opts);
  return join(repoRoot(opts), CFLOOR_DIR, 'build', `${name}.bin`);
}

interface Spawned {
  stdout: string;
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  wallMs: number;
  timedOut: boolean;
}

function run(cmd: string, args: string[], timeoutMs: number, onStdout?: (chunk: string) => void): Promise<Spawned> {
  return new Promise((resolvePromise, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      onStdout?.(d);
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new KvmkitError('KVMKIT_ERR_TESTKIT_SPAWN', `cannot run ${cmd}: ${e.message}`, { cause: e, details: { cmd, args } }));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolvePromise({ stdout, stderr, code, signal, wallMs: performance.now() - t0, timedOut });
    });
  });
}

export interface QemuProbeOptions extends RootOptions {
  /** probe.test (hello, pio, mmio, smp, timer, exit). */
  test: string;
  /** Other probe.<key>=<value> parameters (iters, ring, status, ms, period). */
  params?: Record<string, string | number | bigint>;
  /** -smp (default 1). */
  cpus?: number;
  /** -m in MiB (default 64). */
  memory?: number;
  /** Kill QEMU after this long and throw KVMKIT_ERR_TIMEOUT (default 60 000). */
  timeoutMs?: number;
  /** QEMU binary (default qemu-system-x86_64 on PATH). */
  qemu?: string;
  /** Extra QEMU arguments. */
  extraArgs?: string[];
  /** Called with each chunk of QEMU's stdout (the guest's serial output) as it arrives. */
  onOutput?: (chunk: string) => void;
  /** Runs QEMU under this command prefix, e.g. `TestNetns.wrap` (`ip netns exec <ns>`) for a TAP inside a namespace. */
  wrap?: string[];
}

export interface QemuProbeResult {
  /** QEMU's stdout + stderr (the guest's serial output is on stdout). */
  output: string;
  /** The guest's debug-exit value ((code-1)/2), or null when QEMU did not exit through it. */
  exitStatus: number | null;
  /** QEMU's process exit code. */
  qemuExitCode: number | null;
  wallMs: number;
  probe: ProbeOutput;
}

/** The QEMU command line used by runQemuProbe (microvm, KVM, debug-exit at 0xf4). */
export function qemuProbeArgs(elf: string, cmdline: string, cpus = 1, memory = 64): string[] {
  return [
    '-M', 'microvm,acpi=off,rtc=off', '-enable-kvm', '-cpu', 'host,-arch-capabilities',
    '-smp', String(cpus), '-m', String(memory), '-nographic', '-no-reboot',
    '-kernel', elf, '-append', cmdline, '-device', 'isa-debug-exit,iobase=0xf4,iosize=4',
  ];
}

/** Boots the probe guest on QEMU microvm and returns its output and exit status. */
export async function runQemuProbe(opts: QemuProbeOptions): Promise<QemuProbeResult> {
  const qemu = opts.qemu ?? findExecutable('qemu-system-x86_64');
  if (!qemu) {
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_QEMU', 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)');
  }
  const elf = probeElfPath(opts);
  const args = [...qemuProbeArgs(elf, probeCmdline(opts.test, opts.params), opts.cpus ?? 1, opts.memory ?? 64), ...(opts.extraArgs ?? [])];
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const wrap = opts.wrap ?? [];
  const r = wrap.length > 0 ? await run(wrap[0]!, [...wrap.slice(1), qemu, ...args], timeoutMs, opts.onOutput) : await run(qemu, args, timeoutMs, opts.onOutput);
  const output = r.stdout + r.stderr;
  if (r.timedOut) {
    throw new KvmkitError('KVMKIT_ERR_TIMEOUT', `probe ${opts.test} on QEMU did not finish within ${timeoutMs} ms`, { details: { output, args } });
  }
  const probe = parseProbeOutput(r.stdout);
  const exitStatus = decodeQemuExit(r.code);
  if (!probe.done && (exitStatus === null || exitStatus === 0)) {
    // Exit code 1 is also QEMU's own failure code: without PROBE DONE it is not a guest exit.
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_QEMU', `QEMU exited with ${r.code ?? r.signal} before the probe finished: ${r.stderr.trim().slice(-500)}`, {
      details: { output, args, code: r.code },
    });
  }
  return { output, exitStatus, qemuExitCode: r.code, wallMs: r.wallMs, probe };
}

export interface CfloorResult {
  stdout: string;
  stderr: string;
  /** cfloor's exit code: the guest's debug-exit value, 0 when all vCPUs halted, 0x7e on an unhandled exit. */
  exitCode: number | null;
  /** From `cfloor exits=<n> wall_us=<n>` (undefined when the line is missing). */
  exits?: number;
  wallUs?: number;
  /** Wall time of the process, spawn to close. */
  wallMs: number;
  probe: ProbeOutput;
}

/** Runs bench/cfloor/build/cfloor with `args` (e.g. ['pvh', probeElfPath(), '--cmdline', '...']). */
export async function runCfloor(args: string[], opts: RootOptions & { timeoutMs?: number } = {}): Promise<CfloorResult> {
  const bin = cfloorPath(opts);
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const r = await run(bin, args, timeoutMs);
  if (r.timedOut) {
    throw new KvmkitError('KVMKIT_ERR_TIMEOUT', `cfloor ${args.join(' ')} did not finish within ${timeoutMs} ms`, {
      details: { stdout: r.stdout, stderr: r.stderr },
    });
  }
  const m = /cfloor exits=(\d+) wall_us=(\d+)/.exec(r.stderr);
  const res: CfloorResult = { stdout: r.stdout, stderr: r.stderr, exitCode: r.code, wallMs: r.wallMs, probe: parseProbeOutput(r.stdout) };
  if (m) {
    res.exits = Number(m[1]);
    res.wallUs = Number(m[2]);
  }
  return res;
}

/** Boots the probe guest on cfloor (pvh mode). */
export function runCfloorProbe(opts: Omit<QemuProbeOptions, 'qemu' | 'extraArgs'>): Promise<CfloorResult> {
  const args = ['pvh', probeElfPath(opts), '--cmdline', probeCmdline(opts.test, opts.params), '--mem', String(opts.memory ?? 64), '--cpus', String(opts.cpus ?? 1)];
  return runCfloor(args, opts);
}

// ---- network namespaces and UDP peers for the probe's virtio-net modes (probe.test=net) ----

/** Why TAP + netns tests cannot run here (not root, no /dev/net/tun, no `ip`), or undefined when they can. */
export function netnsUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (CAP_NET_ADMIN) for TAP devices and network namespaces';
  if (!existsSync('/dev/net/tun')) return '/dev/net/tun is missing';
  if (!findExecutable('ip', `${process.env['PATH'] ?? ''}${delimiter}/usr/sbin${delimiter}/sbin`)) return 'the ip command (iproute2) is missing';
  return undefined;
}

function ipCmd(args: string[]): string {
  try {
    return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new KvmkitError('KVMKIT_ERR_TESTKIT_SPAWN', `ip ${args.join(' ')} failed: ${(err.stderr ?? err.message).trim()}`, { cause: e, details: { args } });
  }
}

let netnsSeq = 0;

/**
 * A throwaway network namespace (`ip netns add`) for TAP tests; traffic never leaves the machine.
 * `destroy()` deletes it (and every link inside) and is idempotent.
 */
export class TestNetns {
  private alive = true;
  private constructor(readonly name: string) {}

  /** Creates `kvmkit-<tag>-<pid>-<n>`. */
  static create(tag: string): TestNetns {
    const name = `kvmkit-${tag}-${process.pid}-${netnsSeq++}`;
    ipCmd(['netns', 'add', name]);
    const ns = new TestNetns(name);
    ns.ip('link', 'set', 'lo', 'up');
    return ns;
  }

  /** `ip -n <ns> ...` */
  ip(...args: string[]): string {
    return ipCmd(['-n', this.name, ...args]);
  }

  /** The command prefix that runs a program inside the namespace. */
  get wrap(): string[] {
    return ['ip', 'netns', 'exec', this.name];
  }

  /** Moves an existing link (e.g. a TAP a VMM opened in this namespace's parent) in, gives it `cidr`, sets it up. */
  adopt(link: string, cidr: string): void {
    ipCmd(['link', 'set', link, 'netns', this.name]);
    this.ip('addr', 'add', cidr, 'dev', link);
    this.ip('link', 'set', link, 'up');
  }

  /** Creates a persistent TAP (with vnet_hdr) inside, with `cidr`, up: a VMM started with `wrap` attaches to it. */
  addTap(name: string, cidr: string): void {
    this.ip('tuntap', 'add', 'dev', name, 'mode', 'tap', 'vnet_hdr');
    this.ip('addr', 'add', cidr, 'dev', name);
    this.ip('link', 'set', name, 'up');
  }

  /** Runs a command inside; resolves with its output and exit code (never rejects on a non-zero exit). */
  exec(cmd: string, args: string[], timeoutMs = 30_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return run('ip', ['netns', 'exec', this.name, cmd, ...args], timeoutMs).then((r) => ({ code: r.code, stdout: r.stdout, stderr: r.stderr }));
  }

  destroy(): void {
    if (!this.alive) return;
    this.alive = false;
    try {
      ipCmd(['netns', 'del', this.name]);
    } catch {
      /* already gone */
    }
  }
}

/** The probe's UDP payload: bytes 0..3 = seq (big endian), byte i ≥ 4 = (seq + i) & 0xff. */
export function probeUdpPayload(seq: number, size: number): Buffer {
  const b = Buffer.alloc(size);
  b.writeUInt32BE(seq >>> 0, 0);
  for (let i = 4; i < size; i++) b[i] = (seq + i) & 0xff;
  return b;
}

// Child scripts (CommonJS, run with `node -e`): they live in the namespace, the test process does not.
const RECEIVER_JS = `
const dgram = require('node:dgram'); const o = JSON.parse(process.argv[1]);
const s = dgram.createSocket({ type: 'udp4', recvBufferSize: o.rcvbuf });
const seen = new Uint8Array(o.count); let received = 0, bad = 0, dup = 0, bytes = 0, ooo = 0, maxSeq = -1, first = 0n, last = 0n;
s.on('message', (m) => {
  const t = process.hrtime.bigint(); if (first === 0n) first = t; last = t;
  if (m.length < 4) { bad++; return; }
  const seq = m.readUInt32BE(0);
  for (let i = 4; i < m.length; i++) if (m[i] !== ((seq + i) & 255)) { bad++; return; }
  if (seq >= o.count || (o.size && m.length !== o.size)) { bad++; return; }
  if (seen[seq]) { dup++; return; }
  seen[seq] = 1; received++; bytes += m.length; if (seq < maxSeq) ooo++; else maxSeq = seq;
});
s.bind(o.port, o.address || '0.0.0.0', () => process.stdout.write(JSON.stringify({ ready: true, rcvbuf: s.getRecvBufferSize() }) + '\\n'));
const end = () => { process.stdout.write(JSON.stringify({ received, bad, dup, bytes, outOfOrder: ooo, ms: Number(last - first) / 1e6 }) + '\\n'); process.exit(0); };
process.stdin.on('end', end); process.stdin.resume(); process.on('SIGTERM', end);
`;

const SENDER_JS = `
const dgram = require('node:dgram'); const o = JSON.parse(process.argv[1]);
const s = dgram.createSocket('udp4');
const pay = (seq) => { const b = Buffer.alloc(o.size); b.writeUInt32BE(seq >>> 0, 0); for (let i = 4; i < o.size; i++) b[i] = (seq + i) & 255; return b; };
(async () => {
  const t0 = process.hrtime.bigint(); const gap = BigInt(Math.round(o.burst * 1e9 / o.pps)); let seq = 0, errors = 0;
  while (seq < o.count) {
    const due = t0 + BigInt(Math.floor(seq / o.burst)) * gap;
    while (process.hrtime.bigint() < due) await new Promise((r) => setImmediate(r));
    for (let k = 0; k < o.burst && seq < o.count; k++, seq++)
      await new Promise((r) => s.send(pay(seq), o.port, o.address, (e) => { if (e) errors++; r(); }));
  }
  process.stdout.write(JSON.stringify({ sent: seq, errors, ms: Number(process.hrtime.bigint() - t0) / 1e6 }) + '\\n');
  s.close();
})();
`;

export interface UdpReceiverStats {
  /** Distinct valid datagrams (seq < count, pattern and size right). */
  received: number;
  /** Wrong pattern, size or seq ≥ count. */
  bad: number;
  dup: number;
  bytes: number;
  /** Datagrams that arrived with a seq below one seen before. */
  outOfOrder: number;
  /** First to last datagram. */
  ms: number;
}

export interface UdpReceiver {
  /** The socket's receive buffer as granted (SO_RCVBUF). */
  rcvbuf: number;
  /** Stops the receiver and returns its counts. */
  stop(): Promise<UdpReceiverStats>;
}

/** A child process that reports on stdout one JSON object per line (see spawnJsonLines). */
export interface JsonLinesChild {
  proc: ChildProcess;
  /** Every line printed so far, parsed (a line that is not JSON is kept as { text }). */
  lines: any[];
  /**
   * The first line matching `pred` or carrying a truthy `error` field (the fixtures' way to report a failure), waiting
   * for it up to `ms` (default 20 000). Throws KVMKIT_ERR_TESTKIT_SPAWN when the child exited or the time passed
   * without one; the child keeps running (kill it in a finally).
   */
  next(pred: (o: any) => boolean, ms?: number): Promise<any>;
  /** The child's end: its last line, exit code, signal and stderr (rejects when it could not be started). */
  done: Promise<{ last: any; exitCode: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  /** Its stderr so far (empty with inheritStderr). */
  stderr(): string;
}

export interface JsonLinesOptions {
  /** Give the child a stdin pipe (proc.stdin) instead of none. */
  stdin?: boolean;
  /** The child's stderr goes to ours instead of being collected. */
  inheritStderr?: boolean;
  /** Called with each parsed line; `kill()` sends SIGKILL to the child. */
  onLine?: (o: any, kill: () => void) => void;
}

/** Spawns `argv` (program and arguments) and collects its stdout as JSON lines. */
export function spawnJsonLines(argv: readonly string[], opts: JsonLinesOptions = {}): JsonLinesChild {
  const p = spawn(argv[0]!, argv.slice(1), { stdio: [opts.stdin ? 'pipe' : 'ignore', 'pipe', opts.inheritStderr ? 'inherit' : 'pipe'] });
  const lines: any[] = [];
  const waiters: Array<() => void> = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  let buf = '';
  let err = '';
  let exited = false;
  p.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const text = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let o: any;
      try {
        o = JSON.parse(text);
      } catch {
        o = { text };
      }
      lines.push(o);
      opts.onLine?.(o, () => p.kill('SIGKILL'));
      wake();
    }
  });
  p.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  const done = new Promise<{ last: any; exitCode: number | null; signal: NodeJS.Signals | null; stderr: string }>((res, rej) => {
    p.on('error', (e) => {
      exited = true;
      wake();
      rej(new KvmkitError('KVMKIT_ERR_TESTKIT_SPAWN', `cannot run ${argv[0]}: ${e.message}`, { cause: e, details: { argv } }));
    });
    p.on('close', (exitCode, signal) => {
      exited = true;
      res({ last: lines.at(-1), exitCode, signal, stderr: err });
      wake();
    });
  });
  done.catch(() => {}); // reported through next() too; an unobserved rejection must not fail the caller
  const what = argv.slice(0, 6).map((a) => (a.length > 80 ? `${a.slice(0, 80)}…` : a)).join(' ');
  const next = async (pred: (o: any) => boolean, ms = 20_000): Promise<any> => {
    const end = Date.now() + ms;
    for (;;) {
      const hit = lines.find((o) => pred(o) || o.error);
      if (hit) return hit;
      if (exited || Date.now() > end) {
        const why = exited ? `exited ${p.exitCode ?? p.signalCode}` : `no line within ${ms} ms`;
        throw new KvmkitError('KVMKIT_ERR_TESTKIT_SPAWN', `${what}: no matching line (${why}); lines ${JSON.stringify(lines)} stderr ${err.trim()}`, {
          details: { argv, lines, stderr: err },
        });
      }
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 100);
      });
    }
  };
  return { proc: p, lines, next, done, stderr: () => err };
}

/** Waits for a line of a helper child and kills the child when none comes. */
async function nextOrKill(c: JsonLinesChild, pred: (o: any) => boolean, ms: number): Promise<any> {
  try {
    return await c.next(pred, ms);
  } catch (e) {
    c.proc.kill('SIGKILL');
    throw e;
  }
}

/**
 * Starts a UDP receiver inside `ns` bound to address:port (address '' = any: the address may not exist yet) that checks the probe payload (seq < count, pattern,
 * `size` when given). Resolves once the socket is bound.
 */
export async function startNetnsUdpReceiver(ns: TestNetns, o: { address: string; port: number; count: number; size?: number; rcvbuf?: number }): Promise<UdpReceiver> {
  const args = { address: o.address, port: o.port, count: o.count, size: o.size ?? 0, rcvbuf: o.rcvbuf ?? 4 << 20 };
  const c = spawnJsonLines([...ns.wrap, process.execPath, '-e', RECEIVER_JS, JSON.stringify(args)], { stdin: true });
  const ready = (await nextOrKill(c, (o) => o.ready === true, 15_000)) as { rcvbuf: number };
  return {
    rcvbuf: ready.rcvbuf,
    async stop() {
      c.proc.stdin!.end();
      return (await nextOrKill(c, (o) => typeof o.received === 'number', 10_000)) as UdpReceiverStats;
    },
  };
}

/**
 * Sends `count` probe-payload datagrams of `size` bytes from inside `ns` to address:port, `burst` at a time,
 * paced to about `pps` datagrams per second. Resolves with what was sent.
 */
export async function runNetnsUdpSender(ns: TestNetns, o: { address: string; port: number; count: number; size: number; pps: number; burst?: number; timeoutMs?: number }): Promise<{ sent: number; errors: number; ms: number }> {
  const args = { address: o.address, port: o.port, count: o.count, size: o.size, pps: o.pps, burst: o.burst ?? 16 };
  const c = spawnJsonLines([...ns.wrap, process.execPath, '-e', SENDER_JS, JSON.stringify(args)]);
  return (await nextOrKill(c, (o) => typeof o.sent === 'number', o.timeoutMs ?? 60_000)) as { sent: number; errors: number; ms: number };
}

// ---- synthetic kernel images for boot-loader tests (a few bytes of our own code behind a real header) ----

export interface SyntheticSegment {
  /** Guest physical load address (p_paddr). */
  paddr: number;
  /** The segment's file bytes. */
  data: Uint8Array;
  /** Size in memory (default data.length; more = .bss). */
  memsz?: number;
  /** p_align (default 2 MiB, what the kernel build uses). */
  align?: number;
}

/**
 * A minimal ELF64 x86-64 executable shaped like vmlinux.bin (the kernel a bzImage decompresses to): one PT_LOAD
 * per segment (p_vaddr = 0xffffffff80000000 + paddr, RWX) at page-aligned file offsets from 0x1000, then an
 * empty PT_NOTE, which a loader must ignore.
 */
export function syntheticKernelElf(segs: readonly SyntheticSegment[], entry: number): Uint8Array {
  const phoff = 64;
  let off = 0x1000;
  const placed = segs.map((s) => {
    const o = off;
    off += Math.ceil(s.data.length / 0x1000 + 1) * 0x1000;
    return o;
  });
  const img = new Uint8Array(off);
  const dv = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0); // ELFCLASS64, little-endian, version 1
  dv.setUint16(16, 2, true); // ET_EXEC
  dv.setUint16(18, 62, true); // EM_X86_64
  dv.setUint32(20, 1, true);
  dv.setBigUint64(24, BigInt(entry), true);
  dv.setBigUint64(32, BigInt(phoff), true);
  dv.setUint16(52, 64, true); // e_ehsize
  dv.setUint16(54, 56, true); // e_phentsize
  dv.setUint16(56, segs.length + 1, true); // e_phnum
  segs.forEach((s, i) => {
    const p = phoff + i * 56;
    dv.setUint32(p, 1, true); // PT_LOAD
    dv.setUint32(p + 4, 7, true);
    dv.setBigUint64(p + 8, BigInt(placed[i]!), true);
    dv.setBigUint64(p + 16, 0xffffffff80000000n + BigInt(s.paddr), true);
    dv.setBigUint64(p + 24, BigInt(s.paddr), true);
    dv.setBigUint64(p + 32, BigInt(s.data.length), true);
    dv.setBigUint64(p + 40, BigInt(s.memsz ?? s.data.length), true);
    dv.setBigUint64(p + 48, BigInt(s.align ?? 0x200000), true);
    img.set(s.data, placed[i]!);
  });
  dv.setUint32(phoff + segs.length * 56, 4, true); // PT_NOTE, empty
  return img;
}

export interface SyntheticBzImageOptions {
  /** Code at startup_64 (protected-mode code + 0x200); the rest of the protected-mode code is hlt. At most 0x200 bytes with a payload. */
  startup64?: Uint8Array;
  /** A compressed kernel, placed after 0x400 bytes of protected-mode code (payload_offset 0x400, payload_length). */
  payload?: Uint8Array;
  /** Setup header loadflags (default 0x01, LOADED_HIGH). */
  loadflags?: number;
  /** relocatable_kernel (default false). */
  relocatable?: boolean;
  /** pref_address (default 0x1000000). */
  pref?: number;
  /** init_size (default 0x400000). */
  initSize?: number;
}

/** A bzImage with one setup sector, boot protocol 2.15 and XLF_KERNEL_64 (initrd_addr_max 2 GiB - 1, 2 MiB kernel_alignment). */
export function syntheticBzImage(o: SyntheticBzImageOptions = {}): Uint8Array {
  const code = o.startup64 ?? new Uint8Array(0);
  if (o.payload && code.length > 0x200) {
    throw new KvmkitError('KVMKIT_ERR_CONFIG', `startup64 (${code.length} bytes) must fit in 0x200 bytes before the payload`);
  }
  // Protected-mode code: startup_32 at +0, startup_64 at +0x200, the payload at +0x400.
  const pm = o.payload ? 0x400 + o.payload.length : code.length > 0 ? 0x200 + code.length : 0x400;
  const syssize = Math.ceil(pm / 16);
  const img = new Uint8Array(0x400 + syssize * 16);
  const dv = new DataView(img.buffer);
  img[0x1f1] = 1; // setup_sects
  dv.setUint32(0x1f4, syssize, true);
  dv.setUint16(0x1fe, 0xaa55, true); // boot_flag
  img[0x200] = 0xeb; // jump over the header (it ends at 0x268)
  img[0x201] = 0x66;
  dv.setUint32(0x202, 0x53726448, true); // "HdrS"
  dv.setUint16(0x206, 0x020f, true); // protocol 2.15
  img[0x211] = o.loadflags ?? 0x01;
  dv.setUint32(0x22c, 0x7fffffff, true); // initrd_addr_max
  dv.setUint32(0x230, 0x200000, true); // kernel_alignment
  img[0x234] = o.relocatable ? 1 : 0;
  dv.setUint16(0x236, 0x01, true); // xloadflags: XLF_KERNEL_64
  dv.setUint32(0x238, 2047, true); // cmdline_size
  if (o.payload) {
    dv.setUint32(0x248, 0x400, true); // payload_offset (from the protected-mode code)
    dv.setUint32(0x24c, o.payload.length, true);
  }
  dv.setBigUint64(0x258, BigInt(o.pref ?? 0x1000000), true);
  dv.setUint32(0x260, o.initSize ?? 0x400000, true);
  img.fill(0xf4, 0x400, o.payload || code.length === 0 ? 0x800 : 0x600); // hlt where there is no code of ours
  img.set(code, 0x600);
  if (o.payload) img.set(o.payload, 0x800);
  return img;
}

let xzSeq = 0;

/**
 * Compresses `data` with the xz CLI the way the kernel build does (BCJ x86 filter + LZMA2, CRC32 check) and
 * appends its size as 4 little-endian bytes (size_append). `dir` holds the temporary input file.
 */
export function xzKernelPayload(data: Uint8Array, dir: string, preset = 6): Uint8Array {
  const f = join(dir, `xz-in-${process.pid}-${xzSeq++}`);
  writeFileSync(f, data);
  try {
    const c = execFileSync('xz', ['-c', '-T1', '--x86', `--lzma2=preset=${preset}`, '--check=crc32', f], { maxBuffer: 1 << 30 });
    const size = Buffer.alloc(4);
    size.writeUInt32LE(data.length);
    return new Uint8Array(Buffer.concat([c, size]));
  } finally {
    rmSync(f, { force: true });
  }
}
