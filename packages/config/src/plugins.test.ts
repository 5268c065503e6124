import { mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isKvmkitError, PluginHost, type KvmkitError } from '@kvmkit/kernel';
import { kvmkitRejection } from '@kvmkit/testkit';
import { instantiatePlugins, loadConfig, resolvePluginModule, resolveVm } from './index.js';

const root = realpathSync(mkdtempSync(path.join(os.tmpdir(), 'kvmkit-config-plugins-')));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function write(rel: string, content: string): string {
  const f = path.join(root, rel);
  mkdirSync(path.dirname(f), { recursive: true });
  writeFileSync(f, content);
  return f;
}

const factory = (name: string) => `export default function (options) { return { name: ${JSON.stringify(name)}, version: '1.2.3', options, apply() {} }; }\n`;

write('proj/package.json', '{"name":"proj","type":"module"}');
write('proj/plugins/mine.mjs', factory('mine'));
// A third-party unscoped package found by short name (kvmkit-plugin-acme), ESM-only exports (invisible to require.resolve).
write('proj/node_modules/kvmkit-plugin-acme/package.json', JSON.stringify({ name: 'kvmkit-plugin-acme', type: 'module', exports: { '.': { import: './lib/main.js' } } }));
write('proj/node_modules/kvmkit-plugin-acme/lib/main.js', factory('acme'));
// A scoped CommonJS package.
write('proj/node_modules/@corp/kvm-widget/package.json', JSON.stringify({ name: '@corp/kvm-widget', main: 'index.js' }));
write('proj/node_modules/@corp/kvm-widget/index.js', `module.exports = function (o) { return { name: 'widget', version: '0.0.1', apply() {}, options: o }; };\n`);
write('proj/node_modules/@corp/cjs-default/package.json', JSON.stringify({ name: '@corp/cjs-default', main: 'index.js' }));
write('proj/node_modules/@corp/cjs-default/index.js', `exports.default = (o) => ({ name: 'cjsdef', version: '0.0.1', apply() {} });\n`);
write('proj/bad/no-default.mjs', 'export const x = 1;\n');
write('proj/bad/not-plugin.mjs', 'export default () => ({ name: 3 });\n');
write('proj/bad/throws.mjs', 'export default (o) => { throw new Error(`bad level ${o.level}`); };\n');
write('proj/bad/syntax.mjs', 'export default (;\n');
write('proj/bad/frozen.mjs', `export default () => Object.freeze({ name: 'frozen', version: '1.0.0', apply() {} });\n`);
write('proj/bad/async.mjs', `export default async (o) => ({ name: 'async', version: '1.0.0', apply() {}, options: o });\n`);

const failure = kvmkitRejection;

const baseDir = path.join(root, 'proj');

describe('instantiatePlugins', () => {
  it('local path, short name of a third-party package, scoped CJS package, async factory', async () => {
    const ps = await instantiatePlugins(
      [
        { name: './plugins/mine.mjs', options: { a: 1 } },
        { name: 'acme', options: { b: 2 } },
        { name: '@corp/kvm-widget' },
        { name: '@corp/cjs-default', options: { c: 3 } },
        { name: path.join(baseDir, 'bad/async.mjs'), options: { d: 4 } },
      ],
      { baseDir },
    );
    expect(ps.map((p) => p.name)).toEqual(['mine', 'acme', 'widget', 'cjsdef', 'async']);
    expect(ps[0]!.options).toEqual({ a: 1 });
    expect(ps[1]!.options).toEqual({ b: 2 });
    expect(ps[2]!.options).toEqual({});
    expect(ps[3]!.options).toEqual({ c: 3 }); // set from the spec when the factory left it out
    expect(ps[4]!.options).toEqual({ d: 4 });
    const host = new PluginHost('0.1.0');
    for (const p of ps) host.register(p);
  });

  it('a frozen plugin object without options is accepted as is', async () => {
    const [p] = await instantiatePlugins([{ name: './bad/frozen.mjs', options: { x: 1 } }], { baseDir });
    expect(p!.name).toBe('frozen');
    expect(p!.options).toBeUndefined();
  });

  it('where names resolve to', () => {
    expect(resolvePluginModule({ name: 'acme' }, { baseDir })).toEqual({ name: 'acme', packageName: 'kvmkit-plugin-acme', file: path.join(baseDir, 'node_modules/kvmkit-plugin-acme/lib/main.js') });
    // Official plugins resolve from the config package's own node_modules when the config dir has none.
    const m = resolvePluginModule({ name: 'serial' }, { baseDir: root });
    expect(m.packageName).toBe('@kvmkit/plugin-serial');
    expect(m.file).toMatch(/plugins\/serial\/dist\/index\.js$/);
  });

  it('resolves plugins of a loaded config relative to the config file', async () => {
    write('proj/conf/kvmkit.config.json', JSON.stringify({ vms: { v: { plugins: [{ name: '../plugins/mine.mjs', options: { file: 'x.img' } }, 'acme'] } } }));
    const loaded = await loadConfig({ cwd: root, file: 'proj/conf/kvmkit.config.json' });
    const r = resolveVm(loaded);
    const ps = await instantiatePlugins(r.plugins, { baseDir: r.sources.dir, configFile: loaded.file });
    expect(ps.map((p) => p.name)).toEqual(['mine', 'acme']);
    expect(ps[0]!.options).toEqual({ file: path.join(baseDir, 'conf/x.img') });
  });

  it('unknown package → KVMKIT_ERR_PLUGIN_NOT_FOUND naming the name, config file, key path and where it looked', async () => {
    const e = await failure(instantiatePlugins([{ name: 'nosuch', from: ['vms.web.plugins[3]'] } as never], { baseDir, searchDirs: ['/opt/kvmkit-cli'], configFile: '/x/kvmkit.config.mjs' }));
    expect(e.code).toBe('KVMKIT_ERR_PLUGIN_NOT_FOUND');
    expect(e.message).toContain('plugin nosuch not found');
    expect(e.message).toContain('config /x/kvmkit.config.mjs');
    expect(e.message).toContain('vms.web.plugins[3]');
    expect(e.message).toContain('@kvmkit/plugin-nosuch, kvmkit-plugin-nosuch, nosuch');
    expect(e.message).toContain(baseDir);
    expect(e.message).toContain('/opt/kvmkit-cli');
    expect(e.details.candidates).toEqual(['@kvmkit/plugin-nosuch', 'kvmkit-plugin-nosuch', 'nosuch']);
  });

  it('missing local file → KVMKIT_ERR_PLUGIN_NOT_FOUND with its absolute path', async () => {
    const e = await failure(instantiatePlugins([{ name: './plugins/gone.mjs' }], { baseDir }));
    expect(e.code).toBe('KVMKIT_ERR_PLUGIN_NOT_FOUND');
    expect(e.message).toContain(path.join(baseDir, 'plugins/gone.mjs'));
  });

  it('node builtins are not plugins', async () => {
    const e = await failure(instantiatePlugins([{ name: 'node:fs' }], { baseDir }));
    expect(e.code).toBe('KVMKIT_ERR_PLUGIN_NOT_FOUND');
  });

  const bad: Array<[string, string, RegExp]> = [
    ['./bad/no-default.mjs', 'KVMKIT_ERR_PLUGIN_INVALID', /no default export factory/],
    ['./bad/not-plugin.mjs', 'KVMKIT_ERR_PLUGIN_INVALID', /did not return a plugin/],
    ['./bad/throws.mjs', 'KVMKIT_ERR_PLUGIN_OPTIONS', /bad level 9/],
    ['./bad/syntax.mjs', 'KVMKIT_ERR_PLUGIN_INVALID', /cannot import/],
  ];
  for (const [name, code, re] of bad) {
    it(`${name} → ${code}`, async () => {
      const e = await failure(instantiatePlugins([{ name, options: { level: 9 } }], { baseDir }));
      expect(e.code).toBe(code);
      expect(e.message).toMatch(re);
      expect(e.message).toContain(name);
    });
  }
});
