import { resolve as resolvePath } from 'node:path';
import { Machine, createLogger, type Logger, type Plugin, type StopReason } from '@kvmkit/kernel';
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
/** How the VM comes to life and whether it serves a control socket. */
export interface RunMode {
  /** Start from this snapshot state file instead of booting. */
  restore?: string;
  lazy?: boolean;
  /** Wait for a live migration on this address instead of booting. */
  incoming?: string;
  /** Control socket path; undefined = the per-VM default. */
  control?: string;
  noControl?: boolean;
}

async function optionalModule<T>(name: string): Promise<T | undefined> {
  try {
    return (await import(name)) as T;
  } catch {
    return undefined;
  }
}

type PluginModule = { default: (o?: unknown) => Plugin };

/**
 * The snapshot and pre-copy strategies are added to every VM that does not list them (they do nothing until a
 * `kvmkit snapshot`/`migrate` asks), so any running VM can be snapshotted or migrated.
 */
async function withStrategies(plugins: Plugin[]): Promise<Plugin[]> {
  const out = [...plugins];
  // The packages' `./plugin` entries: the plugin objects without the strategy code (loaded on first use).
  for (const [name, mod] of [['snapshot', '@kvmkit/plugin-snapshot/plugin'], ['migrate-precopy', '@kvmkit/plugin-migrate-precopy/plugin']] as const) {
    if (out.some((p) => p.name === name)) continue;
    const m = await optionalModule<PluginModule>(mod);
    if (m) out.push(m.default());
  }
  return out;
}

export async function runPlan(plan: Plan, opts: { logLevel?: CliLogLevel; log?: Logger; io: RunIo; mode?: RunMode }): Promise<RunResult> {
  const mode = opts.mode ?? {};
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
      const plugins = await withStrategies(await instantiatePlugins(plan.plugins, { baseDir: plan.baseDir, searchDirs: [CLI_DIR], ...(plan.configFile ? { configFile: plan.configFile } : {}) }));
      if (signalled !== undefined) {
        return { exitCode: SIGNAL_EXIT[signalled] ?? 1, reason: { reason: 'signal', exitCode: SIGNAL_EXIT[signalled] ?? 1, message: `${signalled} received` }, boots };
      }
      boots++;
      let m: Machine;
      const firstBoot = boots === 1;
      if (mode.incoming !== undefined && firstBoot) {
        const mig = await import('@kvmkit/plugin-migrate-precopy');
        log.info({ listen: mode.incoming }, 'waiting for an incoming migration');
        const r = await mig.receiveMigration({ listen: mode.incoming, config: plan.machineConfig, plugins, log, onListening: (a) => opts.io.stderr(`kvmkit: listening for a migration on ${typeof a === 'string' ? a : `${a.host}:${a.port}`}\n`) });
        m = r.machine;
        log.info({ report: r.report }, 'migration received');
      } else if (mode.restore !== undefined && firstBoot) {
        const snap = await import('@kvmkit/plugin-snapshot');
        let restored!: Machine;
        restored = new Machine({ config: plan.machineConfig, plugins: [snap.restorePlugin({ path: resolvePath(mode.restore), mode: mode.lazy ? 'lazy' : 'eager' }, () => restored), ...plugins], log });
        m = restored;
        machine = m;
        await m.start();
      } else {
        m = new Machine({ config: plan.machineConfig, plugins, log });
        machine = m;
        await m.start();
      }
      machine = m;
      started = true;
      let srv: { path: string; close(): Promise<void> } | undefined;
      if (!mode.noControl) {
        try {
          const ctl = await import('@kvmkit/control');
          srv = await ctl.serveControl(m, { ...(mode.control !== undefined ? { path: resolvePath(mode.control) } : {}), log });
          log.info({ control: srv.path }, 'control socket');
        } catch (e) {
          log.warn({ err: e }, 'no control socket (kvmkit snapshot/migrate/status cannot reach this VM)');
        }
      }
      log.info({ plugins: plugins.map((p) => p.name), boot: boots }, 'VM running');
      // A signal that came while start() was running: the stop() above ran before the machine existed fully.
      if (signalled !== undefined) void m.stop({ reason: 'signal', exitCode: SIGNAL_EXIT[signalled] ?? 1, message: `${signalled} received` });
      const reason = await m.waitForStop();
      await m.stop();
      await srv?.close().catch(() => undefined);
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
