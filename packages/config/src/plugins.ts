import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { KvmkitError, type Plugin, type PluginSpec } from '@kvmkit/kernel';
import { isLocalPluginName, packageCandidates } from './names.js';

export interface InstantiateOptions {
  /** Directory package names and relative paths are resolved from first (the config file's directory). */
  baseDir: string;
  /** Further directories to resolve package names from, after baseDir (e.g. the CLI's own directory). */
  searchDirs?: string[];
  /** Named in errors: the config file the specs came from. */
  configFile?: string;
}

/** Where a plugin name resolved to. */
export interface ResolvedPluginModule {
  name: string;
  /** The package name that matched (undefined for local files). */
  packageName?: string;
  /** Absolute path of the module file. */
  file: string;
}

const OWN_DIR = path.dirname(fileURLToPath(import.meta.url));

function where(spec: PluginSpec & { from?: string[] }, configFile?: string): string {
  const parts: string[] = [];
  if (configFile) parts.push(`config ${configFile}`);
  if (spec.from?.length) parts.push(`at ${spec.from.join(', ')}`);
  return parts.length ? ` (${parts.join(', ')})` : '';
}

/** Picks the ESM entry of a package.json `exports` value ('.' entry; import > node > default conditions). */
function exportsEntry(exp: unknown): string | undefined {
  if (typeof exp === 'string') return exp;
  if (Array.isArray(exp)) {
    for (const x of exp) {
      const r = exportsEntry(x);
      if (r) return r;
    }
    return undefined;
  }
  if (typeof exp === 'object' && exp !== null) {
    const o = exp as Record<string, unknown>;
    if ('.' in o) return exportsEntry(o['.']);
    for (const c of ['import', 'node', 'default']) if (c in o) {
      const r = exportsEntry(o[c]);
      if (r) return r;
    }
  }
  return undefined;
}

/** Finds `pkg` in node_modules directories from `dir` upwards and returns its ESM entry file. */
function findPackage(pkg: string, dir: string): string | undefined {
  // Fast path: Node's own resolver (CommonJS conditions) handles symlinks, "main", "exports" with "default"/"require".
  try {
    const f = createRequire(path.join(dir, '__kvmkit_resolve__.js')).resolve(pkg);
    if (path.isAbsolute(f)) return f; // not a node: builtin
  } catch {
    // fall through: ESM-only packages ("exports": { "import": … }) are not visible to require.resolve
  }
  let d = dir;
  for (;;) {
    const pdir = path.join(d, 'node_modules', pkg);
    const pj = path.join(pdir, 'package.json');
    if (existsSync(pj)) {
      try {
        const meta = JSON.parse(readFileSync(pj, 'utf8')) as { exports?: unknown; main?: string; module?: string };
        const entry = meta.exports !== undefined ? exportsEntry(meta.exports) : (meta.main ?? 'index.js');
        if (entry) {
          const f = path.resolve(pdir, entry);
          if (existsSync(f)) return realpathSync(f);
        }
      } catch {
        /* unreadable package.json: keep looking */
      }
    }
    const parent = path.dirname(d);
    if (parent === d) return undefined;
    d = parent;
  }
}

/**
 * Resolves a plugin name to a module file. Local names (./x.mjs, ../x, /abs, file:…) resolve against baseDir; short
 * names try @kvmkit/plugin-<name>, kvmkit-plugin-<name>, <name>; package names are used as is — each looked up from
 * baseDir, then each of searchDirs, then this package's own directory. Throws KVMKIT_ERR_PLUGIN_NOT_FOUND naming
 * the name, the config file and every place it looked.
 */
export function resolvePluginModule(spec: PluginSpec & { from?: string[] }, opts: InstantiateOptions): ResolvedPluginModule {
  const name = spec.name;
  if (isLocalPluginName(name)) {
    const f = name.startsWith('file:') ? fileURLToPath(name) : path.resolve(opts.baseDir, name);
    let ok = false;
    try {
      ok = statSync(f).isFile();
    } catch {
      ok = false;
    }
    if (!ok) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_NOT_FOUND', `plugin ${name} not found${where(spec, opts.configFile)}: no file ${f}`, {
        details: { plugin: name, file: f, configFile: opts.configFile, from: spec.from },
      });
    }
    return { name, file: f };
  }
  const dirs = [...new Set([opts.baseDir, ...(opts.searchDirs ?? []), OWN_DIR].map((d) => path.resolve(d)))];
  const candidates = packageCandidates(name);
  for (const c of candidates) {
    for (const d of dirs) {
      const f = findPackage(c, d);
      if (f) return { name, packageName: c, file: f };
    }
  }
  throw new KvmkitError(
    'KVMKIT_ERR_PLUGIN_NOT_FOUND',
    `plugin ${name} not found${where(spec, opts.configFile)}: looked for package${candidates.length > 1 ? 's' : ''} ${candidates.join(', ')} from ${dirs.join(', ')}`,
    { details: { plugin: name, candidates, searched: dirs, configFile: opts.configFile, from: spec.from } },
  );
}

function isPlugin(p: unknown): p is Plugin {
  return typeof p === 'object' && p !== null && typeof (p as Plugin).name === 'string' && typeof (p as Plugin).apply === 'function';
}

/**
 * Resolves, imports and instantiates plugins in order: each module's default export is a factory called with the
 * spec's options (`factory(options)`, may be async) and must return a Plugin. Errors:
 * KVMKIT_ERR_PLUGIN_NOT_FOUND (cannot resolve), KVMKIT_ERR_PLUGIN_INVALID (cannot import, no factory, not a plugin),
 * and whatever the factory throws (a KvmkitError passes through; anything else becomes KVMKIT_ERR_PLUGIN_OPTIONS).
 */
export async function instantiatePlugins(specs: ReadonlyArray<PluginSpec & { from?: string[] }>, opts: InstantiateOptions): Promise<Plugin[]> {
  const out: Plugin[] = [];
  for (const spec of specs) {
    const mod = resolvePluginModule(spec, opts);
    let ns: Record<string, unknown>;
    try {
      ns = (await import(pathToFileURL(mod.file).href)) as Record<string, unknown>;
    } catch (e) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `plugin ${spec.name}${where(spec, opts.configFile)}: cannot import ${mod.file}: ${(e as Error)?.message ?? e}`, {
        cause: e,
        details: { plugin: spec.name, file: mod.file },
      });
    }
    let factory = ns.default;
    // CommonJS modules imported from ESM: module.exports is `default`; honour `exports.default = factory` too.
    if (typeof factory === 'object' && factory !== null && typeof (factory as { default?: unknown }).default === 'function') {
      factory = (factory as { default: unknown }).default;
    }
    if (typeof factory !== 'function') {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `plugin ${spec.name}${where(spec, opts.configFile)}: ${mod.file} has no default export factory (options) => Plugin`, {
        details: { plugin: spec.name, file: mod.file },
      });
    }
    let p: unknown;
    try {
      p = await (factory as (o: unknown) => unknown)(spec.options ?? {});
    } catch (e) {
      if (e instanceof KvmkitError) throw e;
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `plugin ${spec.name}${where(spec, opts.configFile)}: ${(e as Error)?.message ?? e}`, {
        cause: e,
        details: { plugin: spec.name },
      });
    }
    if (!isPlugin(p)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_INVALID', `plugin ${spec.name}${where(spec, opts.configFile)}: the factory in ${mod.file} did not return a plugin ({ name, version, apply })`, {
        details: { plugin: spec.name, file: mod.file },
      });
    }
    if (p.options === undefined && Object.isExtensible(p)) (p as { options?: unknown }).options = spec.options ?? {};
    out.push(p);
  }
  return out;
}
