import { describe, expect, it } from 'vitest';
import { isKvmkitError, validateMachineConfig } from '@kvmkit/kernel';
import { chooseHost, fromObject, globToRegExp, mergeOptions, pluginKey, rebasePaths, resolveVm } from './index.js';

const FILE = '/cfg/dir/kvmkit.config.mjs';
const noModules = () => false;

const example = {
  vms: {
    web: {
      memory: 256,
      cpus: 2,
      cmdline: 'root=/dev/vda',
      plugins: ['serial', { name: '@kvmkit/plugin-boot-linux', options: { kernel: './vmlinux', initrd: 'images/initrd.cpio' } }, { name: 'hugepages', options: { mode: 'off', sizes: { '2M': 4 } } }],
    },
    db: { plugins: ['serial'] },
  },
  hosts: {
    laptop: { match: { hostname: 'laptop*' }, plugins: [{ name: 'hugepages', options: { mode: 'thp', sizes: { '1G': 1 } } }] },
    nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'], remove: ['hugepages', '@kvmkit/plugin-virtio-net'] },
    lab: { match: { hostname: ['lab-?', 'LAB-BIG'], kvmModule: ['kvm', 'kvm_intel'] }, plugins: ['./local/pin.mjs'] },
    manual: { plugins: [{ name: 'serial', options: { output: './serial.log' } }] },
    default: { plugins: [] },
  },
};
const loaded = fromObject(FILE, example);

describe('resolveVm: host choice', () => {
  it('matches by hostname glob, first match in file order', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'laptop-7', moduleLoaded: () => true });
    expect(r.host).toBe('laptop');
    expect(r.sources.host).toEqual({ name: 'laptop', by: 'match', reason: 'hostname "laptop-7" matches "laptop*"' });
  });

  it('matches by module presence', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'box', moduleLoaded: (m) => m === 'kvm_pvm' });
    expect(r.host).toBe('nested');
    expect(r.sources.host.reason).toBe('kernel module kvm_pvm loaded');
  });

  it('needs every condition of a match (hostname list + all modules)', () => {
    expect(resolveVm(loaded, { vm: 'web', hostname: 'lab-3', moduleLoaded: (m) => m === 'kvm' }).host).toBe('default');
    const r = resolveVm(loaded, { vm: 'web', hostname: 'lab-big', moduleLoaded: (m) => m === 'kvm' || m === 'kvm_intel' });
    expect(r.host).toBe('lab');
    expect(r.sources.host.reason).toBe('hostname "lab-big" matches "LAB-BIG" and kernel modules kvm, kvm_intel loaded');
  });

  it('a host without match is only chosen by --host', () => {
    expect(resolveVm(loaded, { vm: 'web', hostname: 'manual', moduleLoaded: noModules }).host).toBe('default');
    const r = resolveVm(loaded, { vm: 'web', host: 'manual', hostname: 'laptop1', moduleLoaded: () => true });
    expect(r.host).toBe('manual');
    expect(r.sources.host).toEqual({ name: 'manual', by: 'flag', reason: '--host manual' });
  });

  it('falls back to default, then to none', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'other', moduleLoaded: noModules });
    expect(r.sources.host.by).toBe('default');
    const noDefault = fromObject(FILE, { vms: { a: {} }, hosts: { x: { match: { hostname: 'x' } } } });
    const c = chooseHost(noDefault, { hostname: 'y', moduleLoaded: noModules });
    expect(c).toMatchObject({ name: undefined, by: 'none' });
    expect(chooseHost(fromObject(FILE, { vms: { a: {} } }), { hostname: 'y' })).toEqual({ name: undefined, by: 'none', reason: 'the config defines no hosts' });
  });

  it('an explicit --host that does not exist is KVMKIT_ERR_CONFIG_HOST naming the known hosts', () => {
    let err: unknown;
    try {
      resolveVm(loaded, { vm: 'web', host: 'moon' });
    } catch (e) {
      err = e;
    }
    expect(isKvmkitError(err, 'KVMKIT_ERR_CONFIG_HOST')).toBe(true);
    const e = err as { message: string; details: Record<string, unknown> };
    expect(e.message).toContain(FILE);
    expect(e.message).toContain('laptop, nested, lab, manual, default');
    expect(e.details.path).toBe('hosts.moon');
    expect(() => resolveVm(fromObject(FILE, { vms: { a: {} } }), { host: 'x' })).toThrow(/defines no hosts/);
  });

  it('globs: * and ? only, everything else literal, case-insensitive', () => {
    expect(globToRegExp('web-*.example.com').test('WEB-1.example.com')).toBe(true);
    expect(globToRegExp('web-*.example.com').test('web-1xexample.com')).toBe(false);
    expect(globToRegExp('n?').test('n1')).toBe(true);
    expect(globToRegExp('n?').test('n12')).toBe(false);
    expect(globToRegExp('a[b]').test('a[b]')).toBe(true);
  });
});

describe('resolveVm: plugins', () => {
  it('VM plugins alone on a host with no plugins; names and paths normalised', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'other', moduleLoaded: noModules });
    expect(r.plugins.map((p) => p.name)).toEqual(['serial', '@kvmkit/plugin-boot-linux', 'hugepages']);
    expect(r.plugins.map((p) => p.key)).toEqual(['@kvmkit/plugin-serial', '@kvmkit/plugin-boot-linux', '@kvmkit/plugin-hugepages']);
    expect(r.plugins[1]!.options).toEqual({ kernel: '/cfg/dir/vmlinux', initrd: '/cfg/dir/images/initrd.cpio' });
    expect(r.plugins[1]!.from).toEqual(['vms.web.plugins[1]']);
    expect(r.machineConfig).toEqual({
      name: 'web', memory: 256, cpus: 2, cmdline: 'root=/dev/vda',
      plugins: r.plugins.map((p) => ({ name: p.name, options: p.options })),
    });
    validateMachineConfig(r.machineConfig);
  });

  it('host options merge over the VM entry of the same plugin (short and full names are one plugin)', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'laptop', moduleLoaded: noModules });
    const hp = r.plugins.find((p) => p.key === '@kvmkit/plugin-hugepages')!;
    expect(hp.options).toEqual({ mode: 'thp', sizes: { '2M': 4, '1G': 1 } });
    expect(hp.from).toEqual(['vms.web.plugins[2]', 'hosts.laptop.plugins[0]']);
    expect(r.plugins.map((p) => p.name)).toEqual(['serial', '@kvmkit/plugin-boot-linux', 'hugepages']);
  });

  it('host plugins are appended; remove drops VM plugins and reports what it did', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'x', moduleLoaded: (m) => m === 'kvm_pvm' });
    expect(r.plugins.map((p) => p.key)).toEqual(['@kvmkit/plugin-serial', '@kvmkit/plugin-boot-linux', '@kvmkit/plugin-host-pvm']);
    expect(r.sources.removed).toEqual([
      { name: 'hugepages', key: '@kvmkit/plugin-hugepages', by: 'hosts.nested.remove[0]', present: true },
      { name: '@kvmkit/plugin-virtio-net', key: '@kvmkit/plugin-virtio-net', by: 'hosts.nested.remove[1]', present: false },
    ]);
    expect(r.machineConfig.plugins!.map((p) => p.name)).toEqual(['serial', '@kvmkit/plugin-boot-linux', 'host-pvm']);
  });

  it('local plugin paths become absolute against the config directory', () => {
    const r = resolveVm(loaded, { vm: 'web', hostname: 'lab-1', moduleLoaded: () => true });
    // lab matches after laptop/nested? nested matches first (kvm_pvm "loaded") — file order wins
    expect(r.host).toBe('nested');
    const r2 = resolveVm(loaded, { vm: 'web', host: 'lab' });
    expect(r2.plugins.at(-1)).toMatchObject({ name: '/cfg/dir/local/pin.mjs', key: '/cfg/dir/local/pin.mjs', from: ['hosts.lab.plugins[0]'] });
  });

  it('options paths of host plugins are rebased too', () => {
    const r = resolveVm(loaded, { vm: 'db', host: 'manual' });
    expect(r.plugins).toEqual([{ name: 'serial', key: '@kvmkit/plugin-serial', options: { output: '/cfg/dir/serial.log' }, from: ['vms.db.plugins[0]', 'hosts.manual.plugins[0]'] }]);
    expect(r.machineConfig.memory).toBe(256);
    expect(r.machineConfig.cpus).toBe(1);
    expect(r.sources.settings).toEqual({ memory: 'default', cpus: 'default' });
  });

  it('the same plugin twice in one list is an error naming both places', () => {
    const c = fromObject(FILE, { vms: { a: { plugins: ['serial', '@kvmkit/plugin-serial'] } } });
    expect(() => resolveVm(c)).toThrow(/vms\.a\.plugins\[1\] lists plugin @kvmkit\/plugin-serial again \(already at vms\.a\.plugins\[0\]\)/);
  });

  it('VM choice: the only VM by default; several need a name; unknown name is KVMKIT_ERR_CONFIG', () => {
    expect(resolveVm(fromObject(FILE, { vms: { solo: {} } })).machineConfig.name).toBe('solo');
    expect(() => resolveVm(loaded, { hostname: 'x' })).toThrow(/defines 2 VMs \(web, db\); name the one to use/);
    try {
      resolveVm(loaded, { vm: 'mail' });
      expect.unreachable();
    } catch (e) {
      expect(isKvmkitError(e, 'KVMKIT_ERR_CONFIG')).toBe(true);
      expect((e as { details: { path: string } }).details.path).toBe('vms.mail');
    }
  });
});

describe('path rebasing rule', () => {
  it('rebases ./ and ../ anywhere, known keys and *Path/*File/*Dir keys when relative', () => {
    const out = rebasePaths({
      kernel: 'vmlinux', initrd: '/abs/initrd', file: 'disk.img', path: '-', image: 'tcp:host:1',
      statePath: 'state/s.bin', memoryFile: '~/mem', socketDir: 'run',
      label: './x', name: 'plain', mode: 'thp', count: 3, flag: true,
      disks: [{ file: 'a.img' }, { file: '../b.img' }], file2: 'not-a-key',
      nested: { deep: { kernel: 'k' } },
    }, '/base/cfg');
    expect(out).toEqual({
      kernel: '/base/cfg/vmlinux', initrd: '/abs/initrd', file: '/base/cfg/disk.img', path: '-', image: 'tcp:host:1',
      statePath: '/base/cfg/state/s.bin', memoryFile: '~/mem', socketDir: '/base/cfg/run',
      label: '/base/cfg/x', name: 'plain', mode: 'thp', count: 3, flag: true,
      disks: [{ file: '/base/cfg/a.img' }, { file: '/base/b.img' }], file2: 'not-a-key',
      nested: { deep: { kernel: '/base/cfg/k' } },
    });
  });

  it('does not modify its input and keeps non-plain values by reference', () => {
    const fn = () => 1;
    const input = { kernel: 'k', cb: fn, list: ['./a'] };
    const out = rebasePaths(input, '/b');
    expect(input).toEqual({ kernel: 'k', cb: fn, list: ['./a'] });
    expect(out.cb).toBe(fn);
    expect(out.list).toEqual(['/b/a']);
  });

  it('mergeOptions: objects deep, arrays and scalars replaced', () => {
    expect(mergeOptions({ a: 1, o: { x: 1, y: [1] }, l: [1, 2] }, { o: { y: [3] }, l: [9], b: 2 })).toEqual({ a: 1, o: { x: 1, y: [3] }, l: [9], b: 2 });
  });

  it('pluginKey', () => {
    expect(pluginKey('serial', '/d')).toBe('@kvmkit/plugin-serial');
    expect(pluginKey('@kvmkit/plugin-serial', '/d')).toBe('@kvmkit/plugin-serial');
    expect(pluginKey('@acme/kvm-thing', '/d')).toBe('@acme/kvm-thing');
    expect(pluginKey('./p.mjs', '/d')).toBe('/d/p.mjs');
    expect(pluginKey('/abs/p.mjs', '/d')).toBe('/abs/p.mjs');
  });
});
