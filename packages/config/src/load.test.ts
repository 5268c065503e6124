import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isKvmkitError, type KvmkitError } from '@kvmkit/kernel';
import { kvmkitRejection } from '@kvmkit/testkit';
import { fromObject, loadConfig } from './index.js';

const root = mkdtempSync(path.join(os.tmpdir(), 'kvmkit-config-load-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
/** A fresh project dir (with a package.json so the upward search stops there) holding `files`. */
function project(files: Record<string, string>, withPackageJson = true): string {
  const d = path.join(root, `p${n++}`);
  mkdirSync(d, { recursive: true });
  if (withPackageJson && !('package.json' in files)) writeFileSync(path.join(d, 'package.json'), '{"name":"x","private":true}');
  for (const [f, c] of Object.entries(files)) {
    mkdirSync(path.dirname(path.join(d, f)), { recursive: true });
    writeFileSync(path.join(d, f), c);
  }
  return d;
}

const failure = kvmkitRejection;

const VM = { vms: { web: { memory: 128, cpus: 2, plugins: ['serial'] } } };

describe('loadConfig: file formats', () => {
  const js = `export default ${JSON.stringify(VM)};\n`;
  const yaml = 'vms:\n  web:\n    memory: 128\n    cpus: 2\n    plugins:\n      - serial\n';
  const cases: Array<[string, string, string]> = [
    ['kvmkit.config.mjs', js, 'mjs'],
    ['kvmkit.config.js', js, 'js'],
    ['kvmkit.config.cjs', `module.exports = ${JSON.stringify(VM)};\n`, 'cjs'],
    ['kvmkit.config.json', JSON.stringify(VM), 'json'],
    ['kvmkit.config.yaml', yaml, 'yaml'],
    ['kvmkit.config.yml', yaml, 'yaml'],
    ['.kvmkitrc', yaml, 'yaml'],
    ['.kvmkitrc.json', JSON.stringify(VM), 'json'],
    ['.kvmkitrc.yaml', yaml, 'yaml'],
    ['.kvmkitrc.mjs', js, 'mjs'],
    ['.config/kvmkitrc.json', JSON.stringify(VM), 'json'],
  ];
  for (const [file, content, format] of cases) {
    it(`finds and loads ${file}`, async () => {
      const d = project({ 'package.json': '{"name":"x","type":"module"}', [file]: content });
      const c = await loadConfig({ cwd: d });
      expect(c.file).toBe(path.join(d, file));
      expect(c.dir).toBe(path.dirname(path.join(d, file)));
      expect(c.format).toBe(format);
      expect(c.config.vms.web).toEqual({ memory: 128, cpus: 2, plugins: ['serial'] });
    });
  }

  it('loads package.json#kvmkit', async () => {
    const d = project({ 'package.json': JSON.stringify({ name: 'x', kvmkit: VM }) });
    const c = await loadConfig({ cwd: d });
    expect(c.file).toBe(path.join(d, 'package.json'));
    expect(c.format).toBe('package.json#kvmkit');
    expect(c.config.vms.web!.memory).toBe(128);
  });

  it('skips a package.json without a kvmkit key and finds the config file beside it', async () => {
    const d = project({ 'kvmkit.config.json': JSON.stringify(VM) });
    expect((await loadConfig({ cwd: d })).file).toBe(path.join(d, 'kvmkit.config.json'));
  });

  it('loads kvmkit.config.ts through cosmiconfig (typescript package present in this repo)', async () => {
    const d = project({ 'kvmkit.config.ts': `const memory: number = 64;\nexport default { vms: { t: { memory } } };\n` });
    const c = await loadConfig({ cwd: d });
    expect(c.format).toBe('ts');
    expect(c.config.vms.t!.memory).toBe(64);
  });

  it('loads an explicit file, relative to cwd, with any name', async () => {
    const d = project({ 'conf/my-vms.yaml': 'vms:\n  a: { memory: 32 }\n' });
    const c = await loadConfig({ cwd: d, file: 'conf/my-vms.yaml' });
    expect(c.file).toBe(path.join(d, 'conf/my-vms.yaml'));
    expect(c.dir).toBe(path.join(d, 'conf'));
    expect(c.config.vms.a!.memory).toBe(32);
  });

  it('searches parent directories up to the project root', async () => {
    const d = project({ 'kvmkit.config.json': JSON.stringify(VM), 'src/deep/x.txt': '' });
    expect((await loadConfig({ cwd: path.join(d, 'src/deep') })).file).toBe(path.join(d, 'kvmkit.config.json'));
  });

  it('does not search above the directory holding package.json', async () => {
    const outer = project({ 'kvmkit.config.json': JSON.stringify(VM) }, false);
    const inner = path.join(outer, 'proj');
    mkdirSync(inner);
    writeFileSync(path.join(inner, 'package.json'), '{}');
    const e = await failure(loadConfig({ cwd: inner }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG_NOT_FOUND');
    expect(e.message).toContain(inner);
  });

  it('honours cosmiconfig $import', async () => {
    const d = project({ 'base.json': JSON.stringify({ hosts: { default: { plugins: ['hugepages'] } } }), 'kvmkit.config.json': JSON.stringify({ $import: './base.json', ...VM }) });
    const c = await loadConfig({ cwd: d });
    expect(c.config.hosts?.default?.plugins).toEqual(['hugepages']);
  });

  it('fromObject validates in-memory configs', () => {
    expect(fromObject('/x/kvmkit.config.js', VM).dir).toBe('/x');
    expect(() => fromObject('/x/kvmkit.config.js', { vms: {} })).toThrow(/vms must be an object with at least one VM/);
  });
});

describe('loadConfig: errors', () => {
  it('KVMKIT_ERR_CONFIG_NOT_FOUND when nothing is found, naming where it looked', async () => {
    const d = project({});
    const e = await failure(loadConfig({ cwd: d }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG_NOT_FOUND');
    expect(e.message).toContain(d);
    expect(e.message).toContain('kvmkit.config');
  });

  it('KVMKIT_ERR_CONFIG_NOT_FOUND for a missing explicit file', async () => {
    const d = project({});
    const e = await failure(loadConfig({ cwd: d, file: 'nope.yaml' }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG_NOT_FOUND');
    expect(e.message).toContain(path.join(d, 'nope.yaml'));
  });

  it('KVMKIT_ERR_CONFIG for a JSON syntax error, naming the file', async () => {
    const d = project({ 'kvmkit.config.json': '{ "vms": { "web": ' });
    const e = await failure(loadConfig({ cwd: d }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG');
    expect(e.message).toContain(path.join(d, 'kvmkit.config.json'));
  });

  it('KVMKIT_ERR_CONFIG for a YAML syntax error, naming the file', async () => {
    const d = project({ 'kvmkit.config.yaml': 'vms:\n  web: [\n' });
    const e = await failure(loadConfig({ cwd: d }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG');
    expect(e.details.file).toBe(path.join(d, 'kvmkit.config.yaml'));
  });

  it('KVMKIT_ERR_CONFIG for a JS config that throws', async () => {
    const d = project({ 'kvmkit.config.mjs': 'throw new Error("boom in config");\n' });
    const e = await failure(loadConfig({ cwd: d }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG');
    expect(e.message).toContain('boom in config');
    expect(e.message).toContain('kvmkit.config.mjs');
  });

  it('KVMKIT_ERR_CONFIG for an empty file', async () => {
    const d = project({ 'kvmkit.config.yaml': '' });
    const e = await failure(loadConfig({ cwd: d, file: 'kvmkit.config.yaml' }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG');
    expect(e.message).toContain('empty');
  });

  const invalid: Array<[string, unknown, string, RegExp]> = [
    ['memory not an integer', { vms: { web: { memory: 'lots' } } }, 'vms.web.memory', /guest RAM in MiB/],
    ['memory too big', { vms: { web: { memory: 1e9 } } }, 'vms.web.memory', /1\.\.1048576/],
    ['cpus zero', { vms: { web: { cpus: 0 } } }, 'vms.web.cpus', /vCPUs/],
    ['cmdline not a string', { vms: { web: { cmdline: 3 } } }, 'vms.web.cmdline', /command line/],
    ['onReset', { vms: { web: { onReset: 'explode' } } }, 'vms.web.onReset', /"stop" or "reboot"/],
    ['unknown vm key', { vms: { web: { memroy: 3 } } }, 'vms.web.memroy', /not a known key/],
    ['unknown top-level key', { vms: { web: {} }, host: {} }, 'host', /not a known key/],
    ['no vms', { hosts: {} }, 'vms', /VM definitions/],
    ['vms empty', { vms: {} }, 'vms', /at least one VM/],
    ['bad vm name', { vms: { 'we b': {} } }, 'vms["we b"]', /VM name/],
    ['plugins not a list', { vms: { web: { plugins: 'serial' } } }, 'vms.web.plugins', /list of plugins/],
    ['plugin entry a number', { vms: { web: { plugins: ['serial', 5] } } }, 'vms.web.plugins[1]', /plugin name or an object/],
    ['plugin without name', { vms: { web: { plugins: [{ options: {} }] } } }, 'vms.web.plugins[0].name', /plugin name/],
    ['plugin options not an object', { vms: { web: { plugins: [{ name: 'serial', options: [1] }] } } }, 'vms.web.plugins[0].options', /object of plugin options/],
    ['plugin extra key', { vms: { web: { plugins: [{ name: 'serial', opts: {} }] } } }, 'vms.web.plugins[0].opts', /not a known key/],
    ['host not an object', { vms: { web: {} }, hosts: { laptop: 3 } }, 'hosts.laptop', /host definition/],
    ['host match empty', { vms: { web: {} }, hosts: { laptop: { match: {} } } }, 'hosts.laptop.match', /at least one of hostname, kvmModule/],
    ['host match hostname type', { vms: { web: {} }, hosts: { laptop: { match: { hostname: 3 } } } }, 'hosts.laptop.match.hostname', /hostname glob/],
    ['host match module name', { vms: { web: {} }, hosts: { n: { match: { kvmModule: ['kvm', '../x'] } } } }, 'hosts.n.match.kvmModule[1]', /kernel module name/],
    ['host remove not a list', { vms: { web: {} }, hosts: { laptop: { remove: 'serial' } } }, 'hosts.laptop.remove', /list of plugin names/],
    ['host plugin entry', { vms: { web: {} }, hosts: { laptop: { plugins: [{ name: '' }] } } }, 'hosts.laptop.plugins[0].name', /plugin name/],
  ];
  for (const [what, cfg, keyPath, expected] of invalid) {
    it(`names file and key path: ${what} → ${keyPath}`, async () => {
      const d = project({ 'kvmkit.config.json': JSON.stringify(cfg, null, 2) });
      const e = await failure(loadConfig({ cwd: d }));
      expect(e.code).toBe('KVMKIT_ERR_CONFIG');
      expect(e.details.file).toBe(path.join(d, 'kvmkit.config.json'));
      expect(e.details.path).toBe(keyPath);
      expect(e.message.startsWith(`${path.join(d, 'kvmkit.config.json')}:${e.details.line}: ${keyPath}`)).toBe(true);
      expect(e.message).toMatch(expected);
      // The same error from a JS config: no line numbers.
      const j = project({ 'kvmkit.config.mjs': `export default ${JSON.stringify(cfg)};` });
      const ej = await failure(loadConfig({ cwd: j }));
      expect(ej.details.path).toBe(keyPath);
      expect(ej.details.line).toBeUndefined();
      expect(ej.message.startsWith(`${path.join(j, 'kvmkit.config.mjs')}: ${keyPath}`)).toBe(true);
    });
  }

  it('JSON/YAML errors carry the line of the offending key (a missing key: its parent)', async () => {
    const y = project({ 'kvmkit.config.yaml': 'vms:\n  web:\n    memory: 64\n    plugins:\n      - serial\n      - 5\n' });
    const ey = await failure(loadConfig({ cwd: y }));
    expect(ey.message).toBe(`${path.join(y, 'kvmkit.config.yaml')}:6: vms.web.plugins[1] must be a plugin name or an object { name, options } (got 5)`);
    expect(ey.details.line).toBe(6);
    const j = project({ 'kvmkit.config.json': '{\n  "vms": {\n    "web": {\n      "cpus": 0\n    }\n  }\n}\n' });
    expect((await failure(loadConfig({ cwd: j }))).details.line).toBe(4);
    const m = project({ 'kvmkit.config.yaml': '# comment\nhosts: {}\n' });
    const em = await failure(loadConfig({ cwd: m }));
    expect(em.details.path).toBe('vms');
    expect(em.details.line).toBe(2); // the document (vms is missing)
    const pj = project({ 'package.json': JSON.stringify({ name: 'x', kvmkit: { vms: { a: { memory: -1 } } } }, null, 2) });
    const ep = await failure(loadConfig({ cwd: pj }));
    expect(ep.message).toMatch(/package\.json:6: vms\.a\.memory must be/);
  });

  it('a JS config exporting a non-object names the top level', async () => {
    const d = project({ 'kvmkit.config.mjs': 'export default 42;\n' });
    const e = await failure(loadConfig({ cwd: d }));
    expect(e.code).toBe('KVMKIT_ERR_CONFIG');
    expect(e.details.path).toBe('(top level)');
    expect(e.message).toContain('default export');
  });
});
