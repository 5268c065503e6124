import { describe, it, expect } from 'vitest';
import { PluginHost, checkOptions, type Plugin } from './plugin.js';
import { createHooks, tapOnly } from './hooks.js';
import { isKvmkitError } from './errors.js';

const p = (over: Partial<Plugin> = {}): Plugin => ({ name: 'a', version: '1.0.0', apply() {}, ...over });
const codeOf = (f: () => unknown) => { try { f(); return 'none'; } catch (e) { return isKvmkitError(e) ? e.code : `uncoded: ${e}`; } };

describe('PluginHost', () => {
  it('registers valid plugins and checks dependencies', () => {
    const h = new PluginHost('0.1.0');
    h.register(p({ name: 'serial', provides: ['console'] }));
    h.register(p({ name: 'virtio-blk:a', provides: ['virtio-device+'], dependencies: ['serial'] }));
    h.register(p({ name: 'virtio-blk:b', provides: ['virtio-device+'], dependencies: ['console'] }));
    expect(() => h.check()).not.toThrow();
    expect(h.provider('console')).toBe('serial');
  });
  it('raises one coded error per registration problem', () => {
    const h = new PluginHost('0.1.0');
    h.register(p({ name: 'x', provides: ['firmware'] }));
    expect(codeOf(() => h.register(p({ name: 'x' })))).toBe('KVMKIT_ERR_PLUGIN_DUPLICATE');
    expect(codeOf(() => h.register(p({ name: 'y', kernel: '^2.0.0' })))).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(codeOf(() => h.register(p({ name: 'z', provides: ['firmware'] })))).toBe('KVMKIT_ERR_PLUGIN_CONFLICT');
    expect(codeOf(() => h.register({ name: 'q' }))).toBe('KVMKIT_ERR_PLUGIN_INVALID');
    expect(codeOf(() => h.register(p({ name: 'v', version: 'one' })))).toBe('KVMKIT_ERR_PLUGIN_INVALID');
    expect(codeOf(() => h.register(p({ name: 'o', options: { bad: 1 }, validateOptions(o) { checkOptions('o', o, { good: { type: 'string' } }); } })))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(codeOf(() => h.register(p({ name: 'o2', validateOptions() { throw new Error('nope'); } })))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    h.register(p({ name: 'needs', dependencies: ['missing'] }));
    expect(codeOf(() => h.check())).toBe('KVMKIT_ERR_PLUGIN_DEPENDENCY');
  });
  it('checks versions and kernel ranges as semver does (plain X.Y.Z / ^X.Y.Z decided without loading semver)', () => {
    const ok = (kernel: string, range: string, version = '1.0.0') => codeOf(() => new PluginHost(kernel).register(p({ name: 'k', kernel: range, version })));
    expect(ok('0.1.0', '^0.1.0')).toBe('none');
    expect(ok('0.1.7', '^0.1.2')).toBe('none');
    expect(ok('0.1.1', '^0.1.2')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(ok('0.2.0', '^0.1.0')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(ok('0.0.3', '^0.0.3')).toBe('none');
    expect(ok('0.0.4', '^0.0.3')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(ok('1.9.0', '^1.2.3')).toBe('none');
    expect(ok('2.0.0', '^1.2.3')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(ok('1.2.2', '^1.2.3')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    // Other ranges and versions go to semver itself.
    expect(ok('0.1.0', '>=0.1.0 <0.2.0')).toBe('none');
    expect(ok('0.1.0', '0.1.x')).toBe('none');
    expect(ok('0.2.0-rc.1', '^0.2.0-rc.0')).toBe('none');
    expect(ok('0.1.0', 'not a range')).toBe('KVMKIT_ERR_PLUGIN_VERSION');
    expect(ok('0.1.0', '^0.1.0', 'v1.0.0')).toBe('none');
    expect(ok('0.1.0', '^0.1.0', '1.0.0-beta.1')).toBe('none');
    expect(ok('0.1.0', '^0.1.0', '1.0')).toBe('KVMKIT_ERR_PLUGIN_INVALID');
    expect(ok('0.1.0', '^0.1.0', '01.0.0')).toBe('KVMKIT_ERR_PLUGIN_INVALID');
  });
  it('a failed registration leaves nothing behind', () => {
    const h = new PluginHost('0.1.0');
    expect(codeOf(() => h.register(p({ name: 'bad', provides: ['firmware'], validateOptions() { throw new Error('x'); } })))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(h.list()).toHaveLength(0);
    expect(h.provider('firmware')).toBeUndefined();
  });
});

describe('checkOptions', () => {
  it('checks types, literals, required and unknown keys', () => {
    const schema = { port: { type: 'integer' as const, required: true }, mode: { type: ['a', 'b'] as const }, on: { type: 'boolean' as const } };
    expect(codeOf(() => checkOptions('t', { port: 1, mode: 'a', on: true }, schema))).toBe('none');
    expect(codeOf(() => checkOptions('t', {}, schema))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(codeOf(() => checkOptions('t', { port: 1.5 }, schema))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(codeOf(() => checkOptions('t', { port: 1, mode: 'c' }, schema))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(codeOf(() => checkOptions('t', { port: 1, extra: 1 }, schema))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    expect(codeOf(() => checkOptions('t', 'str', schema))).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
  });
});

describe('hooks', () => {
  it('plugins get tap-only, frozen views', () => {
    const hooks = createHooks();
    const view = tapOnly(hooks);
    expect(Object.isFrozen(view)).toBe(true);
    expect((view.configure as unknown as { call?: unknown }).call).toBeUndefined();
    expect((view.boot as unknown as { promise?: unknown }).promise).toBeUndefined();
    view.configure.tap('x', (c) => ({ ...c, cpus: 4 }));
    expect(hooks.configure.call({ name: 'm', memory: 1, cpus: 1 }).cpus).toBe(4);
    view.snapshotStrategy.for('full').tap('snap', () => ({ name: 'full', run: async () => 1 }));
    expect(hooks.snapshotStrategy.for('full').call()?.name).toBe('full');
    expect(() => (view.validate as unknown as { tapPromise: () => void }).tapPromise()).toThrow(/not supported|synchronous/);
  });
});
