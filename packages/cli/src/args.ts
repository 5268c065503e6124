import { parseArgs } from 'node:util';
import { KvmkitError, MAX_MEMORY_MIB, MAX_VCPUS } from '@kvmkit/kernel';

/** Usage errors (exit code 2). */
export const USAGE = 'KVMKIT_ERR_CLI_USAGE';

export function usageError(message: string, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError(USAGE, message, { details });
}

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type CliLogLevel = (typeof LOG_LEVELS)[number];

/** A `--plugin NAME[:JSON]` flag. */
export interface PluginFlag {
  name: string;
  options: Record<string, unknown>;
  /** The flag as given, for messages and `from`. */
  raw: string;
}

export interface RunArgs {
  command: 'run';
  help: boolean;
  vm?: string;
  config?: string;
  host?: string;
  memory?: number;
  cpus?: number;
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  plugins: PluginFlag[];
  noDefaults: boolean;
  logLevel?: CliLogLevel;
  dryRun: boolean;
  /** Control socket path (default: per VM name); `--no-control` turns the control channel off. */
  control?: string;
  noControl: boolean;
  /** `kvmkit restore SNAPSHOT` / `run --restore SNAPSHOT`: start from a snapshot instead of booting. */
  restore?: string;
  lazy: boolean;
  /** `run --incoming ADDR`: wait for a live migration on ADDR (unix socket path or host:port) instead of booting. */
  incoming?: string;
}

/** `kvmkit snapshot|migrate|status|pause|resume|stop TARGET …`: talks to a running VM over its control socket. */
export interface ControlArgs {
  command: 'snapshot' | 'migrate' | 'status' | 'pause' | 'resume' | 'stop';
  help: boolean;
  /** A VM name (socket at the default path) or a socket path (contains '/'). */
  target: string;
  /** snapshot: the state file to write; migrate: the destination address. */
  path?: string;
  diff: boolean;
  then?: 'resume' | 'pause' | 'stop';
  downtimeMs?: number;
  maxRounds?: number;
  json: boolean;
}

export interface ConfigArgs {
  command: 'config';
  help: boolean;
  print: boolean;
  vm?: string;
  host?: string;
  hostname?: string;
  config?: string;
}

export interface DoctorArgs {
  command: 'doctor';
  help: boolean;
  json: boolean;
}

export interface TopArgs {
  command: 'help' | 'version';
  /** For `kvmkit help <command>`. */
  topic?: string;
}

export type CliArgs = RunArgs | ConfigArgs | DoctorArgs | ControlArgs | TopArgs;

type Spec = NonNullable<Parameters<typeof parseArgs>[0]>['options'];

type Values = Record<string, string | boolean | string[] | undefined>;

function parse(command: string, args: string[], options: Spec, allowPositionals: boolean): { values: Values; positionals: string[] } {
  try {
    const r = parseArgs({ args, options, allowPositionals, strict: true });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (e) {
    const msg = (e as Error).message.replace(/\. To specify a positional argument starting with a '-'.*$/s, '');
    throw usageError(`${command}: ${msg} (see kvmkit ${command} --help)`);
  }
}

function int(command: string, flag: string, v: string | undefined, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) {
    throw usageError(`${command}: ${flag} must be an integer in ${min}..${max} (got ${JSON.stringify(v)})`, { flag });
  }
  return Number(v);
}

/** Parses `NAME[:JSON]`: the name is everything before the first ':'; the rest must be a JSON object. */
export function parsePluginFlag(raw: string): PluginFlag {
  const i = raw.indexOf(':');
  const name = i < 0 ? raw : raw.slice(0, i);
  if (name === '' || /\s/.test(name)) throw usageError(`--plugin ${JSON.stringify(raw)}: expected NAME or NAME:{json options}`, { flag: '--plugin', value: raw });
  if (i < 0) return { name, options: {}, raw };
  const json = raw.slice(i + 1);
  let options: unknown;
  try {
    options = JSON.parse(json);
  } catch (e) {
    throw usageError(`--plugin ${name}: options are not valid JSON (${(e as Error).message}): ${json}`, { flag: '--plugin', value: raw });
  }
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw usageError(`--plugin ${name}: options must be a JSON object like {"key":"value"} (got ${json})`, { flag: '--plugin', value: raw });
  }
  return { name, options: options as Record<string, unknown>, raw };
}

export function parseRunArgs(args: string[]): RunArgs {
  const { values: v, positionals } = parse('run', args, {
    help: { type: 'boolean', short: 'h' },
    vm: { type: 'string' },
    config: { type: 'string', short: 'c' },
    host: { type: 'string' },
    memory: { type: 'string', short: 'm' },
    cpus: { type: 'string' },
    kernel: { type: 'string' },
    initrd: { type: 'string' },
    cmdline: { type: 'string' },
    plugin: { type: 'string', short: 'p', multiple: true },
    'no-defaults': { type: 'boolean' },
    'log-level': { type: 'string' },
    'dry-run': { type: 'boolean' },
    control: { type: 'string' },
    'no-control': { type: 'boolean' },
    restore: { type: 'string' },
    lazy: { type: 'boolean' },
    incoming: { type: 'string' },
  }, true);
  if (positionals.length > 1) throw usageError(`run: one VM name at most (got ${positionals.join(' ')})`);
  if (v.restore !== undefined && v.incoming !== undefined) throw usageError('run: --restore and --incoming exclude each other', { flag: '--incoming' });
  if (v.lazy && v.restore === undefined) throw usageError('run: --lazy goes with --restore (or kvmkit restore)', { flag: '--lazy' });
  for (const f of ['restore', 'incoming', 'control'] as const) {
    if (v[f] === '') throw usageError(`run: --${f} needs a value`, { flag: `--${f}` });
  }
  const vmFlag = v.vm as string | undefined;
  if (vmFlag !== undefined && positionals[0] !== undefined && vmFlag !== positionals[0]) {
    throw usageError(`run: two different VM names (${positionals[0]} and --vm ${vmFlag})`, { flag: '--vm' });
  }
  if (vmFlag === '') throw usageError('run: --vm needs a value', { flag: '--vm' });
  const logLevel = v['log-level'] as string | undefined;
  if (logLevel !== undefined && !(LOG_LEVELS as readonly string[]).includes(logLevel)) {
    throw usageError(`run: --log-level must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(logLevel)})`, { flag: '--log-level' });
  }
  for (const f of ['config', 'host', 'kernel', 'initrd'] as const) {
    if (v[f] === '') throw usageError(`run: --${f} needs a value`, { flag: `--${f}` });
  }
  return {
    command: 'run',
    help: Boolean(v.help),
    vm: positionals[0] ?? vmFlag,
    config: v.config as string | undefined,
    host: v.host as string | undefined,
    memory: int('run', '--memory', v.memory as string | undefined, 1, MAX_MEMORY_MIB),
    cpus: int('run', '--cpus', v.cpus as string | undefined, 1, MAX_VCPUS),
    kernel: v.kernel as string | undefined,
    initrd: v.initrd as string | undefined,
    cmdline: v.cmdline as string | undefined,
    plugins: ((v.plugin as string[] | undefined) ?? []).map(parsePluginFlag),
    noDefaults: Boolean(v['no-defaults']),
    logLevel: logLevel as CliLogLevel | undefined,
    dryRun: Boolean(v['dry-run']),
    control: v.control as string | undefined,
    noControl: Boolean(v['no-control']),
    restore: v.restore as string | undefined,
    lazy: Boolean(v.lazy),
    incoming: v.incoming as string | undefined,
  };
}

/** `kvmkit restore SNAPSHOT [run options]` is `kvmkit run --restore SNAPSHOT [run options]`. */
export function parseRestoreArgs(args: string[]): RunArgs {
  const i = args.findIndex((a) => !a.startsWith('-'));
  if (args.includes('-h') || args.includes('--help')) return { ...parseRunArgs(['--help']), help: true };
  if (i < 0) throw usageError('restore: which snapshot? kvmkit restore SNAPSHOT [--lazy] [run options] (see kvmkit restore --help)');
  const snap = args[i]!;
  return parseRunArgs(['--restore', snap, ...args.slice(0, i), ...args.slice(i + 1)]);
}

export function parseControlArgs(command: ControlArgs['command'], args: string[]): ControlArgs {
  const { values: v, positionals } = parse(command, args, {
    help: { type: 'boolean', short: 'h' },
    diff: { type: 'boolean' },
    then: { type: 'string' },
    'downtime-ms': { type: 'string' },
    'max-rounds': { type: 'string' },
    json: { type: 'boolean' },
  }, true);
  const needs = command === 'snapshot' || command === 'migrate' ? 2 : 1;
  if (v.help) return { command, help: true, target: '', diff: false, json: false };
  const what = command === 'snapshot' ? 'VM PATH' : command === 'migrate' ? 'VM DESTINATION' : 'VM';
  if (positionals.length !== needs) throw usageError(`${command}: expected ${what} (got ${positionals.length ? positionals.join(' ') : 'nothing'}; see kvmkit ${command} --help)`);
  const then = v.then as string | undefined;
  if (then !== undefined && (command !== 'snapshot' || !['resume', 'pause', 'stop'].includes(then))) {
    throw usageError(`${command}: --then must be resume, pause or stop and goes with snapshot`, { flag: '--then' });
  }
  if (v.diff && command !== 'snapshot') throw usageError(`${command}: --diff goes with snapshot`, { flag: '--diff' });
  if ((v['downtime-ms'] !== undefined || v['max-rounds'] !== undefined) && command !== 'migrate') throw usageError(`${command}: --downtime-ms/--max-rounds go with migrate`);
  return {
    command,
    help: false,
    target: positionals[0]!,
    ...(positionals[1] !== undefined ? { path: positionals[1] } : {}),
    diff: Boolean(v.diff),
    ...(then !== undefined ? { then: then as ControlArgs['then'] } : {}),
    ...(v['downtime-ms'] !== undefined ? { downtimeMs: int(command, '--downtime-ms', v['downtime-ms'] as string, 0, 600_000) } : {}),
    ...(v['max-rounds'] !== undefined ? { maxRounds: int(command, '--max-rounds', v['max-rounds'] as string, 1, 1000) } : {}),
    json: Boolean(v.json),
  };
}

export function parseConfigArgs(args: string[]): ConfigArgs {
  const { values: v, positionals } = parse('config', args, {
    help: { type: 'boolean', short: 'h' },
    print: { type: 'boolean' },
    vm: { type: 'string' },
    host: { type: 'string' },
    hostname: { type: 'string' },
    config: { type: 'string', short: 'c' },
  }, true);
  if (positionals.length > 0) throw usageError(`config: unexpected argument ${JSON.stringify(positionals[0])} (use --vm NAME; see kvmkit config --help)`);
  if (!v.help && !v.print) throw usageError('config: nothing to do; use kvmkit config --print (see kvmkit config --help)');
  return {
    command: 'config',
    help: Boolean(v.help),
    print: Boolean(v.print),
    vm: v.vm as string | undefined,
    host: v.host as string | undefined,
    hostname: v.hostname as string | undefined,
    config: v.config as string | undefined,
  };
}

export function parseDoctorArgs(args: string[]): DoctorArgs {
  const { values: v, positionals } = parse('doctor', args, { help: { type: 'boolean', short: 'h' }, json: { type: 'boolean' } }, true);
  if (positionals.length > 0) throw usageError(`doctor: unexpected argument ${JSON.stringify(positionals[0])}`);
  return { command: 'doctor', help: Boolean(v.help), json: Boolean(v.json) };
}

export const COMMANDS = ['run', 'config', 'doctor', 'restore', 'snapshot', 'migrate', 'status', 'pause', 'resume', 'stop'] as const;

/** Parses the whole command line (without node and script). */
export function parseCli(argv: string[]): CliArgs {
  const [first, ...rest] = argv;
  if (first === undefined || first === '-h' || first === '--help') return { command: 'help' };
  if (first === 'help') return { command: 'help', topic: rest[0] };
  if (first === '-V' || first === '--version' || first === 'version') return { command: 'version' };
  switch (first) {
    case 'run':
      return parseRunArgs(rest);
    case 'config':
      return parseConfigArgs(rest);
    case 'doctor':
      return parseDoctorArgs(rest);
    case 'restore':
      return parseRestoreArgs(rest);
    case 'snapshot':
    case 'migrate':
    case 'status':
    case 'pause':
    case 'resume':
    case 'stop':
      return parseControlArgs(first, rest);
    default:
      throw usageError(first.startsWith('-') ? `unknown option ${first} (see kvmkit --help)` : `unknown command ${JSON.stringify(first)}; commands: ${COMMANDS.join(', ')} (see kvmkit --help)`);
  }
}
