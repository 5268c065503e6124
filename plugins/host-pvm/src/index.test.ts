import { describe, it, expect, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHooks, tapOnly, PluginHost, type MachineApi, type Logger } from '@kvmkit/kernel';
import hostPvm, { detectPvm, pvmEvidence, compatCmdline, doctorReport, DEFAULT_CLEARCPUID, CLEARCPUID_MAX, IMPLIED_BY_NOXSAVE } from './index.js';

const RECORDED = 'noxsave tsc=reliable clearcpuid=popcnt,cx16,smap,smep,xsave,avx,avx2,avx512f,bmi1,bmi2,movbe,erms,fsrm,fsgsbase,rdrand,rdseed,pcid,invpcid,umip,rdpid,clflushopt,clwb,pku,la57';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmkit-hostpvm-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** A fake /sys/module (+ cpuinfo) with or without kvm_pvm. */
function fakeSys(pvm: boolean): { sysModule: string; cpuinfo: string } {
  const dir = fs.mkdtempSync(path.join(root, 'sys-'));
  fs.mkdirSync(path.join(dir, 'kvm'));
  if (pvm) {
    fs.mkdirSync(path.join(dir, 'kvm_pvm', 'parameters'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'kvm_pvm', 'parameters', 'pvm_native'), 'Y\n');
  } else fs.mkdirSync(path.join(dir, 'kvm_intel'));
  const cpuinfo = path.join(dir, 'cpuinfo');
  fs.writeFileSync(cpuinfo, `processor\t: 0\nflags\t\t: fpu sse2 ${pvm ? 'hypervisor' : 'vmx'}\n`);
  return { sysModule: dir, cpuinfo };
}

/** A recording logger (pino-shaped enough for the plugin). */
function recLog() {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  const mk = (level: string) => (obj: Record<string, unknown>, msg: string) => lines.push({ level, obj, msg });
  const log = { info: mk('info'), warn: mk('warn'), debug: mk('debug'), error: mk('error'), child: () => log } as unknown as Logger;
  return { log, lines };
}

function run(plugin: ReturnType<typeof hostPvm>, opts: { userCmdline?: string; parts?: string[] } = {}) {
  const hooks = createHooks();
  const { log, lines } = recLog();
  const machine = { name: 't', config: { name: 't', memory: 64, cpus: 1, cmdline: opts.userCmdline }, hooks: tapOnly(hooks), log } as unknown as MachineApi;
  new PluginHost('0.1.0').register(plugin);
  plugin.apply(machine, { log, options: plugin.options });
  const parts = hooks.cmdline.call([...(opts.parts ?? ['console=ttyS0'])]);
  return { parts, lines };
}

describe('detectPvm / evidence / doctorReport', () => {
  it('detects kvm_pvm in /sys/module and explains why', () => {
    const yes = fakeSys(true);
    const no = fakeSys(false);
    expect(detectPvm(yes.sysModule)).toBe(true);
    expect(detectPvm(no.sysModule)).toBe(false);
    const ev = pvmEvidence(yes.sysModule, yes.cpuinfo);
    expect(ev.join('\n')).toMatch(/kvm_pvm module is loaded/);
    expect(ev.join('\n')).toMatch(/pvm_native=Y/);
    expect(ev.join('\n')).toMatch(/hypervisor/);
    const evNo = pvmEvidence(no.sysModule, no.cpuinfo);
    expect(evNo.join('\n')).toMatch(/not loaded/);
    expect(evNo.join('\n')).toMatch(/kvm_intel is loaded/);
  });

  it('doctorReport has { pvm, evidence, suggestion } with the cmdline it would add', () => {
    const r = doctorReport(fakeSys(true));
    expect(r.pvm).toBe(true);
    expect(r.evidence.length).toBeGreaterThan(0);
    expect(r.suggestion).toMatch(/kvmModule: 'kvm_pvm'/);
    expect(r.cmdline).toBe(compatCmdline().args.join(' '));
    const n = doctorReport(fakeSys(false));
    expect(n.pvm).toBe(false);
    expect(n.suggestion).toMatch(/not a PVM host/);
  });

  it('agrees with this machine', () => {
    expect(detectPvm()).toBe(fs.existsSync('/sys/module/kvm_pvm'));
  });
});

describe('compatCmdline', () => {
  it('covers every feature of the recorded list, within the guest kernel 127-character clearcpuid buffer', () => {
    const c = compatCmdline();
    expect(c.args.slice(0, 2)).toEqual(['noxsave', 'tsc=reliable']);
    const value = c.args[2]!.slice('clearcpuid='.length);
    expect(value.length).toBeLessThanOrEqual(CLEARCPUID_MAX);
    const recordedList = RECORDED.split('clearcpuid=')[1]!.split(',');
    expect([...c.clearcpuid, ...c.implied].sort()).toEqual([...recordedList].sort());
    expect(c.implied).toEqual([...IMPLIED_BY_NOXSAVE]);
    expect(c.truncated).toEqual([]);
    // the recorded list verbatim would not fit: Linux would read "…,clflushop" and keep clwb, pku, la57
    expect(recordedList.join(',').length).toBeGreaterThan(CLEARCPUID_MAX);
  });

  it('extends, overrides and keeps features', () => {
    expect(compatCmdline({ extraClearcpuid: ['sha_ni'] }).clearcpuid.at(-1)).toBe('sha_ni');
    expect(compatCmdline({ keepCpuid: ['popcnt', 'cx16'] }).clearcpuid).not.toContain('popcnt');
    expect(compatCmdline({ clearcpuid: ['avx2', 'rdrand'], noxsave: false }).args).toEqual(['tsc=reliable', 'clearcpuid=avx2,rdrand']);
    expect(compatCmdline({ clearcpuid: [], tscReliable: false, extraArgs: ['nokaslr'] }).args).toEqual(['noxsave', 'nokaslr']);
  });

  it('reports what would not fit instead of letting the guest cut it silently', () => {
    const c = compatCmdline({ noxsave: false });
    expect(c.truncated.length).toBeGreaterThan(0);
    expect(c.args.find((a) => a.startsWith('clearcpuid='))!.length - 'clearcpuid='.length).toBeLessThanOrEqual(CLEARCPUID_MAX);
    expect([...c.clearcpuid, ...c.truncated]).toEqual([...DEFAULT_CLEARCPUID]);
  });
});

describe('host-pvm plugin', () => {
  it('appends the profile to the cmdline parts and logs at info what and why', () => {
    const { parts, lines } = run(hostPvm(fakeSys(true)));
    expect(parts).toEqual(['console=ttyS0', ...compatCmdline().args]);
    const info = lines.find((l) => l.level === 'info')!;
    expect(info.obj.added).toEqual(compatCmdline().args);
    expect(info.obj.omittedAsImplied).toEqual([...IMPLIED_BY_NOXSAVE]);
    expect(info.msg).toMatch(/emulat/);
    expect(lines.some((l) => l.level === 'warn')).toBe(false);
  });

  it('on a non-PVM host: warns and applies, or fails with KVMKIT_ERR_HOST_PROFILE when requirePvm', () => {
    const sys = fakeSys(false);
    const { parts, lines } = run(hostPvm(sys));
    expect(parts).toContain('noxsave');
    expect(lines.some((l) => l.level === 'warn' && /not PVM/.test(l.msg))).toBe(true);
    expect(() => run(hostPvm({ ...sys, requirePvm: true }))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_HOST_PROFILE' }));
  });

  it('leaves arguments the config already sets alone (and says so)', () => {
    const { parts, lines } = run(hostPvm(fakeSys(true)), { userCmdline: 'root=/dev/vda clearcpuid=avx2 noxsave' });
    expect(parts).toEqual(['console=ttyS0', 'tsc=reliable']);
    expect(lines.some((l) => l.level === 'warn' && (l.obj.skipped as string[]).length === 2)).toBe(true);
  });

  it('provides host-profile and validates its options', () => {
    const p = hostPvm();
    expect(p.name).toBe('host-pvm');
    expect(p.provides).toEqual(['host-profile']);
    for (const bad of [{ clearcpuid: 'avx' }, { clearcpuid: ['AVX,x'] }, { extraArgs: ['a b'] }, { requirePvm: 1 }, { nope: true }]) {
      expect(() => new PluginHost('0.1.0').register(hostPvm(bad as never)), JSON.stringify(bad)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    }
  });
});
