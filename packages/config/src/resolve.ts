import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KvmkitError, type MachineConfig, type PluginSpec } from '@kvmkit/kernel';
import type { LoadedConfig } from './load.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB, isPlainObject, keyPath, type HostDefinition, type PluginRef } from './schema.js';
import { isLocalPluginName, pluginKey } from './names.js';

/** A plugin after resolution: name (local paths made absolute), merged options, identity key, where it came from. */
export interface ResolvedPluginSpec extends PluginSpec {
  name: string;
  options: Record<string, unknown>;
  /** Identity used for merging/removal (see pluginKey). */
  key: string;
  /** Key paths (or flags) that contributed, in order: e.g. ['vms.web.plugins[1]', 'hosts.laptop.plugins[0]']. */
  from: string[];
}

/** Which host section was chosen and why. */
export interface HostChoice {
  name: string | undefined;
  by: 'flag' | 'match' | 'default' | 'none';
  reason: string;
}

export interface RemovedPlugin {
  name: string;
  key: string;
  by: string;
  /** false when the VM did not have that plugin (nothing was removed). */
  present: boolean;
}

export interface ResolveSources {
  file: string;
  /** Directory relative names and paths were resolved against. */
  dir: string;
  vm: string;
  host: HostChoice;
  /** Where memory/cpus/cmdline/onReset came from: a key path or 'default'. */
  settings: Record<string, string>;
  removed: RemovedPlugin[];
}

export interface ResolvedVm {
  machineConfig: MachineConfig;
  host: string | undefined;
  plugins: ResolvedPluginSpec[];
  sources: ResolveSources;
}

export interface ResolveOptions {
  /** VM name; may be omitted when the file defines exactly one VM. */
  vm?: string;
  /** Host section name (`--host`); must exist. */
  host?: string;
  /** Hostname to match against (default os.hostname()). */
  hostname?: string;
  /** Whether a kernel module is loaded (default: /sys/module/<name> exists). */
  moduleLoaded?: (name: string) => boolean;
}

// ---------------------------------------------------------------------------------------------------------------
// Paths in plugin options

/** Option keys whose string values are file paths. Keys ending in `Path`, `File` or `Dir` count too. */
export const PATH_KEYS: readonly string[] = ['kernel', 'initrd', 'file', 'path', 'image', 'firmware', 'disk', 'dir', 'socket'];

function isPathKey(key: string | undefined): boolean {
  if (key === undefined) return false;
  return PATH_KEYS.includes(key) || /[a-z0-9](Path|File|Dir)$/.test(key);
}

const SCHEME_RE = /^[A-Za-z][A-Za-z0-9+.-]*:/;

function rebaseValue(v: unknown, key: string | undefined, baseDir: string): unknown {
  if (typeof v === 'string') {
    if (v.startsWith('./') || v.startsWith('../')) return path.resolve(baseDir, v);
    if (isPathKey(key) && v !== '' && !path.isAbsolute(v) && !SCHEME_RE.test(v) && v !== '-' && !v.startsWith('~')) return path.resolve(baseDir, v);
    return v;
  }
  if (Array.isArray(v)) return v.map((x) => rebaseValue(x, key, baseDir));
  if (isPlainObject(v)) {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) out[k] = rebaseValue(x, k, baseDir);
    return out;
  }
  return v; // numbers, booleans, functions, class instances: as is
}

/**
 * Makes the file paths in plugin options absolute against `baseDir` (the config file's directory).
 * Rule: a string is a path when it starts with `./` or `../` (any key), or when its key is one of PATH_KEYS or ends
 * in `Path`/`File`/`Dir` and the value is relative (not absolute, not `scheme:…`, not `-`, not `~…`). Applies through
 * nested objects and arrays (array elements take their array's key). Returns a new object; the input is not changed.
 */
export function rebasePaths(options: Record<string, unknown>, baseDir: string): Record<string, unknown> {
  return rebaseValue(options, undefined, baseDir) as Record<string, unknown>;
}

/** Merges `over` onto `base`: plain objects merge key by key (recursively), anything else in `over` replaces. */
export function mergeOptions(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) {
    const b = out[k];
    out[k] = isPlainObject(b) && isPlainObject(v) ? mergeOptions(b, v) : v;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Plugin lists

/** Turns a config entry into a resolved spec (name normalised, paths rebased). */
export function toSpec(ref: PluginRef, baseDir: string, from: string): ResolvedPluginSpec {
  const name0 = typeof ref === 'string' ? ref : ref.name;
  const opts = typeof ref === 'string' ? {} : (ref.options ?? {});
  const name = isLocalPluginName(name0) && !name0.startsWith('file:') ? path.resolve(baseDir, name0) : name0;
  return { name, options: rebasePaths(opts, baseDir), key: pluginKey(name0, baseDir), from: [from] };
}

/**
 * Adds `extra` to `list`: an entry whose key is already there has its options merged over the existing entry's
 * (position kept); others are appended in order. Returns a new list.
 */
export function mergePlugins(list: readonly ResolvedPluginSpec[], extra: readonly ResolvedPluginSpec[]): ResolvedPluginSpec[] {
  const out = list.map((p) => ({ ...p, from: [...p.from] }));
  for (const e of extra) {
    const i = out.findIndex((p) => p.key === e.key);
    if (i < 0) out.push({ ...e, from: [...e.from] });
    else {
      const cur = out[i]!;
      out[i] = { ...cur, options: mergeOptions(cur.options, e.options), from: [...cur.from, ...e.from] };
    }
  }
  return out;
}

/** Removes the named plugins (any spelling of the same key); reports each removal. */
export function removePlugins(list: readonly ResolvedPluginSpec[], names: readonly string[], baseDir: string, by: (i: number) => string): { plugins: ResolvedPluginSpec[]; removed: RemovedPlugin[] } {
  let out = [...list];
  const removed: RemovedPlugin[] = [];
  names.forEach((n, i) => {
    const key = pluginKey(n, baseDir);
    const present = out.some((p) => p.key === key);
    out = out.filter((p) => p.key !== key);
    removed.push({ name: n, key, by: by(i), present });
  });
  return { plugins: out, removed };
}

/** Checks that the same plugin is not listed twice in one list (a likely mistake: say where). */
function noDuplicates(specs: ResolvedPluginSpec[], file: string): void {
  const seen = new Map<string, string>();
  for (const s of specs) {
    const prev = seen.get(s.key);
    if (prev !== undefined) {
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: ${s.from[0]} lists plugin ${s.name} again (already at ${prev}); list each plugin once`, {
        details: { file, path: s.from[0], expected: 'each plugin once per list' },
      });
    }
    seen.set(s.key, s.from[0]!);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Hosts

/** Glob → RegExp: `*` any run, `?` one character, everything else literal; case-insensitive, whole string. */
export function globToRegExp(glob: string): RegExp {
  let re = '';
  for (const ch of glob) {
    if (ch === '*') re += '.*';
    else if (ch === '?') re += '.';
    else re += ch.replace(/[\\^$.|+(){}[\]]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 'i');
}

export function defaultModuleLoaded(name: string): boolean {
  return existsSync(`/sys/module/${name}`);
}

/** Whether a host section's `match` fits; returns the reason when it does. */
export function matchHost(h: HostDefinition, hostname: string, moduleLoaded: (name: string) => boolean): string | undefined {
  const m = h.match;
  if (m === undefined) return undefined;
  const reasons: string[] = [];
  if (m.hostname !== undefined) {
    const globs = Array.isArray(m.hostname) ? m.hostname : [m.hostname];
    const g = globs.find((x) => globToRegExp(x).test(hostname));
    if (g === undefined) return undefined;
    reasons.push(`hostname ${JSON.stringify(hostname)} matches ${JSON.stringify(g)}`);
  }
  if (m.kvmModule !== undefined) {
    const mods = Array.isArray(m.kvmModule) ? m.kvmModule : [m.kvmModule];
    if (!mods.every((x) => moduleLoaded(x))) return undefined;
    reasons.push(`kernel module${mods.length > 1 ? 's' : ''} ${mods.join(', ')} loaded`);
  }
  return reasons.join(' and ');
}

/** Picks the host section: `--host`, else the first whose `match` fits (file order), else `default`, else none. */
export function chooseHost(loaded: LoadedConfig, opts: ResolveOptions = {}): HostChoice {
  const hosts = loaded.config.hosts ?? {};
  const names = Object.keys(hosts);
  if (opts.host !== undefined) {
    if (!Object.hasOwn(hosts, opts.host)) {
      throw new KvmkitError(
        'KVMKIT_ERR_CONFIG_HOST',
        `${loaded.file}: --host ${opts.host}: no such host section (hosts.${opts.host}); ${names.length ? `known hosts: ${names.join(', ')}` : 'the file defines no hosts'}`,
        { details: { file: loaded.file, path: keyPath('hosts', opts.host), host: opts.host, known: names } },
      );
    }
    return { name: opts.host, by: 'flag', reason: `--host ${opts.host}` };
  }
  const hostname = opts.hostname ?? os.hostname();
  const moduleLoaded = opts.moduleLoaded ?? defaultModuleLoaded;
  for (const n of names) {
    const why = matchHost(hosts[n]!, hostname, moduleLoaded);
    if (why !== undefined) return { name: n, by: 'match', reason: why };
  }
  if (Object.hasOwn(hosts, 'default')) return { name: 'default', by: 'default', reason: `no host section matched ${JSON.stringify(hostname)}; using hosts.default` };
  return { name: undefined, by: 'none', reason: names.length ? `no host section matched ${JSON.stringify(hostname)} and there is no hosts.default` : 'the config defines no hosts' };
}

// ---------------------------------------------------------------------------------------------------------------

/**
 * Resolves one VM for this host: the VM's plugins, then the chosen host's plugins merged in (a host entry for a
 * plugin the VM has merges its options over the VM's; others are appended), then the host's `remove` list.
 */
export function resolveVm(loaded: LoadedConfig, opts: ResolveOptions = {}): ResolvedVm {
  const { file, dir, config } = loaded;
  const vmNames = Object.keys(config.vms);
  let vmName = opts.vm;
  if (vmName === undefined) {
    if (vmNames.length !== 1) {
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: vms defines ${vmNames.length} VMs (${vmNames.join(', ')}); name the one to use`, {
        details: { file, path: 'vms', expected: 'a VM name', known: vmNames },
      });
    }
    vmName = vmNames[0]!;
  }
  if (!Object.hasOwn(config.vms, vmName)) {
    throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: no VM named ${JSON.stringify(vmName)} (vms.${vmName}); known VMs: ${vmNames.join(', ')}`, {
      details: { file, path: keyPath('vms', vmName), expected: `one of ${vmNames.join(', ')}`, known: vmNames },
    });
  }
  const vm = config.vms[vmName]!;
  const vmPath = keyPath('vms', vmName);
  const choice = chooseHost(loaded, opts);

  const vmSpecs = (vm.plugins ?? []).map((r, i) => toSpec(r, dir, keyPath(keyPath(vmPath, 'plugins'), i)));
  noDuplicates(vmSpecs, file);
  let plugins = vmSpecs;
  let removed: RemovedPlugin[] = [];
  if (choice.name !== undefined) {
    const h = config.hosts![choice.name]!;
    const hp = keyPath('hosts', choice.name);
    const hostSpecs = (h.plugins ?? []).map((r, i) => toSpec(r, dir, keyPath(keyPath(hp, 'plugins'), i)));
    noDuplicates(hostSpecs, file);
    plugins = mergePlugins(plugins, hostSpecs);
    if (h.remove) {
      const r = removePlugins(plugins, h.remove, dir, (i) => keyPath(keyPath(hp, 'remove'), i));
      plugins = r.plugins;
      removed = r.removed;
    }
  }
  const settings: Record<string, string> = {
    memory: vm.memory !== undefined ? keyPath(vmPath, 'memory') : 'default',
    cpus: vm.cpus !== undefined ? keyPath(vmPath, 'cpus') : 'default',
  };
  if (vm.cmdline !== undefined) settings.cmdline = keyPath(vmPath, 'cmdline');
  if (vm.onReset !== undefined) settings.onReset = keyPath(vmPath, 'onReset');
  const machineConfig: MachineConfig = {
    name: vmName,
    memory: vm.memory ?? DEFAULT_MEMORY_MIB,
    cpus: vm.cpus ?? DEFAULT_CPUS,
    ...(vm.cmdline !== undefined ? { cmdline: vm.cmdline } : {}),
    ...(vm.onReset !== undefined ? { onReset: vm.onReset } : {}),
    plugins: plugins.map((p) => ({ name: p.name, options: p.options })),
  };
  return {
    machineConfig,
    host: choice.name,
    plugins,
    sources: { file, dir, vm: vmName, host: choice, settings, removed },
  };
}
