import { KvmkitError, MAX_MEMORY_MIB, MAX_VCPUS } from '@kvmkit/kernel';

/** A plugin reference as written in a config file: a name, or a name with options. */
export type PluginRef = string | { name: string; options?: Record<string, unknown> };

/** One VM definition (`vms.<name>`). */
export interface VmDefinition {
  description?: string;
  /** Guest RAM in MiB (default 256). */
  memory?: number;
  /** Number of vCPUs (default 1). */
  cpus?: number;
  /** The user's kernel command line. */
  cmdline?: string;
  /** What a guest reset does: 'stop' (default) or 'reboot'. */
  onReset?: 'stop' | 'reboot';
  plugins?: PluginRef[];
}

/** How a host section recognises the machine it runs on. Every condition given must hold. */
export interface HostMatch {
  /** Hostname glob(s) (`*`, `?`, case-insensitive); any of them may match. */
  hostname?: string | string[];
  /** Kernel module(s) that must all be loaded (checked as /sys/module/<name>). */
  kvmModule?: string | string[];
}

/** One host section (`hosts.<name>`). */
export interface HostDefinition {
  description?: string;
  /** Without `match` the section is chosen only by `--host NAME` (or as the `default` fallback). */
  match?: HostMatch;
  /** Plugins added on this host; a plugin the VM already has gets these options merged over its own. */
  plugins?: PluginRef[];
  /** Plugins the VM lists that this host drops (short or full names). */
  remove?: string[];
}

/** The whole file. */
export interface KvmkitConfig {
  $schema?: string;
  vms: Record<string, VmDefinition>;
  hosts?: Record<string, HostDefinition>;
}

export const DEFAULT_MEMORY_MIB = 256;
export const DEFAULT_CPUS = 1;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Formats a key path: `vms.web.plugins[1].options`; keys that are not identifiers are quoted. */
export function keyPath(parent: string, key: string | number): string {
  if (typeof key === 'number') return `${parent}[${key}]`;
  const k = /^[A-Za-z_$][A-Za-z0-9_$-]*$/.test(key) ? key : JSON.stringify(key);
  if (parent === '') return /^[A-Za-z_$]/.test(k) ? k : `[${k}]`;
  return /^[A-Za-z_$]/.test(k) ? `${parent}.${k}` : `${parent}[${k}]`;
}

function show(v: unknown): string {
  if (v === undefined) return 'undefined';
  if (typeof v === 'function') return 'a function';
  try {
    const s = JSON.stringify(v);
    return s === undefined ? String(v) : s.length > 80 ? `${s.slice(0, 77)}...` : s;
  } catch {
    return String(v);
  }
}

/** Throws KVMKIT_ERR_CONFIG naming the file, the key path inside it and what was expected. */
export function configError(file: string, path: string, expected: string, got: unknown, extra = ''): never {
  const where = path === '' ? '(top level)' : path;
  throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: ${where} must be ${expected} (got ${show(got)})${extra}`, {
    details: { file, path: where, expected, got: typeof got === 'function' ? '[function]' : got },
  });
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function checkKeys(file: string, path: string, o: Record<string, unknown>, known: readonly string[]): void {
  for (const k of Object.keys(o)) {
    if (!known.includes(k)) {
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: ${keyPath(path, k)} is not a known key (known here: ${known.join(', ')})`, {
        details: { file, path: keyPath(path, k), expected: `one of ${known.join(', ')}` },
      });
    }
  }
}

function checkInt(file: string, path: string, v: unknown, min: number, max: number, what: string): void {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) configError(file, path, `${what} (an integer in ${min}..${max})`, v);
}

function checkStringOrList(file: string, path: string, v: unknown, what: string): void {
  if (typeof v === 'string' && v !== '') return;
  if (Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'string' && x !== '')) return;
  configError(file, path, `${what}: a non-empty string or a non-empty list of strings`, v);
}

function checkPluginName(file: string, path: string, v: unknown): void {
  if (typeof v !== 'string' || v.trim() === '' || /\s/.test(v)) {
    configError(file, path, 'a plugin name (short name like "serial", a package name, or a path like "./my-plugin.mjs")', v);
  }
}

export function validatePluginList(file: string, path: string, v: unknown): void {
  if (!Array.isArray(v)) configError(file, path, 'a list of plugins (names or { name, options })', v);
  (v as unknown[]).forEach((p, i) => {
    const pp = keyPath(path, i);
    if (typeof p === 'string') return checkPluginName(file, pp, p);
    if (!isPlainObject(p)) configError(file, pp, 'a plugin name or an object { name, options }', p);
    const o = p as Record<string, unknown>;
    checkKeys(file, pp, o, ['name', 'options']);
    checkPluginName(file, keyPath(pp, 'name'), o.name);
    if (o.options !== undefined && !isPlainObject(o.options)) configError(file, keyPath(pp, 'options'), 'an object of plugin options', o.options);
  });
}

const VM_KEYS = ['description', 'memory', 'cpus', 'cmdline', 'onReset', 'plugins'] as const;
const HOST_KEYS = ['description', 'match', 'plugins', 'remove'] as const;
const ROOT_KEYS = ['$schema', 'vms', 'hosts'] as const;

export function validateVm(file: string, path: string, v: unknown): void {
  if (!isPlainObject(v)) configError(file, path, 'a VM definition object { memory, cpus, cmdline, plugins }', v);
  const o = v as Record<string, unknown>;
  checkKeys(file, path, o, VM_KEYS);
  if (o.description !== undefined && typeof o.description !== 'string') configError(file, keyPath(path, 'description'), 'a string', o.description);
  if (o.memory !== undefined) checkInt(file, keyPath(path, 'memory'), o.memory, 1, MAX_MEMORY_MIB, 'guest RAM in MiB');
  if (o.cpus !== undefined) checkInt(file, keyPath(path, 'cpus'), o.cpus, 1, MAX_VCPUS, 'the number of vCPUs');
  if (o.cmdline !== undefined && typeof o.cmdline !== 'string') configError(file, keyPath(path, 'cmdline'), 'a kernel command line string', o.cmdline);
  if (o.onReset !== undefined && o.onReset !== 'stop' && o.onReset !== 'reboot') configError(file, keyPath(path, 'onReset'), '"stop" or "reboot"', o.onReset);
  if (o.plugins !== undefined) validatePluginList(file, keyPath(path, 'plugins'), o.plugins);
}

export function validateHost(file: string, path: string, v: unknown): void {
  if (!isPlainObject(v)) configError(file, path, 'a host definition object { match, plugins, remove }', v);
  const o = v as Record<string, unknown>;
  checkKeys(file, path, o, HOST_KEYS);
  if (o.description !== undefined && typeof o.description !== 'string') configError(file, keyPath(path, 'description'), 'a string', o.description);
  if (o.match !== undefined) {
    const mp = keyPath(path, 'match');
    if (!isPlainObject(o.match)) configError(file, mp, 'an object { hostname?, kvmModule? }', o.match);
    const m = o.match as Record<string, unknown>;
    checkKeys(file, mp, m, ['hostname', 'kvmModule']);
    if (m.hostname === undefined && m.kvmModule === undefined) configError(file, mp, 'an object with at least one of hostname, kvmModule', m);
    if (m.hostname !== undefined) checkStringOrList(file, keyPath(mp, 'hostname'), m.hostname, 'hostname glob(s)');
    if (m.kvmModule !== undefined) {
      checkStringOrList(file, keyPath(mp, 'kvmModule'), m.kvmModule, 'kernel module name(s)');
      const mods = Array.isArray(m.kvmModule) ? m.kvmModule : [m.kvmModule];
      mods.forEach((x, i) => {
        if (!/^[A-Za-z0-9_-]+$/.test(x as string)) {
          configError(file, Array.isArray(m.kvmModule) ? keyPath(keyPath(mp, 'kvmModule'), i) : keyPath(mp, 'kvmModule'), 'a kernel module name (letters, digits, _ and -)', x);
        }
      });
    }
  }
  if (o.plugins !== undefined) validatePluginList(file, keyPath(path, 'plugins'), o.plugins);
  if (o.remove !== undefined) {
    const rp = keyPath(path, 'remove');
    if (!Array.isArray(o.remove)) configError(file, rp, 'a list of plugin names to remove', o.remove);
    (o.remove as unknown[]).forEach((x, i) => checkPluginName(file, keyPath(rp, i), x));
  }
}

/** Validates a whole config file's content; throws KVMKIT_ERR_CONFIG naming `file` and the key path. */
export function validateConfig(file: string, c: unknown): asserts c is KvmkitConfig {
  if (!isPlainObject(c)) configError(file, '', 'an object { vms, hosts } (for JS configs: the default export)', c);
  const o = c as Record<string, unknown>;
  checkKeys(file, '', o, ROOT_KEYS);
  if (o.vms === undefined) configError(file, 'vms', 'an object of VM definitions, e.g. { web: { memory: 256 } }', o.vms);
  if (!isPlainObject(o.vms)) configError(file, 'vms', 'an object of VM definitions keyed by VM name', o.vms);
  const vms = o.vms as Record<string, unknown>;
  if (Object.keys(vms).length === 0) configError(file, 'vms', 'an object with at least one VM', vms);
  for (const [name, vm] of Object.entries(vms)) {
    const p = keyPath('vms', name);
    if (!NAME_RE.test(name)) {
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: ${p}: VM name must be letters, digits, . _ - (1-64 chars, starting with a letter or digit)`, {
        details: { file, path: p, expected: 'a VM name of letters, digits, . _ -' },
      });
    }
    validateVm(file, p, vm);
  }
  if (o.hosts !== undefined) {
    if (!isPlainObject(o.hosts)) configError(file, 'hosts', 'an object of host definitions keyed by host name', o.hosts);
    for (const [name, h] of Object.entries(o.hosts as Record<string, unknown>)) {
      const p = keyPath('hosts', name);
      if (!NAME_RE.test(name)) {
        throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: ${p}: host name must be letters, digits, . _ - (1-64 chars)`, {
          details: { file, path: p, expected: 'a host name of letters, digits, . _ -' },
        });
      }
      validateHost(file, p, h);
    }
  }
  if (o.$schema !== undefined && typeof o.$schema !== 'string') configError(file, '$schema', 'a string', o.$schema);
}

export { isPlainObject };
