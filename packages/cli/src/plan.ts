import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { MachineConfig } from '@kvmkit/kernel';
import {
  DEFAULT_CPUS, DEFAULT_MEMORY_MIB, loadConfig, mergePlugins, resolvePluginModule, resolveVm, toSpec,
  type HostChoice, type LoadedConfig, type RemovedPlugin, type ResolvedPluginSpec, type ResolvedVm,
} from '@kvmkit/config';
import { usageError, type ConfigArgs, type RunArgs } from './args.js';

/** The CLI's own directory: plugins are also resolved from here (its dependencies). */
export const CLI_DIR = path.dirname(fileURLToPath(import.meta.url));

/** Plugins added in flag-only mode unless --no-defaults. */
export const DEFAULT_FLAG_PLUGINS = ['serial', 'platform-pc'] as const;

/** Everything needed to start a VM, and what `config --print` / `run --dry-run` show. */
export interface Plan {
  mode: 'config' | 'flags';
  /** The config file, when one was read. */
  configFile?: string;
  /** Where package names are resolved from first (the config file's directory, or cwd in flag-only mode). */
  baseDir: string;
  vm: string;
  host: HostChoice;
  machineConfig: MachineConfig;
  plugins: ResolvedPluginSpec[];
  removed: RemovedPlugin[];
  /** Where memory/cpus/cmdline/onReset came from: a config key path, a flag, or 'default'. */
  settings: Record<string, string>;
}

/** Whether `run` works from flags alone (see RUN_HELP). */
export function isFlagOnly(a: RunArgs): boolean {
  return a.vm === undefined && a.config === undefined && a.host === undefined && (a.kernel !== undefined || a.plugins.length > 0);
}

function flagSpecs(a: RunArgs, cwd: string): ResolvedPluginSpec[] {
  const out: ResolvedPluginSpec[] = [];
  if (a.kernel !== undefined || a.initrd !== undefined) {
    const options: Record<string, unknown> = {};
    if (a.kernel !== undefined) options.kernel = path.resolve(cwd, a.kernel);
    if (a.initrd !== undefined) options.initrd = path.resolve(cwd, a.initrd);
    const from = [a.kernel !== undefined ? '--kernel' : '', a.initrd !== undefined ? '--initrd' : ''].filter(Boolean).join(' ');
    out.push({ ...toSpec({ name: 'boot-linux', options }, cwd, from) });
  }
  // --plugin options: paths are relative to the current directory.
  const fromFlags = a.plugins.map((p) => toSpec({ name: p.name, options: p.options }, cwd, `--plugin ${p.raw}`));
  return mergePlugins(out, fromFlags);
}

/** Builds the plan for `kvmkit run`: config mode or flag-only mode. Throws coded errors (usage/config). */
export async function planRun(a: RunArgs, cwd = process.cwd()): Promise<Plan> {
  if (a.initrd !== undefined && a.kernel === undefined && isFlagOnly(a)) {
    throw usageError('run: --initrd needs --kernel', { flag: '--initrd' });
  }
  const extra = flagSpecs(a, cwd);
  if (isFlagOnly(a)) {
    const defaults = a.noDefaults ? [] : DEFAULT_FLAG_PLUGINS.map((n) => toSpec(n, cwd, 'default (flag-only mode)'));
    const plugins = mergePlugins(defaults, extra);
    const machineConfig: MachineConfig = {
      name: 'vm',
      memory: a.memory ?? DEFAULT_MEMORY_MIB,
      cpus: a.cpus ?? DEFAULT_CPUS,
      ...(a.cmdline !== undefined ? { cmdline: a.cmdline } : {}),
      plugins: plugins.map((p) => ({ name: p.name, options: p.options })),
    };
    return {
      mode: 'flags',
      baseDir: cwd,
      vm: 'vm',
      host: { name: undefined, by: 'none', reason: 'flag-only mode: no config file read' },
      machineConfig,
      plugins,
      removed: [],
      settings: {
        memory: a.memory !== undefined ? '--memory' : 'default',
        cpus: a.cpus !== undefined ? '--cpus' : 'default',
        ...(a.cmdline !== undefined ? { cmdline: '--cmdline' } : {}),
      },
    };
  }
  const loaded = await loadConfig({ cwd, ...(a.config !== undefined ? { file: a.config } : {}) });
  const r = resolveVm(loaded, { vm: a.vm, host: a.host });
  if (a.initrd !== undefined && a.kernel === undefined && !r.plugins.some((p) => p.key === '@kvmkit/plugin-boot-linux')) {
    throw usageError(`run: --initrd needs --kernel, or a boot-linux plugin for VM ${r.machineConfig.name} in ${loaded.file}`, { flag: '--initrd' });
  }
  const plugins = mergePlugins(r.plugins, extra);
  const settings = { ...r.sources.settings };
  const machineConfig: MachineConfig = { ...r.machineConfig };
  if (a.memory !== undefined) {
    machineConfig.memory = a.memory;
    settings.memory = '--memory';
  }
  if (a.cpus !== undefined) {
    machineConfig.cpus = a.cpus;
    settings.cpus = '--cpus';
  }
  if (a.cmdline !== undefined) {
    machineConfig.cmdline = a.cmdline;
    settings.cmdline = '--cmdline';
  }
  machineConfig.plugins = plugins.map((p) => ({ name: p.name, options: p.options }));
  return configPlan(loaded, r, machineConfig, plugins, settings);
}

/** A config-mode plan from a loaded config and the VM it resolved to (with the run's overrides applied). */
function configPlan(loaded: LoadedConfig, r: ResolvedVm, machineConfig: MachineConfig, plugins: Plan['plugins'], settings: Plan['settings']): Plan {
  return {
    mode: 'config',
    configFile: loaded.file,
    baseDir: loaded.dir,
    vm: r.machineConfig.name,
    host: r.sources.host,
    machineConfig,
    plugins,
    removed: r.sources.removed,
    settings,
  };
}

/** The plan for `kvmkit config --print`. */
export async function planConfig(a: ConfigArgs, cwd = process.cwd()): Promise<Plan> {
  const loaded = await loadConfig({ cwd, ...(a.config !== undefined ? { file: a.config } : {}) });
  const r = resolveVm(loaded, { vm: a.vm, host: a.host, ...(a.hostname !== undefined ? { hostname: a.hostname } : {}) });
  return configPlan(loaded, r, r.machineConfig, r.plugins, r.sources.settings);
}

/** JSON shown by `config --print` and `run --dry-run`. Functions/buffers in options are described, not dumped. */
export function planToJson(p: Plan): Record<string, unknown> {
  const { plugins: _p, ...vm } = p.machineConfig;
  return {
    config: p.configFile ?? null,
    mode: p.mode,
    vm,
    host: { name: p.host.name ?? null, chosenBy: p.host.by, reason: p.host.reason },
    plugins: p.plugins.map((s) => ({ name: s.name, key: s.key, options: s.options, from: s.from, ...moduleOf(p, s) })),
    removed: p.removed,
    settings: p.settings,
  };
}

/** Where a plugin name resolves (without importing it): `{ module }`, or `{ module: null, error }`. */
function moduleOf(p: Plan, s: ResolvedPluginSpec): { module: string | null; error?: string } {
  try {
    return { module: resolvePluginModule(s, { baseDir: p.baseDir, searchDirs: [CLI_DIR] }).file };
  } catch (e) {
    return { module: null, error: `${(e as { code?: string }).code ?? 'error'}: ${(e as Error).message}` };
  }
}

export function jsonReplacer(_k: string, v: unknown): unknown {
  if (typeof v === 'function') return `[function ${(v as { name?: string }).name || 'anonymous'}]`;
  if (typeof v === 'bigint') return `${v}n`;
  if (v instanceof Uint8Array) return `[${v.constructor.name} ${v.byteLength} bytes]`;
  return v;
}
