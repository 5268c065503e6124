import { describe, it, expect } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
// @ts-expect-error plain ESM module without types
import { resolveFor, bootReport, CONFIG } from '../boot-report.mjs';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[per-host] /dev/kvm not present: boot tests are skipped');
const repo = fileURLToPath(new URL('../../../', import.meta.url));
const cli = `${repo}packages/cli/dist/bin.js`;

interface Report {
  host: { name: string; by: string; reason: string };
  plugins: string[];
  stop: { reason: string; exitCode: number };
  unavailable: Array<{ plugin: string; code: string; message: string }>;
  warnings: Array<{ plugin: string; code: string; message: string }>;
}

const guest = `${repo}examples/per-host/probe-guest.mjs`;
const expected: Record<string, string[]> = {
  'numa-big': ['platform-pc', guest, 'cpu-template', 'pinning', 'hugepages', 'numa'],
  laptop: ['platform-pc', guest, 'cpu-template', 'hugepages'],
  'pvm-nested': ['platform-pc', guest, 'cpu-template', 'host-pvm', 'hugepages', 'nested-virt'],
};

describe('one VM, three hosts', () => {
  it('resolves the same VM to a different plugin set per host', async () => {
    const sets: Record<string, string[]> = {};
    for (const h of Object.keys(expected)) {
      const r = await resolveFor(h);
      sets[h] = r.names;
      expect(r.resolved.sources.host).toMatchObject({ name: h, by: 'flag' });
    }
    expect(sets).toEqual(expected);
    // host options merge over the VM's: the big host's CPU model keeps the VM's topology
    const big = (await resolveFor('numa-big')).resolved.plugins.find((p: { name: string }) => p.name === 'cpu-template');
    expect(big.options).toEqual({ template: 'baseline-v2', topology: { sockets: 1, cores: 2, threads: 1 } });
  });

  it('matches this machine by its KVM module when no --host is given', async () => {
    const r = await resolveFor(undefined);
    if (existsSync('/sys/module/kvm_pvm')) expect(r.resolved.sources.host).toEqual({ name: 'pvm-nested', by: 'match', reason: 'kernel module kvm_pvm loaded' });
    else expect(r.resolved.sources.host.name).not.toBe('pvm-nested');
  });

  it.skipIf(!existsSync(cli))('`kvmkit config --print --host <name>` shows each resolved set', () => {
    for (const [h, names] of Object.entries(expected)) {
      const out = JSON.parse(execFileSync(process.execPath, [cli, 'config', '--print', '--host', h, '--config', CONFIG], { encoding: 'utf8' }));
      expect(out.host).toMatchObject({ name: h, chosenBy: 'flag' });
      expect(out.plugins.map((p: { name: string }) => p.name)).toEqual(names);
    }
  });
});

describe.skipIf(!hasKvm)('each resolved set boots the probe guest here', () => {
  it('numa-big: pinning + NUMA work; 1 GiB pages reported unavailable with their coded error when none are reserved', async () => {
    const r: Report = await bootReport('numa-big');
    expect(r.stop).toEqual({ reason: 'guest-exit', exitCode: 0 });
    expect(r.plugins).toEqual(expect.arrayContaining(['pinning', 'numa', 'cpu-template']));
    const free1g = Number(readFileSync('/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages', 'utf8')) || 0;
    if (free1g < 1) {
      expect(r.unavailable).toEqual([{ plugin: 'hugepages', code: 'KVMKIT_ERR_HUGEPAGES_INSUFFICIENT', message: expect.stringContaining('hugepages-1048576kB/nr_hugepages') }]);
      expect(r.plugins).not.toContain('hugepages');
    } else {
      expect(r.unavailable).toEqual([]);
    }
    console.info(`[per-host] numa-big here: unavailable ${JSON.stringify(r.unavailable.map((u) => `${u.plugin}: ${u.code}`))}, warnings ${JSON.stringify(r.warnings.map((w) => `${w.plugin}: ${w.code}`))}`);
  });

  it('laptop: THP set boots', async () => {
    const r: Report = await bootReport('laptop');
    expect(r.stop).toEqual({ reason: 'guest-exit', exitCode: 0 });
    expect(r.unavailable).toEqual([]);
    expect(r.plugins).toContain('hugepages');
  });

  it('pvm-nested: host-pvm + THP boot; nested virtualization reported as unavailable (warning), not dropped', async () => {
    const r: Report = await bootReport('pvm-nested');
    expect(r.stop).toEqual({ reason: 'guest-exit', exitCode: 0 });
    expect(r.plugins).toEqual(expected['pvm-nested']!.map((n) => (n === guest ? guest : n)));
    if (existsSync('/sys/module/kvm_pvm')) {
      expect(r.warnings).toContainEqual({ plugin: 'nested-virt', code: 'KVMKIT_ERR_NESTED_UNSUPPORTED', message: expect.stringContaining('kvm_pvm') });
    }
  });
});
