import { createRequire } from 'node:module';
import { KvmkitError, toKvmkitError } from './errors.js';
import type { TapHooks } from './hooks.js';
import type { Logger } from './logger.js';
import type { MachineConfig } from './config.js';
import type { GuestMemory } from './memory.js';
import type { Vm } from './kvm/vm.js';
import type { Vcpu } from './kvm/vcpu.js';
import type { StateSection } from './state.js';

// semver costs ~15 ms of start-up (loading it, then compiling its range regexes on first use). Plain `X.Y.Z`
// versions and `^X.Y.Z` ranges (what every plugin here declares) are decided below exactly as semver would;
// anything else loads semver's two functions on first use.
const requireSemver = createRequire(import.meta.url);
type SatisfiesFn = (version: string, range: string, opts?: { includePrerelease?: boolean }) => boolean;
let semverFns: { satisfies: SatisfiesFn; valid: (v: string) => string | null } | undefined;
function semver(): NonNullable<typeof semverFns> {
  return (semverFns ??= {
    satisfies: requireSemver('semver/functions/satisfies.js') as SatisfiesFn,
    valid: requireSemver('semver/functions/valid.js') as (v: string) => string | null,
  });
}
const PLAIN_VERSION = /^(0|[1-9]\d{0,14})\.(0|[1-9]\d{0,14})\.(0|[1-9]\d{0,14})$/;
const CARET_RANGE = /^\^(0|[1-9]\d{0,14})\.(0|[1-9]\d{0,14})\.(0|[1-9]\d{0,14})$/;

function semverValid(v: string): boolean {
  return PLAIN_VERSION.test(v) || semver().valid(v) !== null;
}

/** semver.satisfies(version, range, { includePrerelease: true }). */
function semverSatisfies(version: string, range: string): boolean {
  const v = PLAIN_VERSION.exec(version);
  const r = CARET_RANGE.exec(range);
  if (!v || !r) return semver().satisfies(version, range, { includePrerelease: true });
  const [a, b, c] = [Number(v[1]), Number(v[2]), Number(v[3])];
  const [x, y, z] = [Number(r[1]), Number(r[2]), Number(r[3])];
  const atLeast = a !== x ? a > x : b !== y ? b > y : c >= z;
  // ^X.Y.Z: <(X+1).0.0 when X > 0, <0.(Y+1).0 when X = 0 < Y, <0.0.(Z+1) when X = Y = 0.
  if (x > 0) return atLeast && a === x;
  if (y > 0) return atLeast && a === 0 && b === y;
  return a === 0 && b === 0 && c === z;
}

/** Why a machine stopped. `exitCode` is what `kvmkit run` exits with. */
export interface StopReason {
  reason: 'guest-exit' | 'halt' | 'reset' | 'shutdown' | 'triple-fault' | 'error' | 'signal' | 'user';
  exitCode: number;
  message?: string;
  error?: KvmkitError;
}

export type MachineState = 'created' | 'configured' | 'running' | 'paused' | 'stopping' | 'stopped';

/** The machine as plugins see it. Fields that exist only after start are undefined before. */
export interface MachineApi {
  readonly name: string;
  readonly config: Readonly<MachineConfig>;
  readonly hooks: TapHooks;
  readonly log: Logger;
  readonly state: MachineState;
  readonly memory: GuestMemory | undefined;
  readonly vm: Vm | undefined;
  readonly vcpus: readonly Vcpu[];
  /** Ask the machine to stop (async; idempotent: the first reason wins). */
  requestStop(reason: StopReason): void;
  /** Stops the machine and resolves once it has released everything (Machine.stop). */
  stop(reason?: StopReason): Promise<void>;
  /** Ask for a guest reset: stops, or reboots when config.onReset is 'reboot'. */
  requestReset(source: string): void;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Every registered plugin, in order. */
  readonly plugins: ReadonlyArray<{ name: string; version: string; provides: readonly string[] }>;
  /** Names of the registered snapshot and migration strategies. */
  strategies(): { snapshot: string[]; migration: string[] };
  /** The machine's state except RAM (see Machine.saveState); the machine must be paused. */
  saveState(): Promise<Map<string, StateSection>>;
  /** Restores what saveState wrote (see Machine.restoreState). */
  restoreState(sections: ReadonlyMap<string, StateSection>): Promise<void>;
  /** Plugins can publish an API for other plugins (key = plugin name). */
  provide(name: string, api: unknown): void;
  use<T = unknown>(name: string): T | undefined;
}

export interface PluginContext {
  log: Logger;
  options: unknown;
}

export interface Plugin {
  /** Short name: tap name, logger binding, dependency key. */
  name: string;
  version: string;
  /** semver range of @kvmkit/kernel supported. */
  kernel?: string;
  /** Names of plugins that must also be registered. */
  dependencies?: string[];
  /** Capabilities; 'firmware', 'console', … are exclusive (one provider), 'x:*' shared when suffixed by '+'. */
  provides?: string[];
  /** Options as given; `validateOptions` throws KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS') when invalid. */
  options?: unknown;
  validateOptions?(options: unknown): void;
  apply(machine: MachineApi, ctx: PluginContext): void | Promise<void>;
}

/** A package's default export: options → Plugin. */
export type PluginFactory<O = unknown> = (options?: O) => Plugin;

/** Capabilities that several plugins may provide at once (end with '+'), e.g. 'device+'. */
function exclusive(cap: string): boolean {
  return !cap.endsWith('+');
}

/**
 * Holds the plugins of one machine and checks them at registration: duplicates, kernel version range,
 * dependencies (checked by `check()` once all are registered), conflicting provides, invalid options.
 */
export class PluginHost {
  private readonly plugins: Plugin[] = [];
  private readonly providers = new Map<string, string>();

  constructor(readonly kernelVersion: string) {}

  register(p: unknown): Plugin {
    if (typeof p !== 'object' || p === null || typeof (p as Plugin).name !== 'string' || typeof (p as Plugin).apply !== 'function') {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `not a plugin (needs name, version and apply): ${describe(p)}`);
    }
    const plugin = p as Plugin;
    if (!/^[a-z0-9@][a-z0-9._/:-]*$/i.test(plugin.name)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `plugin name ${JSON.stringify(plugin.name)} is not valid`);
    }
    if (typeof plugin.version !== 'string' || !semverValid(plugin.version)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `plugin ${plugin.name} has no valid semver version (got ${JSON.stringify(plugin.version)})`);
    }
    if (this.plugins.some((x) => x.name === plugin.name)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_DUPLICATE', `plugin ${plugin.name} is registered twice`, { details: { plugin: plugin.name } });
    }
    if (plugin.kernel !== undefined && !semverSatisfies(this.kernelVersion, plugin.kernel)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_VERSION', `plugin ${plugin.name} needs @kvmkit/kernel ${plugin.kernel}; this is ${this.kernelVersion}`, {
        details: { plugin: plugin.name, range: plugin.kernel, kernel: this.kernelVersion },
      });
    }
    for (const cap of plugin.provides ?? []) {
      const owner = this.providers.get(cap);
      if (owner !== undefined && exclusive(cap)) {
        throw new KvmkitError('KVMKIT_ERR_PLUGIN_CONFLICT', `plugins ${owner} and ${plugin.name} both provide ${cap}`, {
          details: { capability: cap, plugins: [owner, plugin.name] },
        });
      }
    }
    if (plugin.validateOptions) {
      try {
        plugin.validateOptions(plugin.options);
      } catch (e) {
        throw toKvmkitError(e, 'KVMKIT_ERR_PLUGIN_OPTIONS', `plugin ${plugin.name}: invalid options: ${(e as Error)?.message ?? e}`);
      }
    }
    for (const cap of plugin.provides ?? []) if (!this.providers.has(cap)) this.providers.set(cap, plugin.name);
    this.plugins.push(plugin);
    return plugin;
  }

  /** Checks dependencies once everything is registered. */
  check(): void {
    const names = new Set(this.plugins.map((p) => p.name));
    const caps = new Set(this.providers.keys());
    for (const p of this.plugins) {
      for (const d of p.dependencies ?? []) {
        if (!names.has(d) && !caps.has(d)) {
          throw new KvmkitError('KVMKIT_ERR_PLUGIN_DEPENDENCY', `plugin ${p.name} needs ${d}, which is not registered`, {
            details: { plugin: p.name, missing: d },
          });
        }
      }
    }
  }

  provider(capability: string): string | undefined {
    return this.providers.get(capability);
  }

  list(): readonly Plugin[] {
    return this.plugins;
  }
}

function describe(p: unknown): string {
  try {
    return JSON.stringify(p)?.slice(0, 80) ?? String(p);
  } catch {
    return String(p);
  }
}

/**
 * Helper for plugin authors: checks a plain options object against a tiny schema and throws
 * KVMKIT_ERR_PLUGIN_OPTIONS naming the key. Types: 'string' | 'number' | 'integer' | 'boolean' | 'object' | 'array'
 * or a list of allowed literal values.
 */
export type OptionType = 'string' | 'number' | 'integer' | 'boolean' | 'object' | 'array' | readonly (string | number | boolean)[];
export function checkOptions(plugin: string, options: unknown, schema: Record<string, { type: OptionType; required?: boolean }>, allowExtra = false): Record<string, unknown> {
  if (options === undefined || options === null) options = {};
  if (typeof options !== 'object' || Array.isArray(options)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${plugin}: options must be an object`, { details: { plugin } });
  }
  const o = options as Record<string, unknown>;
  for (const [k, spec] of Object.entries(schema)) {
    const v = o[k];
    if (v === undefined) {
      if (spec.required) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${plugin}: option ${k} is required`, { details: { plugin, key: k } });
      continue;
    }
    const t = spec.type;
    let ok: boolean;
    if (Array.isArray(t)) ok = t.includes(v as never);
    else if (t === 'integer') ok = Number.isInteger(v);
    else if (t === 'array') ok = Array.isArray(v);
    else if (t === 'object') ok = typeof v === 'object' && v !== null && !Array.isArray(v);
    else ok = typeof v === t;
    if (!ok) {
      const expected = Array.isArray(t) ? `one of ${t.map((x) => JSON.stringify(x)).join(', ')}` : `a ${t as string}`;
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${plugin}: option ${k} must be ${expected} (got ${JSON.stringify(v)})`, {
        details: { plugin, key: k, expected },
      });
    }
  }
  if (!allowExtra) {
    for (const k of Object.keys(o)) {
      if (!(k in schema)) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${plugin}: unknown option ${k} (known: ${Object.keys(schema).join(', ') || 'none'})`, { details: { plugin, key: k } });
    }
  }
  return o;
}
