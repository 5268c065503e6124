import { existsSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import type * as Cosmiconfig from 'cosmiconfig';
import type * as Yaml from 'yaml';
import { KvmkitError } from '@kvmkit/kernel';
import { validateConfig, type KvmkitConfig } from './schema.js';

/** A loaded and validated config file. */
export interface LoadedConfig {
  /** Absolute path of the file the config came from. */
  file: string;
  /** Its directory: relative paths in plugin names and options are relative to it. */
  dir: string;
  /** `package.json#kvmkit` when it came from a package.json, else the file's format by extension. */
  format: string;
  config: KvmkitConfig;
}

export interface LoadConfigOptions {
  /** Where the search starts (default: process.cwd()). */
  cwd?: string;
  /** An explicit config file (relative to cwd); no search. */
  file?: string;
  /** Directory where the upward search stops (inclusive). Default: the first directory holding package.json or .git, else /. */
  stopDir?: string;
}

export const MODULE_NAME = 'kvmkit';

/** The file names looked for in each directory, in order (cosmiconfig 9 defaults for 'kvmkit'). */
export const SEARCH_PLACES = [
  'package.json',
  '.kvmkitrc',
  '.kvmkitrc.json',
  '.kvmkitrc.yaml',
  '.kvmkitrc.yml',
  '.kvmkitrc.js',
  '.kvmkitrc.ts',
  '.kvmkitrc.cjs',
  '.kvmkitrc.mjs',
  '.config/kvmkitrc',
  '.config/kvmkitrc.json',
  '.config/kvmkitrc.yaml',
  '.config/kvmkitrc.yml',
  '.config/kvmkitrc.js',
  '.config/kvmkitrc.ts',
  '.config/kvmkitrc.cjs',
  '.config/kvmkitrc.mjs',
  'kvmkit.config.js',
  'kvmkit.config.ts',
  'kvmkit.config.cjs',
  'kvmkit.config.mjs',
  'kvmkit.config.json',
  'kvmkit.config.yaml',
  'kvmkit.config.yml',
] as const;

function formatOf(file: string): string {
  if (path.basename(file) === 'package.json') return 'package.json#kvmkit';
  const ext = path.extname(file).slice(1);
  return ext === '' ? 'yaml' : ext === 'yml' ? 'yaml' : ext;
}

// cosmiconfig and yaml are loaded on first use (~25 ms of start-up that flag-only `kvmkit run` never needs).
const require = createRequire(import.meta.url);
let cosmiconfigMod: typeof Cosmiconfig | undefined;
let yamlMod: typeof Yaml | undefined;

function explorer() {
  const { cosmiconfig } = (cosmiconfigMod ??= require('cosmiconfig') as typeof Cosmiconfig);
  // A fresh explorer per call: cosmiconfig caches results per explorer.
  return cosmiconfig(MODULE_NAME, { searchPlaces: [...SEARCH_PLACES], searchStrategy: 'none', cache: false });
}

function parseError(file: string, e: unknown): KvmkitError {
  if (e instanceof KvmkitError) return e;
  const err = e as NodeJS.ErrnoException;
  let msg = err instanceof Error ? err.message : String(e);
  if (/Cannot find (module|package) 'typescript'/.test(msg)) {
    msg = `${file} is a TypeScript config: cosmiconfig loads it with the "typescript" package, which is not installed (install it, or use kvmkit.config.mjs)`;
    return new KvmkitError('KVMKIT_ERR_CONFIG', msg, { cause: e, details: { file, path: '(file)', expected: 'a loadable config file' } });
  }
  // Parsers often prefix the file name already; keep one.
  msg = msg.replace(/^(JSON|YAML) Error in [^\n]*:\n/, '$1: ');
  return new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: cannot load config: ${msg}`, {
    cause: e,
    details: { file, path: '(file)', expected: `valid ${formatOf(file)}` },
  });
}

function isBoundary(dir: string): boolean {
  return existsSync(path.join(dir, 'package.json')) || existsSync(path.join(dir, '.git'));
}

/**
 * Finds and loads the kvmkit config. With `file`: loads that file. Otherwise looks in `cwd` for the
 * cosmiconfig search places (see SEARCH_PLACES), then in each parent directory, stopping after the first
 * directory that holds a package.json or .git (the project root) or at `stopDir`.
 * Throws KVMKIT_ERR_CONFIG_NOT_FOUND (naming where it looked) or KVMKIT_ERR_CONFIG (naming the file, the key path
 * inside it and what was expected).
 */
export async function loadConfig(opts: LoadConfigOptions = {}): Promise<LoadedConfig> {
  const cwd = path.resolve(opts.cwd ?? process.cwd());
  const ex = explorer();
  if (opts.file !== undefined) {
    const file = path.resolve(cwd, opts.file);
    let st;
    try {
      st = statSync(file);
    } catch {
      throw new KvmkitError('KVMKIT_ERR_CONFIG_NOT_FOUND', `config file ${file} does not exist`, { details: { file } });
    }
    if (!st.isFile()) throw new KvmkitError('KVMKIT_ERR_CONFIG_NOT_FOUND', `config file ${file} is not a regular file`, { details: { file } });
    let r;
    try {
      r = await ex.load(file);
    } catch (e) {
      throw parseError(file, e);
    }
    if (r === null || r.isEmpty) {
      if (path.basename(file) === 'package.json') {
        throw new KvmkitError('KVMKIT_ERR_CONFIG_NOT_FOUND', `${file} has no "kvmkit" key`, { details: { file } });
      }
      throw new KvmkitError('KVMKIT_ERR_CONFIG', `${file}: the file is empty (expected an object { vms, hosts })`, {
        details: { file, path: '(top level)', expected: 'an object { vms, hosts }' },
      });
    }
    return finish(file, r.config);
  }
  const stopDir = opts.stopDir !== undefined ? path.resolve(cwd, opts.stopDir) : undefined;
  const searched: string[] = [];
  let dir = cwd;
  for (;;) {
    searched.push(dir);
    let r;
    try {
      r = await ex.search(dir);
    } catch (e) {
      const f = (e as { filepath?: string }).filepath ?? dir;
      throw parseError(f, e);
    }
    if (r !== null) {
      if (r.isEmpty) {
        throw new KvmkitError('KVMKIT_ERR_CONFIG', `${r.filepath}: the file is empty (expected an object { vms, hosts })`, {
          details: { file: r.filepath, path: '(top level)', expected: 'an object { vms, hosts }' },
        });
      }
      return finish(r.filepath, r.config);
    }
    const parent = path.dirname(dir);
    if (parent === dir || dir === stopDir || (stopDir === undefined && isBoundary(dir))) break;
    dir = parent;
  }
  throw new KvmkitError(
    'KVMKIT_ERR_CONFIG_NOT_FOUND',
    `no kvmkit config found (looked for kvmkit.config.{js,mjs,cjs,ts,json,yaml,yml}, .kvmkitrc*, package.json#kvmkit in ${searched.join(', ')})`,
    { details: { searched, searchPlaces: [...SEARCH_PLACES] } },
  );
}

/** Validates an already-parsed config object as if it came from `file` (for programmatic use and tests). */
export function fromObject(file: string, config: unknown): LoadedConfig {
  return finish(path.resolve(file), config);
}

function finish(file: string, config: unknown): LoadedConfig {
  try {
    validateConfig(file, config);
  } catch (e) {
    throw withLine(file, e);
  }
  return { file, dir: path.dirname(file), format: formatOf(file), config };
}

/** Splits a key path written by keyPath() (`vms.web.plugins[1]`, `vms["we b"]`) back into keys. */
export function splitKeyPath(p: string): Array<string | number> | undefined {
  const out: Array<string | number> = [];
  const re = /(?:^|\.)([A-Za-z_$][A-Za-z0-9_$-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]/gy;
  let m: RegExpExecArray | null;
  let at = 0;
  while (at < p.length && (m = re.exec(p)) !== null) {
    if (m[1] !== undefined) out.push(m[1]);
    else if (m[2] !== undefined) out.push(Number(m[2]));
    else out.push(JSON.parse(m[3]!) as string);
    at = re.lastIndex;
  }
  return at === p.length ? out : undefined;
}

/**
 * For JSON/YAML files (and package.json#kvmkit), adds the line of the offending key to a KVMKIT_ERR_CONFIG:
 * `file:LINE: vms.web.memory must be …` and `details.line`. JS/TS configs have no source positions: unchanged.
 */
function withLine(file: string, e: unknown): unknown {
  if (!(e instanceof KvmkitError) || e.code !== 'KVMKIT_ERR_CONFIG' || typeof e.details.path !== 'string') return e;
  const format = formatOf(file);
  if (format !== 'json' && format !== 'yaml' && format !== 'package.json#kvmkit') return e;
  try {
    const text = readFileSync(file, 'utf8');
    const { isNode, parseDocument } = (yamlMod ??= require('yaml') as typeof Yaml);
    const doc = parseDocument(text);
    let keys = e.details.path === '(top level)' ? [] : splitKeyPath(e.details.path);
    if (keys === undefined) return e;
    if (format === 'package.json#kvmkit') keys = ['kvmkit', ...keys];
    // The deepest node that exists on the path (a missing key points at its parent).
    for (let n = keys.length; n >= 0; n--) {
      const node = n === 0 ? doc.contents : doc.getIn(keys.slice(0, n), true);
      if (isNode(node) && node.range) {
        const line = text.slice(0, node.range[0]).split('\n').length;
        const msg = e.message.startsWith(`${file}: `) ? `${file}:${line}: ${e.message.slice(file.length + 2)}` : e.message;
        return new KvmkitError('KVMKIT_ERR_CONFIG', msg, { details: { ...e.details, line } });
      }
    }
  } catch {
    /* positions are a nicety */
  }
  return e;
}
