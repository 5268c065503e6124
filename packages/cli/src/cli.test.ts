import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { parseCli, parsePluginFlag, parseRunArgs } from './args.js';
import { exitCodeOf } from './run.js';
import { findGuestKernel, guestKernelHelp } from '@kvmkit/testkit';

const BIN = fileURLToPath(new URL('../dist/bin.js', import.meta.url));
const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[kvmkit cli] /dev/kvm not present: doctor/run tests on KVM are skipped');

const root = realpathSync(mkdtempSync(path.join(os.tmpdir(), 'kvmkit-cli-')));
afterAll(() => rmSync(root, { recursive: true, force: true }));
// The `kvmkit run` children serve their control socket under $XDG_RUNTIME_DIR/kvmkit: a directory of this test
// file's own, so that another test run on the same machine (VM names like `vm` repeat) cannot collide with it.
process.env.XDG_RUNTIME_DIR = path.join(root, 'xdg-runtime');
mkdirSync(process.env.XDG_RUNTIME_DIR, { recursive: true, mode: 0o700 });
let n = 0;
function project(files: Record<string, string | Uint8Array>): string {
  const d = path.join(root, `p${n++}`);
  mkdirSync(d, { recursive: true });
  writeFileSync(path.join(d, 'package.json'), '{"name":"t","private":true,"type":"module"}');
  for (const [f, c] of Object.entries(files)) {
    mkdirSync(path.dirname(path.join(d, f)), { recursive: true });
    writeFileSync(path.join(d, f), c);
  }
  return d;
}

function kvmkit(args: string[], cwd: string, timeout = 60_000) {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd, encoding: 'utf8', timeout, env: { ...process.env, KVMKIT_LOG_LEVEL: 'warn' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, signal: r.signal };
}

describe('argument parsing', () => {
  it('run: flags, repeatable --plugin with JSON options, one positional', () => {
    const a = parseRunArgs(['web', '--memory', '512', '--cpus=2', '--kernel', 'k', '--initrd', 'i', '--cmdline', 'a=b c', '--plugin', 'serial', '-p', './x.mjs:{"a":{"b":1}}', '--host', 'lab', '--log-level', 'debug', '--no-defaults', '--dry-run']);
    expect(a).toEqual({
      command: 'run', help: false, vm: 'web', config: undefined, host: 'lab', memory: 512, cpus: 2, kernel: 'k', initrd: 'i', cmdline: 'a=b c',
      plugins: [{ name: 'serial', options: {}, raw: 'serial' }, { name: './x.mjs', options: { a: { b: 1 } }, raw: './x.mjs:{"a":{"b":1}}' }],
      noDefaults: true, logLevel: 'debug', dryRun: true, noControl: false, lazy: false,
    });
  });

  it('run --vm NAME is the same as the positional name', () => {
    expect(parseRunArgs(['--vm', 'web']).vm).toBe('web');
    expect(parseRunArgs(['web', '--vm', 'web']).vm).toBe('web');
  });

  it('--plugin JSON may contain colons; the name ends at the first one', () => {
    expect(parsePluginFlag('serial:{"output":{"file":"c:/x"}}')).toEqual({ name: 'serial', options: { output: { file: 'c:/x' } }, raw: 'serial:{"output":{"file":"c:/x"}}' });
  });

  const bad: Array<[string[], RegExp]> = [
    [['run', '--plugin', 'serial:{bad'], /--plugin serial: options are not valid JSON/],
    [['run', '--plugin', 'serial:[1]'], /must be a JSON object/],
    [['run', '--plugin', ':{}'], /expected NAME/],
    [['run', '--memory', '12x'], /--memory must be an integer in 1\.\.1048576/],
    [['run', '--cpus', '0'], /--cpus must be an integer/],
    [['run', '--log-level', 'loud'], /--log-level must be one of/],
    [['run', '--frobnicate'], /run: Unknown option '--frobnicate'/],
    [['run', 'a', 'b'], /one VM name at most/],
    [['run', 'a', '--vm', 'b'], /two different VM names \(a and --vm b\)/],
    [['run', '--memory'], /run: Option '-m, --memory <value>' argument missing/],
    [['config'], /nothing to do; use kvmkit config --print/],
    [['config', '--print', 'web'], /use --vm NAME/],
    [['doctor', 'x'], /unexpected argument/],
    [['launch'], /unknown command "launch"/],
    [['--verbose'], /unknown option --verbose/],
  ];
  for (const [argv, re] of bad) {
    it(`usage error: ${argv.join(' ')}`, () => {
      try {
        parseCli(argv);
        expect.unreachable();
      } catch (e) {
        expect((e as { code: string }).code).toBe('KVMKIT_ERR_CLI_USAGE');
        expect((e as Error).message).toMatch(re);
      }
    });
  }

  it('top level: help, version', () => {
    expect(parseCli([])).toEqual({ command: 'help' });
    expect(parseCli(['help', 'run'])).toEqual({ command: 'help', topic: 'run' });
    expect(parseCli(['-V'])).toEqual({ command: 'version' });
    expect(parseCli(['doctor', '--json'])).toEqual({ command: 'doctor', help: false, json: true });
  });

  it('exit code of a stop reason', () => {
    expect(exitCodeOf({ reason: 'guest-exit', exitCode: 42 })).toBe(42);
    expect(exitCodeOf({ reason: 'halt', exitCode: 0 })).toBe(0);
    expect(exitCodeOf({ reason: 'triple-fault', exitCode: 0 })).toBe(1);
    expect(exitCodeOf({ reason: 'error', exitCode: 1 })).toBe(1);
  });
});

describe('the kvmkit bin entry', () => {
  it('is a committed, executable file outside dist/ (npm ci links bins before prepare builds dist/) and runs the CLI', () => {
    const pkgDir = fileURLToPath(new URL('..', import.meta.url));
    const pkg = JSON.parse(readFileSync(path.join(pkgDir, 'package.json'), 'utf8')) as { bin: { kvmkit: string } };
    const bin = path.join(pkgDir, pkg.bin.kvmkit);
    expect(path.relative(pkgDir, bin).startsWith('dist')).toBe(false);
    expect(statSync(bin).mode & 0o111).toBe(0o111);
    const r = spawnSync(process.execPath, [bin, '--version'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/\d+\.\d+\.\d+/);
  });
});

describe('kvmkit (spawned bin)', () => {
  it('--version and --help for every command', () => {
    const v = kvmkit(['--version'], root);
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(/^kvmkit \d+\.\d+\.\d+\n$/);
    const h = kvmkit(['--help'], root);
    expect(h.code).toBe(0);
    expect(h.stdout).toContain('Usage: kvmkit <command>');
    for (const [cmd, text] of [['run', 'serial and platform-pc plugins by default'], ['config', 'Usage: kvmkit config --print'], ['doctor', 'Usage: kvmkit doctor']] as const) {
      const r = kvmkit([cmd, '--help'], root);
      expect(r.code).toBe(0);
      expect(r.stdout).toContain(text);
      expect(kvmkit(['help', cmd], root).stdout).toBe(r.stdout);
    }
    expect(kvmkit(['help', 'nope'], root).code).toBe(2);
  });

  it('unknown command / bad flag: exit 2 with a coded message', () => {
    const r = kvmkit(['launch'], root);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_CLI_USAGE: unknown command "launch"/);
  });

  it('bad JSON in --plugin: exit 2', () => {
    const r = kvmkit(['run', '--plugin', 'serial:{oops}'], root);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_CLI_USAGE: --plugin serial: options are not valid JSON/);
  });

  it('missing config: exit 2, KVMKIT_ERR_CONFIG_NOT_FOUND', () => {
    const d = project({});
    const r = kvmkit(['config', '--print'], d);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_CONFIG_NOT_FOUND: no kvmkit config found/);
    expect(r.stderr).toContain(d);
    const r2 = kvmkit(['run', 'web', '--config', 'nope.mjs'], d);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toContain(`error KVMKIT_ERR_CONFIG_NOT_FOUND: config file ${path.join(d, 'nope.mjs')} does not exist`);
  });

  it('invalid config: exit 2 naming file and key path', () => {
    const d = project({ 'kvmkit.config.yaml': 'vms:\n  web:\n    memory: lots\n' });
    const r = kvmkit(['run', 'web', '--dry-run'], d);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`error KVMKIT_ERR_CONFIG: ${path.join(d, 'kvmkit.config.yaml')}:3: vms.web.memory must be guest RAM in MiB (an integer in 1..1048576) (got "lots")\n`);
  });

  it('unknown --host: exit 2, KVMKIT_ERR_CONFIG_HOST', () => {
    const d = project({ 'kvmkit.config.json': JSON.stringify({ vms: { web: {} }, hosts: { lab: {} } }) });
    const r = kvmkit(['config', '--print', '--host', 'moon'], d);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_CONFIG_HOST: .*--host moon: no such host section \(hosts\.moon\); known hosts: lab/);
  });

  it('unknown plugin: exit 2, KVMKIT_ERR_PLUGIN_NOT_FOUND naming the config file and where it looked', () => {
    const d = project({ 'kvmkit.config.json': JSON.stringify({ vms: { web: { plugins: ['serial', 'warp-drive'] } } }) });
    const r = kvmkit(['run', 'web'], d);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_PLUGIN_NOT_FOUND: plugin warp-drive not found/);
    expect(r.stderr).toContain(`config ${path.join(d, 'kvmkit.config.json')}`);
    expect(r.stderr).toContain('vms.web.plugins[1]');
    expect(r.stderr).toContain('@kvmkit/plugin-warp-drive, kvmkit-plugin-warp-drive, warp-drive');
    expect(r.stderr).toContain(d);
    const f = kvmkit(['run', '--no-defaults', '--plugin', './nope.mjs'], d);
    expect(f.code).toBe(2);
    expect(f.stderr).toContain(`error KVMKIT_ERR_PLUGIN_NOT_FOUND: plugin ${path.join(d, 'nope.mjs')} not found (at --plugin ./nope.mjs)`);
  });

  it('config --print: resolved VM, plugins with options and sources, host chosen and why', () => {
    const d = project({
      'vms/kvmkit.config.mjs': `export default {
        vms: { web: { memory: 512, cpus: 2, cmdline: 'root=/dev/vda', plugins: ['serial', { name: 'boot-linux', options: { kernel: './vmlinux' } }, 'hugepages'] } },
        hosts: {
          lab: { match: { hostname: 'lab-*' }, plugins: [{ name: 'serial', options: { output: { file: 'console.log' } } }] },
          nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'], remove: ['hugepages'] },
          default: { plugins: [] },
        },
      };\n`,
    });
    const r = kvmkit(['config', '--print', '--hostname', 'lab-7'], path.join(d, 'vms'));
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    // Where each plugin resolves: serial from the CLI's dependencies; hugepages is not installed here.
    expect(j.plugins[0].module).toMatch(/plugins\/serial\/dist\/index\.js$/);
    const hp = j.plugins[2];
    if (hp.module === null) expect(hp.error).toMatch(/^KVMKIT_ERR_PLUGIN_NOT_FOUND: plugin hugepages not found/);
    for (const p of j.plugins) {
      delete p.module;
      delete p.error;
    }
    expect(j).toEqual({
      config: path.join(d, 'vms/kvmkit.config.mjs'),
      mode: 'config',
      vm: { name: 'web', memory: 512, cpus: 2, cmdline: 'root=/dev/vda' },
      host: { name: 'lab', chosenBy: 'match', reason: 'hostname "lab-7" matches "lab-*"' },
      plugins: [
        { name: 'serial', key: '@kvmkit/plugin-serial', options: { output: { file: path.join(d, 'vms/console.log') } }, from: ['vms.web.plugins[0]', 'hosts.lab.plugins[0]'] },
        { name: 'boot-linux', key: '@kvmkit/plugin-boot-linux', options: { kernel: path.join(d, 'vms/vmlinux') }, from: ['vms.web.plugins[1]'] },
        { name: 'hugepages', key: '@kvmkit/plugin-hugepages', options: {}, from: ['vms.web.plugins[2]'] },
      ],
      removed: [],
      settings: { memory: 'vms.web.memory', cpus: 'vms.web.cpus', cmdline: 'vms.web.cmdline' },
    });
    const h = JSON.parse(kvmkit(['config', '--print', '--host', 'nested', '--vm', 'web'], path.join(d, 'vms')).stdout);
    expect(h.host).toEqual({ name: 'nested', chosenBy: 'flag', reason: '--host nested' });
    expect(h.plugins.map((p: { name: string }) => p.name)).toEqual(['serial', 'boot-linux', 'host-pvm']);
    expect(h.removed).toEqual([{ name: 'hugepages', key: '@kvmkit/plugin-hugepages', by: 'hosts.nested.remove[0]', present: true }]);
    const dflt = JSON.parse(kvmkit(['config', '--print', '--hostname', 'elsewhere'], path.join(d, 'vms')).stdout);
    // On this machine kvm_pvm is loaded, so "nested" matches; elsewhere "default".
    expect(dflt.host.name).toBe(existsSync('/sys/module/kvm_pvm') ? 'nested' : 'default');
  });

  it('run --dry-run: flags override config values and merge plugin options; flag-only mode adds serial + platform-pc', () => {
    const d = project({ 'kvmkit.config.json': JSON.stringify({ vms: { web: { memory: 64, cmdline: 'a', plugins: [{ name: 'boot-linux', options: { kernel: 'old', initrd: 'i.cpio' } }] } } }) });
    const r = kvmkit(['run', 'web', '--dry-run', '--memory', '128', '--kernel', 'new/vmlinux', '--cmdline', 'b', '--plugin', 'serial:{"output":"none"}'], d);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    for (const p of j.plugins) delete p.module;
    expect(j.vm).toEqual({ name: 'web', memory: 128, cpus: 1, cmdline: 'b' });
    expect(j.settings).toEqual({ memory: '--memory', cpus: 'default', cmdline: '--cmdline' });
    expect(j.plugins).toEqual([
      { name: 'boot-linux', key: '@kvmkit/plugin-boot-linux', options: { kernel: path.join(d, 'new/vmlinux'), initrd: path.join(d, 'i.cpio') }, from: ['vms.web.plugins[0]', '--kernel'] },
      { name: 'serial', key: '@kvmkit/plugin-serial', options: { output: 'none' }, from: ['--plugin serial:{"output":"none"}'] },
    ]);
    const f = JSON.parse(kvmkit(['run', '--dry-run', '--kernel', 'vmlinux', '--initrd', 'x.cpio', '--cpus', '2'], d).stdout);
    expect(f.mode).toBe('flags');
    expect(f.config).toBeNull();
    expect(f.vm).toEqual({ name: 'vm', memory: 256, cpus: 2 });
    expect(f.plugins.map((p: { key: string }) => p.key)).toEqual(['@kvmkit/plugin-serial', '@kvmkit/plugin-platform-pc', '@kvmkit/plugin-boot-linux']);
    expect(f.plugins[2].options).toEqual({ kernel: path.join(d, 'vmlinux'), initrd: path.join(d, 'x.cpio') });
    // --host means config mode even with --kernel: the single VM of the file, plus the kernel flag.
    const hostFlag = kvmkit(['run', '--dry-run', '--host', 'nope', '--kernel', 'vmlinux'], d);
    expect(hostFlag.code).toBe(2);
    expect(hostFlag.stderr).toMatch(/^error KVMKIT_ERR_CONFIG_HOST: .*the file defines no hosts/);
    const bare = JSON.parse(kvmkit(['run', '--dry-run', '--no-defaults', '--plugin', 'boot-flat:{"image":"g.bin"}'], d).stdout);
    expect(bare.plugins[0].module).toMatch(/plugins\/boot-flat\/dist\/index\.js$/);
    delete bare.plugins[0].module;
    expect(bare.plugins).toEqual([{ name: 'boot-flat', key: '@kvmkit/plugin-boot-flat', options: { image: path.join(d, 'g.bin') }, from: ['--plugin boot-flat:{"image":"g.bin"}'] }]);
  });

  it.skipIf(!hasKvm)('doctor on this machine: usable, API 12, required capabilities present', () => {
    const r = kvmkit(['doctor', '--json'], root);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.usable).toBe(true);
    expect(j.device).toMatchObject({ path: '/dev/kvm', exists: true, accessible: true });
    expect(j.apiVersion).toBe(12);
    expect(j.capabilities.missingRequired).toEqual([]);
    for (const c of ['IRQCHIP', 'USER_MEMORY', 'SET_TSS_ADDR', 'EXT_CPUID', 'IOEVENTFD', 'IRQFD', 'PIT2', 'IMMEDIATE_EXIT']) expect(j.capabilities.required[c]).toBeGreaterThan(0);
    expect(j.limits.vcpuMmapSize).toBeGreaterThan(0);
    expect(j.nestedPvm.detected).toBe(existsSync('/sys/module/kvm_pvm'));
    const t = kvmkit(['doctor'], root);
    expect(t.code).toBe(0);
    expect(t.stdout).toContain('ok    KVM API version 12');
    expect(t.stdout).toContain('kvmkit can run VMs on this host.');
    if (j.nestedPvm.detected) expect(t.stdout).toContain("hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] } }");
    // Nested virtualization and CPUID control come from the nested-virt and cpu-template plugins.
    expect(j.nested).toMatchObject({ supported: expect.any(Boolean), stateSize: expect.any(Number) });
    expect(j.cpuid).toMatchObject({ honoured: expect.any(Boolean), detail: expect.any(String) });
    expect(t.stdout).toMatch(/(ok|warn) {2,4}nested virtualization: /);
    expect(t.stdout).toMatch(/(ok|warn) {2,4}guest CPUID follows KVM_SET_CPUID2: /);
    if (j.nestedPvm.detected) expect(j.nested.supported).toBe(false); // kvm_pvm: no VMX/SVM for guests
  });

  it('doctor with an unusable device: exit 1, FAIL lines', () => {
    const r = spawnSync(process.execPath, [BIN, 'doctor'], { cwd: root, encoding: 'utf8', env: { ...process.env, KVMKIT_KVM_DEVICE: path.join(root, 'no-such-kvm') } });
    expect(r.status).toBe(1);
    expect(r.stdout).toContain(`FAIL  ${path.join(root, 'no-such-kvm')} exists: missing`);
    expect(r.stdout).toContain('kvmkit cannot run VMs on this host');
  });
});

// A debug-exit device written as a local plugin file: exercises ./path plugin names and exit codes.
const EXIT_PLUGIN = `export default function exitPort() {
  return { name: 'test-exit', version: '0.1.0', apply(m) {
    m.hooks.devices.tap('test-exit', (reg) => reg.addPio(0xf4, 1, { read() {}, write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0] }) }, 'test-exit'));
  } };
}\n`;
// boot-flat's validateOptions currently rejects a string `image` (checkOptions type 'object'), so the tests load the
// bytes through this local wrapper plugin (its `file` option is a path option, rebased to the config directory).
const BOOT_FLAT = new URL('../../../plugins/boot-flat/dist/index.js', import.meta.url).href;
const FLAT_PLUGIN = `import { readFileSync } from 'node:fs';
import bootFlat from ${JSON.stringify(BOOT_FLAT)};
export default function flat(o) { return bootFlat({ image: new Uint8Array(readFileSync(o.file)) }); }\n`;
// Ring-0 flat guests (boot-flat loads them at 0x100000 in long mode).
const HELLO_EXIT_42 = Uint8Array.from([
  0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
  0xb0, 0x68, 0xee, 0xb0, 0x69, 0xee, 0xb0, 0x0a, 0xee, // "hi\n" to the UART
  0xb0, 0x2a, 0xe6, 0xf4, // out 0xf4, 42
  0xf4, 0xeb, 0xfd, // hlt; jmp
]);
// Counts boots in the module (imported once per process, instantiated once per boot): resets twice, then exits 7.
const REBOOT_PLUGIN = `let boots = 0;
export default function rebooter() {
  const boot = ++boots;
  return { name: 'rebooter', version: '0.1.0', apply(m) {
    m.hooks.devices.tap('rebooter', (reg) => reg.addPio(0xf4, 1, { read() {}, write: () => boot < 3 ? m.requestReset('test') : m.requestStop({ reason: 'guest-exit', exitCode: 7 }) }, 'rebooter'));
  } };
}\n`;
const HALT = Uint8Array.from([0xf4, 0xeb, 0xfd]);
const UD2 = Uint8Array.from([0x0f, 0x0b]);
const SPIN = Uint8Array.from([0xeb, 0xfe]);

describe.skipIf(!hasKvm)('kvmkit run on /dev/kvm (boot-flat guests)', () => {
  const d = project({
    'exit-port.mjs': EXIT_PLUGIN,
    'flat.mjs': FLAT_PLUGIN,
    'rebooter.mjs': REBOOT_PLUGIN,
    'hello.bin': HELLO_EXIT_42,
    'halt.bin': HALT,
    'ud2.bin': UD2,
    'spin.bin': SPIN,
    'kvmkit.config.json': JSON.stringify({
      vms: {
        hello: { memory: 16, plugins: [{ name: './flat.mjs', options: { file: 'hello.bin' } }, 'serial', './exit-port.mjs'] },
        halt: { memory: 16, cpus: 2, plugins: [{ name: './flat.mjs', options: { file: './halt.bin' } }] },
        crash: { memory: 16, plugins: [{ name: './flat.mjs', options: { file: './ud2.bin' } }] },
        reboot: { memory: 16, onReset: 'reboot', plugins: [{ name: './flat.mjs', options: { file: 'hello.bin' } }, './rebooter.mjs'] },
        resetstop: { memory: 16, plugins: [{ name: './flat.mjs', options: { file: 'hello.bin' } }, './rebooter.mjs'] },
        spin: { memory: 16, plugins: [{ name: './flat.mjs', options: { file: './spin.bin' } }] },
      },
    }),
  });

  it('guest debug-exit value becomes the exit code; serial output reaches stdout', () => {
    const r = kvmkit(['run', 'hello'], d);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('hi\n');
    expect(r.code).toBe(42);
  });

  it('flag-only mode with --no-defaults and local/package plugins', () => {
    const r = kvmkit(['run', '--no-defaults', '--memory', '16', '--plugin', `./flat.mjs:{"file":"hello.bin"}`, '--plugin', 'serial', '--plugin', './exit-port.mjs'], d);
    expect(r.stdout).toBe('hi\n');
    expect(r.code).toBe(42);
  });

  it('flag-only mode with the default plugins: serial + platform-pc (its debug-exit port gives the exit code)', () => {
    const r = kvmkit(['run', '--memory', '16', '--plugin', `./flat.mjs:{"file":"hello.bin"}`], d);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('hi\n');
    expect(r.code).toBe(42);
  });

  it("onReset 'reboot': a guest reset starts a fresh machine (fresh plugins); 'stop' (default) exits 0", () => {
    const r = spawnSync(process.execPath, [BIN, 'run', 'reboot', '--log-level', 'info'], { cwd: d, encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(7);
    expect(r.stderr.match(/"msg":"VM running"/g)).toHaveLength(3);
    const s = kvmkit(['run', 'resetstop'], d);
    expect(s.code).toBe(0);
  });

  it('runtime errors from start(): exit 1 with the code (no firmware; no /dev/kvm)', () => {
    const r = kvmkit(['run', '--no-defaults', '--plugin', 'serial'], d);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_NO_FIRMWARE: /m);
    const k = spawnSync(process.execPath, [BIN, 'run', 'halt'], { cwd: d, encoding: 'utf8', env: { ...process.env, KVMKIT_LOG_LEVEL: 'silent', KVMKIT_KVM_DEVICE: path.join(d, 'no-kvm') } });
    expect(k.status).toBe(1);
    expect(k.stderr).toMatch(/^error KVMKIT_ERR_KVM_UNAVAILABLE: .*no-kvm/m);
  });

  it('all vCPUs halted: exit 0', () => {
    const r = kvmkit(['run', 'halt'], d);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
  });

  it('triple fault: exit 1 with a coded message', () => {
    const r = kvmkit(['run', 'crash'], d);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/error KVMKIT_ERR_GUEST_SHUTDOWN: /);
  });

  it('a plugin that rejects its options: exit 2', () => {
    const r = kvmkit(['run', 'halt', '--plugin', 'serial:{"output":42}'], d);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error KVMKIT_ERR_PLUGIN_OPTIONS: .*serial/);
  });

  for (const [sig, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    it(`${sig} stops a running VM cleanly: exit ${code}`, async () => {
      const child = spawn(process.execPath, [BIN, 'run', 'spin', '--log-level', 'info'], { cwd: d, env: { ...process.env }, stdio: ['ignore', 'pipe', 'pipe'] });
      let err = '';
      const running = new Promise<void>((resolve) => {
        child.stderr.on('data', (b: Buffer) => {
          err += b.toString();
          if (err.includes('VM running')) resolve();
        });
      });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      await Promise.race([running, new Promise((r) => setTimeout(r, 20_000))]);
      await new Promise((r) => setTimeout(r, 200));
      child.kill(sig);
      const c = await Promise.race([exited, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 20_000))]);
      if (c === 'timeout') child.kill('SIGKILL');
      expect(err).toContain('VM running');
      expect(c).toBe(code);
      expect(err).toContain(`${sig} received`);
    }, 60_000);
  }
});

// The guest Linux kernel, found by the one helper every test uses (KVMKIT_GUEST_DIR, ../shared/guest, what
// scripts/build-guest-kernel.sh built); these tests need its vmlinux.
const guestKernel = findGuestKernel();
const guestDir = guestKernel?.vmlinux ? guestKernel.dir : undefined;
if (hasKvm && !guestDir) console.warn(`[kvmkit cli] kvmkit run --kernel tests are skipped: ${guestKernelHelp()}`);

const isPvmHost = existsSync('/sys/module/kvm_pvm');

/** Runs kvmkit until the guest prints its "Command line:" line, then Ctrl-C; returns stdout, stderr, exit code. */
async function bootLinux(args: string[], cwd: string): Promise<{ first: unknown; out: string; err: string; code: number | null | 'timeout' }> {
  const child = spawn(process.execPath, [BIN, ...args, '--log-level', 'warn'], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const booted = new Promise<void>((resolve) => child.stdout.on('data', (b: Buffer) => {
    out += b.toString();
    if (/Command line: .*panic=-1/.test(out)) resolve();
  }));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  const first = await Promise.race([booted.then(() => 'booted'), exited.then(() => 'exited'), new Promise((r) => setTimeout(() => r('timeout'), 40_000))]);
  child.kill('SIGINT');
  const code = await Promise.race([exited, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 20_000))]);
  if (code === 'timeout') child.kill('SIGKILL');
  return { first, out, err, code };
}

describe.skipIf(!hasKvm || !guestDir)('kvmkit run with the guest Linux kernel', () => {
  // bzImage decompresses itself in guest ring 0, which a nested PVM host emulates instruction by instruction
  // (no console output within 30 s here); only vmlinux (PVH entry) is tried there.
  for (const image of isPvmHost ? ['vmlinux'] : ['vmlinux', 'bzImage']) {
    it(`flag-only: --kernel ${image} with the default serial + platform-pc (+ --plugin host-pvm on PVM); Ctrl-C → 130`, async () => {
      const kernel = path.join(guestDir!, image);
      if (!existsSync(kernel)) return;
      const r = await bootLinux(['run', '--kernel', kernel, '--memory', '128', '--cmdline', 'panic=-1', ...(isPvmHost ? ['--plugin', 'host-pvm'] : [])], root);
      expect(r.first, `stdout: ${r.out.slice(0, 2000)}\nstderr: ${r.err.slice(0, 2000)}`).toBe('booted');
      expect(r.out).toMatch(/^Linux version 6\./m);
      expect(r.out).toContain('console=ttyS0'); // the serial plugin's cmdline contribution
      expect(r.code).toBe(130);
    }, 90_000);
  }

  it('config mode: the host section matched by kernel module adds host-pvm (its cmdline reaches the guest)', async () => {
    const d = project({
      'kvmkit.config.mjs': `export default {
        vms: { linux: { memory: 128, cmdline: 'panic=-1', plugins: ['serial', 'platform-pc', { name: 'boot-linux', options: { kernel: ${JSON.stringify(path.join(guestDir!, 'vmlinux'))} } }] } },
        hosts: { nested: { match: { kvmModule: 'kvm_pvm' }, plugins: ['host-pvm'] }, default: {} },
      };\n`,
    });
    const printed = JSON.parse(kvmkit(['config', '--print'], d).stdout);
    expect(printed.host.name).toBe(isPvmHost ? 'nested' : 'default');
    const r = await bootLinux(['run', 'linux'], d);
    expect(r.first, `stdout: ${r.out.slice(0, 2000)}\nstderr: ${r.err.slice(0, 2000)}`).toBe('booted');
    const cmdline = /^Command line: (.*)$/m.exec(r.out)?.[1] ?? '';
    if (isPvmHost) expect(cmdline).toMatch(/noxsave.*clearcpuid=/);
    else expect(cmdline).not.toContain('clearcpuid=');
    expect(r.code).toBe(130);
  }, 90_000);
});
