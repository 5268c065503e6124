import { describe, it, expect } from 'vitest';
import { existsSync, readFileSync, writeFileSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, silentLogger, isKvmkitError, type Plugin, type MachineApi } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import hugepages, { readPool, reserveCommand, pagesFor, thpMode, type HugepagesApi } from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[hugepages] /dev/kvm not present: KVM tests are skipped');
const log = silentLogger();
const NR = '/proc/sys/vm/nr_hugepages';
const canReserve = hasKvm && existsSync(NR) && process.getuid?.() === 0;

/**
 * Ring-3 flat guest: writes one byte to every 4 KiB page from 2 MiB up to RDX, then `out 0xf0, al` and spins
 * (the VM keeps running so the test can read /proc/self/smaps while guest RAM is still mapped).
 */
const touchGuest = new Uint8Array([
  0x48, 0xc7, 0xc3, 0x00, 0x00, 0x20, 0x00, // mov rbx, 0x200000
  0xc6, 0x03, 0x01, //                      L: mov byte [rbx], 1
  0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add rbx, 0x1000
  0x48, 0x39, 0xd3, //                         cmp rbx, rdx
  0x72, 0xf1, //                               jb L
  0xe6, 0xf0, //                               out 0xf0, al
  0xeb, 0xfe, //                               jmp $
]);

/** A port-0xf0 device that resolves `done` when the guest has touched its memory. */
function donePort(): { plugin: Plugin; done: Promise<void> } {
  let resolve!: () => void;
  const done = new Promise<void>((r) => (resolve = r));
  const plugin: Plugin = {
    name: 'test-done', version: '0.1.0',
    apply(m: MachineApi) { m.hooks.devices.tap('test-done', (reg) => reg.addPio(0xf0, 1, { read() {}, write: () => resolve() }, 'test-done')); },
  };
  return { plugin, done };
}

/** The /proc/self/smaps fields (kB) of the mapping that contains `addr`. */
function smapsAt(addr: bigint): Record<string, number> {
  const lines = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(lines[i]!);
    if (!m) continue;
    if (BigInt(`0x${m[1]}`) <= addr && addr < BigInt(`0x${m[2]}`)) {
      const out: Record<string, number> = {};
      for (let j = i + 1; j < lines.length && !/^[0-9a-f]+-[0-9a-f]+ /.test(lines[j]!); j++) {
        const f = /^(\w+):\s+(\d+) kB/.exec(lines[j]!);
        if (f) out[f[1]!] = Number(f[2]);
      }
      return out;
    }
  }
  throw new Error(`no mapping contains 0x${addr.toString(16)}`);
}

async function touchAndInspect(memMiB: number, plugins: Plugin[]): Promise<{ api: HugepagesApi; smaps: Record<string, number> }> {
  const { plugin, done } = donePort();
  const m = new Machine({ config: { name: 'hp', memory: memMiB, cpus: 1 }, plugins: [plugin, ...plugins, bootFlat({ image: touchGuest, ring: 3, arg: memMiB * 1024 * 1024 })], log });
  await m.start();
  try {
    await Promise.race([done, new Promise((_, rej) => setTimeout(() => rej(new Error('guest did not finish touching')), 30_000))]);
    const api = m.api.use<HugepagesApi>('hugepages')!;
    return { api, smaps: smapsAt(m.memory!.regions[0]!.hva) };
  } finally {
    await m.stop();
  }
}

function setNr(n: number): void {
  writeFileSync(NR, `${n}\n`);
}

describe('host pool and commands', () => {
  it('reads a pool and prints the exact reservation command', () => {
    const root = mkdtempSync(join(tmpdir(), 'kvmkit-hp-'));
    try {
      for (const [d, vals] of [['hugepages-2048kB', [10, 6, 2]], ['hugepages-1048576kB', [1, 1, 0]]] as const) {
        mkdirSync(join(root, 'kernel/mm/hugepages', d), { recursive: true });
        const [t, f, r] = vals;
        writeFileSync(join(root, 'kernel/mm/hugepages', d, 'nr_hugepages'), `${t}\n`);
        writeFileSync(join(root, 'kernel/mm/hugepages', d, 'free_hugepages'), `${f}\n`);
        writeFileSync(join(root, 'kernel/mm/hugepages', d, 'resv_hugepages'), `${r}\n`);
      }
      writeFileSync(join(root, 'meminfo'), 'Hugepagesize:       2048 kB\n');
      const p2 = readPool('2M', root, join(root, 'meminfo'));
      expect(p2).toMatchObject({ supported: true, total: 10, free: 6, reserved: 2, available: 4, isDefault: true });
      expect(reserveCommand(p2, 32)).toBe('sysctl vm.nr_hugepages=38');
      const p1 = readPool('1G', root, join(root, 'meminfo'));
      expect(reserveCommand(p1, 4)).toBe(`echo 4 > ${join(root, 'kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages')}`);
      expect(readPool('1G', join(root, 'nowhere')).supported).toBe(false);
      expect(pagesFor([{ size: 3 << 20 }, { size: 4 << 20 }], '2M')).toBe(4);
      expect(pagesFor([{ size: 256 << 20 }], '1G')).toBe(1);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('rejects bad options', () => {
    expect(() => new Machine({ config: { name: 'x', memory: 16, cpus: 1 }, plugins: [hugepages({ mode: 'huge' } as never)] })).toThrow(/mode/);
    expect(() => new Machine({ config: { name: 'x', memory: 16, cpus: 1 }, plugins: [hugepages({ size: '4M' } as never)] })).toThrow(/size/);
  });
});

describe.skipIf(!hasKvm)('hugepages on /dev/kvm', () => {
  const thp = thpMode();
  it.skipIf(thp === 'never' || thp === 'unsupported')('THP: the guest-memory mapping shows AnonHugePages after the guest touched it', async () => {
    const { api, smaps } = await touchAndInspect(64, [hugepages({ mode: 'thp' })]);
    expect(api.effective()).toBe('thp');
    expect(api.backings()[0]!.kind).toBe('thp');
    expect(smaps.AnonHugePages).toBeGreaterThan(0);
  });
  if (thp === 'never' || thp === 'unsupported') console.warn(`[hugepages] THP is ${thp} on this host: THP test skipped`);

  it('without the plugin the same guest leaves AnonHugePages at 0 (THP in madvise mode) — the baseline', async () => {
    if (thp !== 'madvise') return; // with 'always' the baseline gets huge pages too
    const { plugin, done } = donePort();
    const m = new Machine({ config: { name: 'hp0', memory: 64, cpus: 1 }, plugins: [plugin, bootFlat({ image: touchGuest, ring: 3, arg: 64 << 20 })], log });
    await m.start();
    try {
      await done;
      expect(smapsAt(m.memory!.regions[0]!.hva).AnonHugePages).toBe(0);
    } finally {
      await m.stop();
    }
  });

  /** Sets the 2M pool so that exactly `n` pages are available (assumes nobody else holds reservations meanwhile). */
  function makeAvailable(n: number): void {
    const p = readPool('2M');
    setNr(Math.max(0, p.total - p.available + n));
    expect(readPool('2M').available).toBe(n);
  }

  it.skipIf(!canReserve)('hugetlb 2M (anonymous and memfd): the guest-memory mapping shows Hugetlb pages', async () => {
    const old = Number(readFileSync(NR, 'utf8').trim());
    try {
      makeAvailable(32); // a 64 MiB guest needs 32 pages
      const a = await touchAndInspect(64, [hugepages({ mode: 'hugetlb', size: '2M' })]);
      expect(a.api.effective()).toBe('hugetlb');
      expect(a.api.pagesNeeded()).toBe(32);
      expect(a.api.backings()[0]!.kind).toBe('hugetlb-2M');
      // boot-flat writes its tables into the first 2 MiB, the guest touches the rest: all 64 MiB are huge pages.
      expect(a.smaps.Private_Hugetlb).toBe(64 * 1024);
      expect(a.smaps.AnonHugePages ?? 0).toBe(0);
      const b = await touchAndInspect(64, [hugepages({ mode: 'hugetlb', backing: 'memfd' })]);
      expect(b.api.backings()[0]!.kind).toBe('hugetlb-2M-memfd');
      // smaps counts a page as Shared_Hugetlb only when more than one process maps it.
      expect((b.smaps.Private_Hugetlb ?? 0) + (b.smaps.Shared_Hugetlb ?? 0)).toBe(64 * 1024);
      expect(readPool('2M').available).toBe(32); // released after stop
    } finally {
      setNr(old);
    }
  });

  it.skipIf(!canReserve)('hugetlb 2M with too few pages: coded error with the count and the exact command, or the configured fallback with a warning', async () => {
    const old = Number(readFileSync(NR, 'utf8').trim());
    try {
      makeAvailable(4);
      const total = readPool('2M').total;
      const m = new Machine({ config: { name: 'few', memory: 64, cpus: 1 }, plugins: [hugepages({ mode: 'hugetlb' }), bootFlat({ image: touchGuest, ring: 3 })], log });
      const e = await m.start().then(() => undefined, (x: unknown) => x);
      expect(isKvmkitError(e, 'KVMKIT_ERR_HUGEPAGES_INSUFFICIENT')).toBe(true);
      expect((e as Error).message).toContain('needs 32 huge pages of 2M, but only 4 are available');
      expect((e as Error).message).toContain(`reserve them with: sysctl vm.nr_hugepages=${total + 28}`);
      expect(m.vm).toBeUndefined();

      if (thp === 'madvise' || thp === 'always') {
        const f = await touchAndInspect(64, [hugepages({ mode: 'hugetlb', fallback: 'thp' })]);
        expect(f.api.effective()).toBe('thp');
        expect(f.api.warnings().map((w) => w.code)).toEqual(['KVMKIT_ERR_HUGEPAGES_INSUFFICIENT']);
        expect(f.smaps.AnonHugePages).toBeGreaterThan(0);
      }
      const n = await touchAndInspect(64, [hugepages({ mode: 'hugetlb', fallback: 'none' })]);
      expect(n.api.effective()).toBe('none');
      expect(n.api.warnings()[0]!.message).toMatch(/falling back to 4 KiB pages/);
      expect(n.smaps.Private_Hugetlb ?? 0).toBe(0);
    } finally {
      setNr(old);
    }
  });

  const p1g = readPool('1G');
  it.skipIf(!p1g.supported || p1g.available > 0)('hugetlb 1G with none reserved: coded error naming the sysfs file', async () => {
    const m = new Machine({ config: { name: 'g1', memory: 256, cpus: 1 }, plugins: [hugepages({ mode: 'hugetlb', size: '1G' }), bootFlat({ image: touchGuest, ring: 3 })], log });
    const e = await m.start().then(() => undefined, (x: unknown) => x);
    expect(isKvmkitError(e, 'KVMKIT_ERR_HUGEPAGES_INSUFFICIENT')).toBe(true);
    expect((e as Error).message).toContain(`echo ${p1g.total + 1} > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages`);
  });
});
