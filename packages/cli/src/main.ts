import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { isKvmkitError } from '@kvmkit/kernel';
import { parseCli, USAGE, type CliArgs } from './args.js';
import { CONFIG_HELP, CONTROL_HELP, DOCTOR_HELP, MAIN_HELP, RUN_HELP } from './help.js';
import { jsonReplacer, planConfig, planRun, planToJson } from './plan.js';
import { runPlan, type RunIo } from './run.js';

export interface CliIo {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  cwd: string;
  onSignal?: RunIo['onSignal'];
}

/** Codes that mean "the command line or the config is wrong" (exit 2); anything else at run time is 1. */
export const USAGE_CODES: ReadonlySet<string> = new Set([
  USAGE,
  'KVMKIT_ERR_CONFIG',
  'KVMKIT_ERR_CONFIG_NOT_FOUND',
  'KVMKIT_ERR_CONFIG_HOST',
  'KVMKIT_ERR_PLUGIN_NOT_FOUND',
  'KVMKIT_ERR_PLUGIN_INVALID',
  'KVMKIT_ERR_PLUGIN_OPTIONS',
  'KVMKIT_ERR_PLUGIN_DUPLICATE',
  'KVMKIT_ERR_PLUGIN_VERSION',
  'KVMKIT_ERR_PLUGIN_DEPENDENCY',
  'KVMKIT_ERR_PLUGIN_CONFLICT',
]);

export function exitCodeForError(e: unknown): number {
  return isKvmkitError(e) && USAGE_CODES.has(e.code) ? 2 : 1;
}

/** `error KVMKIT_ERR_…: message` (uncoded errors are reported as KVMKIT_ERR_INTERNAL with their stack). */
export function formatError(e: unknown): string {
  if (isKvmkitError(e)) return `error ${e.code}: ${e.message}\n`;
  const err = e instanceof Error ? e : new Error(String(e));
  return `error KVMKIT_ERR_INTERNAL: ${err.message}\n${process.env.KVMKIT_DEBUG ? `${err.stack}\n` : ''}`;
}

export function version(): string {
  try {
    return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

const HELP: Record<string, string> = { run: RUN_HELP, restore: RUN_HELP, config: CONFIG_HELP, doctor: DOCTOR_HELP, snapshot: CONTROL_HELP, migrate: CONTROL_HELP, status: CONTROL_HELP, pause: CONTROL_HELP, resume: CONTROL_HELP, stop: CONTROL_HELP };

/** Runs one kvmkit command; resolves with the process exit code. Never throws. */
export async function main(argv: string[], io: CliIo = defaultIo()): Promise<number> {
  let args: CliArgs;
  try {
    args = parseCli(argv);
  } catch (e) {
    io.stderr(formatError(e));
    return exitCodeForError(e);
  }
  try {
    switch (args.command) {
      case 'help': {
        if (args.topic !== undefined && !(args.topic in HELP)) {
          io.stderr(`error ${USAGE}: no help for ${JSON.stringify(args.topic)}; commands: ${Object.keys(HELP).join(', ')}\n`);
          return 2;
        }
        io.stdout(args.topic !== undefined ? HELP[args.topic]! : MAIN_HELP);
        return 0;
      }
      case 'version':
        io.stdout(`kvmkit ${version()}\n`);
        return 0;
      case 'config': {
        if (args.help) {
          io.stdout(CONFIG_HELP);
          return 0;
        }
        const plan = await planConfig(args, io.cwd);
        io.stdout(`${JSON.stringify(planToJson(plan), jsonReplacer, 2)}\n`);
        return 0;
      }
      case 'doctor': {
        if (args.help) {
          io.stdout(DOCTOR_HELP);
          return 0;
        }
        // Loaded per command (start-up of `run`): doctor.js, control.js and @kvmkit/control.
        const { formatDoctor, runDoctor } = await import('./doctor.js');
        const r = await runDoctor({ cwd: io.cwd });
        io.stdout(args.json ? `${JSON.stringify(r, jsonReplacer, 2)}\n` : formatDoctor(r));
        return r.usable ? 0 : 1;
      }
      case 'snapshot':
      case 'migrate':
      case 'status':
      case 'pause':
      case 'resume':
      case 'stop': {
        if (args.help) {
          io.stdout(CONTROL_HELP);
          return 0;
        }
        const { runControl } = await import('./control.js');
        const result = await runControl(args, io.cwd);
        io.stdout(`${JSON.stringify(result, jsonReplacer, args.json ? 2 : undefined)}\n`);
        return 0;
      }
      case 'run': {
        if (args.help) {
          io.stdout(RUN_HELP);
          return 0;
        }
        const plan = await planRun(args, io.cwd);
        if (args.dryRun) {
          io.stdout(`${JSON.stringify(planToJson(plan), jsonReplacer, 2)}\n`);
          return 0;
        }
        const mode = {
          ...(args.restore !== undefined ? { restore: resolve(io.cwd, args.restore), lazy: args.lazy } : {}),
          ...(args.incoming !== undefined ? { incoming: /^[^/]*:\d+$/.test(args.incoming) ? args.incoming : resolve(io.cwd, args.incoming) } : {}),
          ...(args.control !== undefined ? { control: resolve(io.cwd, args.control) } : {}),
          noControl: args.noControl,
        };
        const res = await runPlan(plan, { ...(args.logLevel !== undefined ? { logLevel: args.logLevel } : {}), io: { stderr: io.stderr, ...(io.onSignal ? { onSignal: io.onSignal } : {}) }, mode });
        const r = res.reason;
        if (r.reason === 'error' || r.reason === 'triple-fault') {
          // A stop reason without an error object (e.g. a guest crash system event) gets the CLI's own code.
          io.stderr(`error ${r.error?.code ?? (r.reason === 'triple-fault' ? 'KVMKIT_ERR_GUEST_SHUTDOWN' : 'KVMKIT_ERR_CLI_VM_ERROR')}: ${r.message ?? r.error?.message ?? r.reason}\n`);
        } else if (r.reason === 'signal') {
          io.stderr(`kvmkit: ${r.message ?? 'signal'}; VM stopped\n`);
        }
        return res.exitCode;
      }
    }
  } catch (e) {
    io.stderr(formatError(e));
    return exitCodeForError(e);
  }
}

function defaultIo(): CliIo {
  return {
    stdout: (s) => void process.stdout.write(s),
    stderr: (s) => void process.stderr.write(s),
    cwd: process.cwd(),
  };
}
