import { existsSync, readdirSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';

export const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[kvmkit e2e] /dev/kvm not present: KVM tests are skipped');

/** A minimal debug-exit device (port 0xf4) for tests that run without platform-pc. */
export { debugExitPlugin as exitPort } from '@kvmkit/testkit';

export function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

export interface JsonChild {
  proc: ChildProcess;
  /** Every JSON line printed so far (a line that is not JSON is kept as { text }). */
  lines: any[];
  /** The first line matching `pred` (or carrying `error`); throws when the child exited or `ms` passed without one. */
  next(pred: (o: any) => boolean, ms?: number): Promise<any>;
  /** The child's end: its last line, exit code, signal and stderr. */
  done: Promise<{ last: any; exitCode: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  stderr(): string;
}

/**
 * Runs a fixture script (`node script '<json args>'`) that reports on stdout one JSON object per line — the way
 * the snapshot, migration and device children talk to their tests.
 */
/** `opts.wrap` runs the child under a command, e.g. `['ip', 'netns', 'exec', ns]`. */
export function spawnJsonChild(script: string, args: unknown, opts: { stdin?: boolean; inheritStderr?: boolean; wrap?: string[]; onLine?: (o: any, kill: () => void) => void } = {}): JsonChild {
  const argv = [...(opts.wrap ?? []), process.execPath, script, JSON.stringify(args)];
  const p = spawn(argv[0]!, argv.slice(1), { stdio: [opts.stdin ? 'pipe' : 'ignore', 'pipe', opts.inheritStderr ? 'inherit' : 'pipe'] });
  const lines: any[] = [];
  const waiters: Array<() => void> = [];
  let buf = '';
  let err = '';
  p.stdout!.on('data', (d) => {
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
      waiters.splice(0).forEach((w) => w());
    }
  });
  p.stderr?.on('data', (d) => (err += d));
  const done = new Promise<{ last: any; exitCode: number | null; signal: NodeJS.Signals | null; stderr: string }>((res, rej) => {
    p.on('error', rej);
    p.on('close', (exitCode, signal) => {
      res({ last: lines.at(-1), exitCode, signal, stderr: err });
      waiters.splice(0).forEach((w) => w());
    });
  });
  const next = async (pred: (o: any) => boolean, ms = 20_000): Promise<any> => {
    const t0 = Date.now();
    for (;;) {
      const hit = lines.find((o) => pred(o) || o.error);
      if (hit) return hit;
      if (p.exitCode !== null || p.signalCode !== null || Date.now() - t0 > ms) {
        throw new Error(`${script}: no matching line (exit ${p.exitCode ?? p.signalCode}); lines ${JSON.stringify(lines)} stderr ${err}`);
      }
      await new Promise<void>((r) => { waiters.push(r); setTimeout(r, 100); });
    }
  };
  return { proc: p, lines, next, done, stderr: () => err };
}
