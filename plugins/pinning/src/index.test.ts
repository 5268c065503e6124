import { describe, it, expect, afterEach } from 'vitest';
import { existsSync, mkdtempSync, mkdirSync, writeFileSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, silentLogger, isKvmkitError, ffi, type Plugin, type MachineApi } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import pinning, { planPinning, parseCpuList, formatCpuList, readHostCpus, type PinningApi } from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[pinning] /dev/kvm not present: KVM tests are skipped');
const online = existsSync('/sys/devices/system/cpu/online') ? parseCpuList(readFileSync('/sys/devices/system/cpu/online', 'utf8')) : [];
const log = silentLogger();
const spin = new Uint8Array([0xeb, 0xfe]);

function cpusAllowed(tid: number): string {
  const s = readFileSync(`/proc/${process.pid}/task/${tid}/status`, 'utf8');
  return /^Cpus_allowed_list:\s*(.*)$/m.exec(s)![1]!.trim();
}

/** A fake sysfs: `layout` = [cpu, package, core, node] per CPU. */
function fakeSysfs(layout: Array<[number, number, number, number]>, onlineList: string): string {
  const root = mkdtempSync(join(tmpdir(), 'kvmkit-pin-'));
  const cpuDir = join(root, 'devices/system/cpu');
  mkdirSync(cpuDir, { recursive: true });
  writeFileSync(join(cpuDir, 'online'), `${onlineList}\n`);
  const nodes = new Map<number, number[]>();
  for (const [cpu, pkg, core, node] of layout) {
    mkdirSync(join(cpuDir, `cpu${cpu}/topology`), { recursive: true });
    writeFileSync(join(cpuDir, `cpu${cpu}/topology/physical_package_id`), `${pkg}\n`);
    writeFileSync(join(cpuDir, `cpu${cpu}/topology/core_id`), `${core}\n`);
    nodes.set(node, [...(nodes.get(node) ?? []), cpu]);
  }
  for (const [n, l] of nodes) {
    mkdirSync(join(root, `devices/system/node/node${n}`), { recursive: true });
    writeFileSync(join(root, `devices/system/node/node${n}/cpulist`), `${formatCpuList(l)}\n`);
  }
  return root;
}

describe('cpu lists and plans', () => {
  it('parses and formats kernel CPU lists', () => {
    expect(parseCpuList('0-3,8,10-11\n')).toEqual([0, 1, 2, 3, 8, 10, 11]);
    expect(formatCpuList([11, 0, 1, 2, 3, 8, 10])).toBe('0-3,8,10-11');
    expect(() => parseCpuList('1-x')).toThrow();
  });

  // 2 sockets (= 2 nodes) × 2 cores × 2 threads; CPU n and n+4 are SMT siblings, like Linux numbers them.
  const big: Array<[number, number, number, number]> = [
    [0, 0, 0, 0], [1, 0, 1, 0], [2, 1, 0, 1], [3, 1, 1, 1], [4, 0, 0, 0], [5, 0, 1, 0], [6, 1, 0, 1], [7, 1, 1, 1],
  ];
  it('spread alternates sockets and avoids SMT siblings; pack fills a socket core by core', () => {
    const root = fakeSysfs(big, '0-7');
    try {
      const host = readHostCpus(root);
      const all = host.online;
      expect(planPinning({ policy: 'spread' }, 4, host, all).vcpus).toEqual([[0], [2], [1], [3]]);
      expect(planPinning({ policy: 'pack' }, 4, host, all).vcpus).toEqual([[0], [4], [1], [5]]);
      // explicit entries win; the policy fills the rest
      expect(planPinning({ vcpu1: [7], policy: 'pack', cpus: [2, 3, 6] }, 3, host, all).vcpus).toEqual([[2], [7], [6]]);
      // a map alone leaves other vCPUs unpinned; no options = spread
      expect(planPinning({ vcpu0: [0, 4] }, 2, host, all).vcpus).toEqual([[0, 4], undefined]);
      expect(planPinning({}, 2, host, all).vcpus).toEqual([[0], [2]]);
      expect(planPinning({ io: 'all' }, 1, host, [0, 1]).io).toEqual([0, 1]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('rejects offline, forbidden and out-of-range entries with KVMKIT_ERR_PINNING', () => {
    const root = fakeSysfs(big, '0-3,5-7');
    try {
      const host = readHostCpus(root);
      const err = (f: () => unknown) => { try { f(); } catch (e) { return e as { code: string; message: string }; } throw new Error('no error'); };
      const e1 = err(() => planPinning({ vcpu0: [4] }, 1, host, host.online));
      expect(e1.code).toBe('KVMKIT_ERR_PINNING');
      expect(e1.message).toMatch(/CPU 4, which is not online \(online: 0-3,5-7\)/);
      expect(err(() => planPinning({ io: [1, 6] }, 1, host, [0, 1, 2])).message).toMatch(/io names CPU 6, which this process may not use/);
      expect(err(() => planPinning({ vcpu2: [0] }, 2, host, host.online)).message).toMatch(/vcpu2 given but the VM has 2 vCPUs/);
      expect(err(() => planPinning({ vcpu0: [] } as never, 1, host, host.online)).code).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
      expect(err(() => planPinning({ policy: 'random' } as never, 1, host, host.online)).code).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
      expect(err(() => planPinning({ vcpuX: [0] } as never, 1, host, host.online)).code).toBe('KVMKIT_ERR_PLUGIN_OPTIONS');
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!hasKvm || online.length < 2)('pinning on /dev/kvm (needs 2 online CPUs)', () => {
  const mainBefore = ffi.getAffinity(0);
  afterEach(() => {
    expect(ffi.getAffinity(0)).toEqual(mainBefore); // restored after stop
  });

  for (const [a, b, io] of [[0, 1, [0, 1]], [1, 0, [1]]] as const) {
    it(`pins vCPU0 to CPU ${a}, vCPU1 to CPU ${b} and the main thread to ${io.join('-')} (checked in /proc/<pid>/task/<tid>/status)`, async () => {
      const m = new Machine({ config: { name: 'pin', memory: 16, cpus: 2 }, plugins: [pinning({ vcpu0: [a], vcpu1: [b], io: [...io] }), bootFlat({ image: spin, ring: 3 })], log });
      await m.start();
      try {
        const tids = m.vcpuThreadIds;
        expect(tids).toHaveLength(2);
        expect(cpusAllowed(tids[0]!)).toBe(String(a));
        expect(cpusAllowed(tids[1]!)).toBe(String(b));
        expect(cpusAllowed(ffi.gettid())).toBe(io.join('-')); // the VMM's main thread = the thread that runs the Machine
        const api = m.api.use<PinningApi>('pinning')!;
        expect(api.applied().map((x) => x.cpus)).toEqual([[a], [b]]);
      } finally {
        await m.stop();
      }
    });
  }

  it('policy pack puts both vCPUs on the first CPUs in order', async () => {
    const m = new Machine({ config: { name: 'pack', memory: 16, cpus: 2 }, plugins: [pinning({ policy: 'pack', cpus: [1] }), bootFlat({ image: spin, ring: 3 })], log });
    await m.start();
    try {
      expect(m.vcpuThreadIds.map(cpusAllowed)).toEqual(['1', '1']);
    } finally {
      await m.stop();
    }
  });

  it('an offline CPU fails before any KVM object exists', async () => {
    const fds = readdirSync('/proc/self/fd').length;
    let kvmTouched = false;
    const probe: Plugin = { name: 'probe', version: '0.1.0', apply(mm: MachineApi) { mm.hooks.memoryLayout.tap('probe', (l) => { kvmTouched = true; return l; }); } };
    const m = new Machine({ config: { name: 'bad', memory: 16, cpus: 2 }, plugins: [probe, pinning({ vcpu0: [0], vcpu1: [online.at(-1)! + 1] }), bootFlat({ image: spin, ring: 3 })], log });
    const e = await m.start().then(() => undefined, (x: unknown) => x);
    expect(isKvmkitError(e, 'KVMKIT_ERR_PINNING')).toBe(true);
    expect((e as Error).message).toMatch(/not online/);
    expect(kvmTouched).toBe(false);
    expect(m.state).toBe('stopped');
    expect(readdirSync('/proc/self/fd').length).toBe(fds);
  });
});
