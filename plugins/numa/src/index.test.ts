import { describe, it, expect } from 'vitest';
import { existsSync, readFileSync, mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, silentLogger, isKvmkitError } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import numa, { hostNodes, type NumaApi, type NumaOptions } from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[numa] /dev/kvm not present: KVM tests are skipped');
const log = silentLogger();
/** Ring 3: write one byte per 4 KiB page from 2 MiB to RDX, then spin (the VM stays up for /proc checks). */
const touchGuest = new Uint8Array([0x48, 0xc7, 0xc3, 0x00, 0x00, 0x20, 0x00, 0xc6, 0x03, 0x01, 0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, 0x48, 0x39, 0xd3, 0x72, 0xf1, 0xeb, 0xfe]);

/** The /proc/self/numa_maps line of the mapping that starts at `hva`. */
function numaMapsAt(hva: bigint): string {
  const line = readFileSync('/proc/self/numa_maps', 'utf8').split('\n').find((l) => l.startsWith(`${hva.toString(16)} `));
  if (!line) throw new Error(`no numa_maps line for 0x${hva.toString(16)}`);
  return line;
}

describe('host nodes', () => {
  it('lists nodes, CPUs and memory from sysfs', async () => {
    const root = mkdtempSync(join(tmpdir(), 'kvmkit-numa-'));
    try {
      for (const [n, cpus, mem] of [[0, '0-3', 1024], [1, '4-7', 2048], [2, '', 0]] as const) {
        mkdirSync(join(root, `devices/system/node/node${n}`), { recursive: true });
        writeFileSync(join(root, `devices/system/node/node${n}/cpulist`), `${cpus}\n`);
        writeFileSync(join(root, `devices/system/node/node${n}/meminfo`), `Node ${n} MemTotal:       ${mem} kB\n`);
      }
      expect(hostNodes(root)).toEqual([
        { node: 0, cpus: [0, 1, 2, 3], memoryKiB: 1024 }, { node: 1, cpus: [4, 5, 6, 7], memoryKiB: 2048 }, { node: 2, cpus: [], memoryKiB: 0 },
      ]);
      const bad = new Machine({ config: { name: 'x', memory: 16, cpus: 1 }, plugins: [numa({ nodes: [2], sysfs: root }), bootFlat({ image: touchGuest, ring: 3 })], log });
      const e = await bad.start().then(() => undefined, (x: unknown) => x);
      expect(isKvmkitError(e, 'KVMKIT_ERR_NUMA_NODE')).toBe(true);
      expect((e as Error).message).toMatch(/binds to node 2, which has no memory/);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('rejects bad options', () => {
    const mk = (o: unknown) => () => new Machine({ config: { name: 'x', memory: 16, cpus: 1 }, plugins: [numa(o as NumaOptions)] });
    expect(mk({})).toThrow(/nodes is required/);
    expect(mk({ nodes: [] })).toThrow(/nodes must be a non-empty array/);
    expect(mk({ nodes: [0], policy: 'local' })).toThrow(/policy must be/);
    expect(mk({ ranges: { ram: { policy: 'bind' } } })).toThrow(/ranges.ram.nodes/);
  });
});

describe.skipIf(!hasKvm)('numa on /dev/kvm', () => {
  const node0 = hostNodes()[0]!.node;
  for (const [policy, shown] of [['bind', `bind:${node0}`], ['interleave', `interleave:${node0}`], ['preferred', `prefer:${node0}`]] as const) {
    it(`${policy}: /proc/self/numa_maps shows ${shown} on the guest RAM mapping, pages on node ${node0}`, async () => {
      const m = new Machine({ config: { name: 'numa', memory: 32, cpus: 1 }, plugins: [numa({ policy, nodes: [node0] }), bootFlat({ image: touchGuest, ring: 3, arg: 32 << 20 })], log });
      await m.start();
      try {
        const hva = m.memory!.regions[0]!.hva;
        const deadline = Date.now() + 20_000;
        let line = numaMapsAt(hva);
        // wait until the guest has touched its memory: 7680 pages from 2 MiB to 32 MiB (+ what boot-flat wrote)
        while (Date.now() < deadline && Number(/ N\d+=(\d+)/.exec(line)?.[1] ?? 0) < 7680) {
          await new Promise((r) => setTimeout(r, 50));
          line = numaMapsAt(hva);
        }
        expect(line.split(' ')[1]).toBe(shown);
        expect(Number(new RegExp(` N${node0}=(\\d+)`).exec(line)?.[1] ?? 0)).toBeGreaterThanOrEqual(7680);
        expect(m.api.use<NumaApi>('numa')!.applied()).toMatchObject([{ range: 'ram-low', policy, nodes: [node0] }]);
      } finally {
        await m.stop();
      }
    });
  }

  it('a node this host does not have ⇒ KVMKIT_ERR_NUMA_NODE before any KVM object exists', async () => {
    const missing = Math.max(...hostNodes().map((n) => n.node)) + 1;
    const m = new Machine({ config: { name: 'numa-bad', memory: 16, cpus: 1 }, plugins: [numa({ policy: 'interleave', nodes: [0, missing] }), bootFlat({ image: touchGuest, ring: 3 })], log });
    const e = await m.start().then(() => undefined, (x: unknown) => x);
    expect(isKvmkitError(e, 'KVMKIT_ERR_NUMA_NODE')).toBe(true);
    expect((e as Error).message).toContain(`names node ${missing}, which this host does not have`);
    expect(m.vm).toBeUndefined();
  });
});
