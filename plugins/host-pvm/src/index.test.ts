import { describe, it, expect, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHooks, tapOnly, PluginHost, GuestMemory, type MachineApi, type Logger } from '@kvmkit/kernel';
import hostPvm, { translate, failedInstruction, detectPvm, pvmEvidence, compatCmdline, doctorReport, DEFAULT_CLEARCPUID, CLEARCPUID_MAX, IMPLIED_BY_NOXSAVE } from './index.js';

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

describe('emulation-failure helpers', () => {
  const size = 0x400000;
  const mem = new GuestMemory([{ gpa: 0n, size, bytes: new Uint8Array(size), hva: 0n, slot: 0, name: 'ram' }]);
  // PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000; VA 0xffffffff81000000 (kernel text style).
  const va = 0xffff_ffff_8100_0000n;
  const idx = (l: number) => Number((va >> BigInt(12 + 9 * l)) & 0x1ffn);
  mem.writeU64(0x1000n + BigInt(idx(3)) * 8n, 0x2000n | 3n);
  mem.writeU64(0x2000n + BigInt(idx(2)) * 8n, 0x3000n | 3n);
  mem.writeU64(0x3000n + BigInt(idx(1)) * 8n, 0x4000n | 3n);
  mem.writeU64(0x4000n + BigInt(idx(0)) * 8n, 0x200000n | 3n);

  it('walks 4 KiB, 2 MiB and 1 GiB mappings and refuses non-present or out-of-RAM tables', () => {
    expect(translate(mem, 0x1000n, va + 0x123n)).toBe(0x200123n);
    expect(translate(mem, 0x1000n, va + 0x1000n)).toBeUndefined();            // PT entry not present
    const va2 = 0x4000_0000n;                                                   // 2 MiB page via PD 0x6000
    mem.writeU64(0x1000n, 0x5000n | 3n);
    mem.writeU64(0x5000n + 8n, 0x6000n | 3n);
    mem.writeU64(0x6000n, 0x200000n | 0x83n);
    expect(translate(mem, 0x1000n, va2 + 0x1_2345n)).toBe(0x21_2345n);
    mem.writeU64(0x5000n + 16n, 0xc000_0000n | 0x83n);                          // 1 GiB page
    expect(translate(mem, 0x1000n, 0x8000_0000n + 0x1234_5678n)).toBe(0xd234_5678n);
    mem.writeU64(0x5000n + 24n, 0x7_0000_0000n | 3n);                           // table outside guest RAM
    expect(translate(mem, 0x1000n, 0xc000_0000n)).toBeUndefined();
    expect(translate(mem, 0xfff_0000_0000n, va)).toBeUndefined();               // CR3 outside guest RAM
  });

  it('takes the instruction bytes from the exit when KVM supplies them, else reads them at RIP', () => {
    // flags = 1 (instruction bytes), then size 1 + 0x9b, padded with NOPs as KVM does.
    const withBytes = { kind: 'internal-error' as const, suberror: 1, data: [1n, 0x9090_9090_9090_9b01n, 0x9090_9090_9090_9090n] };
    expect(Array.from(failedInstruction(withBytes, undefined, 0n, 0n)!)).toEqual([0x9b]);
    mem.write(0x200456n, Uint8Array.of(0xf4));
    const noBytes = { kind: 'internal-error' as const, suberror: 1, data: [0n] };
    expect(Array.from(failedInstruction(noBytes, mem, va + 0x456n, 0x1000n)!)).toEqual([0xf4]);
    expect(failedInstruction(noBytes, mem, va + 0x1000n, 0x1000n)).toBeUndefined();
    expect(failedInstruction({ ...withBytes, data: [1n, 0x20n, 0n] }, undefined, 0n, 0n)).toBeUndefined();  // size 32 > 15
  });

  it('refuses an unknown instruction name in emulate', () => {
    const p = hostPvm({ emulate: ['hlt'] });
    expect(() => p.validateOptions!(p.options)).toThrow(/emulate may list fwait/);
  });
});
