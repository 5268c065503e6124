import { execFileSync, spawn } from 'node:child_process';
import { accessSync, constants, existsSync } from 'node:fs';
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

function run(cmd: string, args: string[], timeoutMs: number): Promise<Spawned> {
  return new Promise((resolvePromise, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
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
  const r = await run(qemu, args, timeoutMs);
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
