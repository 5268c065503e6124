import { Machine, createLogger, type Logger, type StopReason } from '@kvmkit/kernel';
import { instantiatePlugins } from '@kvmkit/config';
import type { CliLogLevel } from './args.js';
import { CLI_DIR, type Plan } from './plan.js';

export interface RunResult {
  exitCode: number;
  reason: StopReason;
  /** Number of machine instances started (1 + guest reboots). */
  boots: number;
}

export interface RunIo {
  stderr: (s: string) => void;
  /** Installs signal handlers; returns a function that removes them. */
  onSignal?: (handler: (sig: NodeJS.Signals) => void) => () => void;
}

const SIGNAL_EXIT: Partial<Record<NodeJS.Signals, number>> = { SIGINT: 130, SIGTERM: 143 };

function processSignals(handler: (sig: NodeJS.Signals) => void): () => void {
  const on = (s: NodeJS.Signals) => () => handler(s);
  const hi = on('SIGINT');
  const ht = on('SIGTERM');
  process.on('SIGINT', hi);
  process.on('SIGTERM', ht);
  return () => {
    process.off('SIGINT', hi);
    process.off('SIGTERM', ht);
  };
}

/**
 * Runs the planned VM until it stops: instantiates the plugins, `new Machine`, start, waitForStop, stop. A guest
 * reset with onReset 'reboot' starts a fresh machine (fresh plugin instances). SIGINT/SIGTERM stop the VM cleanly
 * (exit 130/143); a second signal exits at once. Errors from plugin resolution or start() propagate (coded).
 */
export async function runPlan(plan: Plan, opts: { logLevel?: CliLogLevel; log?: Logger; io: RunIo }): Promise<RunResult> {
  const log = opts.log ?? createLogger(opts.logLevel !== undefined ? { level: opts.logLevel } : {});
  let machine: Machine | undefined;
  /** True once start() returned: stopping a machine in the middle of start() is left to the check after it. */
  let started = false;
  let signalled: NodeJS.Signals | undefined;
  const off = (opts.io.onSignal ?? processSignals)((sig) => {
    if (signalled !== undefined) {
      opts.io.stderr(`kvmkit: second ${sig}, exiting without cleanup\n`);
      process.exit(SIGNAL_EXIT[sig] ?? 1);
    }
    signalled = sig;
    log.info({ signal: sig }, 'stopping the VM');
    if (started) void machine?.stop({ reason: 'signal', exitCode: SIGNAL_EXIT[sig] ?? 1, message: `${sig} received` }).catch((e) => log.error({ err: e }, 'stop failed'));
  });
  let boots = 0;
  try {
    for (;;) {
      const plugins = await instantiatePlugins(plan.plugins, { baseDir: plan.baseDir, searchDirs: [CLI_DIR], ...(plan.configFile ? { configFile: plan.configFile } : {}) });
      const m = new Machine({ config: plan.machineConfig, plugins, log });
      machine = m;
      started = false;
      if (signalled !== undefined) {
        return { exitCode: SIGNAL_EXIT[signalled] ?? 1, reason: { reason: 'signal', exitCode: SIGNAL_EXIT[signalled] ?? 1, message: `${signalled} received` }, boots };
      }
      boots++;
      await m.start();
      started = true;
      log.info({ plugins: plugins.map((p) => p.name), boot: boots }, 'VM running');
      // A signal that came while start() was running: the stop() above ran before the machine existed fully.
      if (signalled !== undefined) void m.stop({ reason: 'signal', exitCode: SIGNAL_EXIT[signalled] ?? 1, message: `${signalled} received` });
      const reason = await m.waitForStop();
      await m.stop();
      if (m.rebootRequested && signalled === undefined) {
        log.info({ boots }, 'guest reset: rebooting with a fresh machine');
        continue;
      }
      const exitCode = signalled !== undefined ? (SIGNAL_EXIT[signalled] ?? 1) : exitCodeOf(reason);
      return { exitCode, reason, boots };
    }
  } finally {
    off();
  }
}

/** 0..255: the guest's exit code; 1 for error/triple-fault reasons that carry 0. */
export function exitCodeOf(r: StopReason): number {
  const failed = r.reason === 'error' || r.reason === 'triple-fault';
  const c = Number.isInteger(r.exitCode) ? r.exitCode & 0xff : 1;
  return failed && c === 0 ? 1 : c;
}
