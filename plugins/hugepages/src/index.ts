import { KvmkitError, checkOptions, ffi, type Plugin, type MachineApi, type LayoutRange, type MemoryBacking } from '@kvmkit/kernel';
import { readPool, reserveCommand, thpMode, PAGE_BYTES, type HugePageSize, type HugePagePool } from './host.js';

export { readPool, reserveCommand, thpMode, PAGE_BYTES } from './host.js';
export type { HugePageSize, HugePagePool } from './host.js';

const NAME = 'hugepages';

/** Error codes raised by this plugin. */
export const HUGEPAGES_ERRORS = {
  /** Too few huge pages of the size are free: the message says how many are needed and the exact command. */
  INSUFFICIENT: 'KVMKIT_ERR_HUGEPAGES_INSUFFICIENT',
  /** The host does not offer this huge page size at all (no /sys/kernel/mm/hugepages/hugepages-<n>kB). */
  UNSUPPORTED: 'KVMKIT_ERR_HUGEPAGES_UNSUPPORTED',
  /** Transparent huge pages are disabled ('never') or absent, or madvise(MADV_HUGEPAGE) failed. */
  THP_UNAVAILABLE: 'KVMKIT_ERR_HUGEPAGES_THP_UNAVAILABLE',
} as const;

export interface HugepagesOptions {
  /** 'thp': madvise(MADV_HUGEPAGE) on guest RAM; 'hugetlb': RAM from the hugetlbfs pool. Default 'thp'. */
  mode?: 'thp' | 'hugetlb';
  /** hugetlb page size. Default '2M'. */
  size?: HugePageSize;
  /** When the chosen mode is not possible: 'error' (default), 'thp' (hugetlb → THP, with a warning) or 'none' (plain 4 KiB pages, with a warning). */
  fallback?: 'error' | 'thp' | 'none';
  /** hugetlb memory from an anonymous MAP_HUGETLB mapping (default) or a memfd (MFD_HUGETLB, shareable fd). */
  backing?: 'anonymous' | 'memfd';
  /** sysfs root (tests). Default /sys. */
  sysfs?: string;
}

export type Effective = 'hugetlb' | 'thp' | 'none';

/** What `machine.use('hugepages')` returns. */
export interface HugepagesApi {
  /** What guest RAM actually got (after any fallback). */
  effective(): Effective | undefined;
  /** Huge pages the layout needs in hugetlb mode (0 otherwise). */
  pagesNeeded(): number;
  /** Every fallback or problem, as a coded entry (also logged as a warning). */
  warnings(): Array<{ code: string; message: string }>;
  /** Per RAM range: host address, size and backing kind. */
  backings(): Array<{ name: string; hva: bigint; size: number; kind: string }>;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Huge pages of `size` needed to back `ranges` (each range rounded up to whole pages). */
export function pagesFor(ranges: readonly { size: number }[], size: HugePageSize): number {
  return ranges.reduce((n, r) => n + roundUp(r.size, PAGE_BYTES[size]) / PAGE_BYTES[size], 0);
}

/** The error (or warning text) for too few free pages. */
export function insufficientError(pool: HugePagePool, needed: number, memoryMiB?: number): KvmkitError {
  const cmd = reserveCommand(pool, needed);
  const extra = pool.size === '1G' ? ' (1 GiB pages are best reserved at boot: add `hugepagesz=1G hugepages=N` to the host kernel cmdline)' : '';
  return new KvmkitError(HUGEPAGES_ERRORS.INSUFFICIENT,
    `hugepages: guest RAM${memoryMiB !== undefined ? ` (${memoryMiB} MiB)` : ''} needs ${needed} huge pages of ${pool.size}, but only ${pool.available} are available `
    + `(total ${pool.total}, free ${pool.free}, reserved ${pool.reserved}); reserve them with: ${cmd}${extra}`,
    { details: { size: pool.size, needed, available: pool.available, total: pool.total, free: pool.free, reserved: pool.reserved, command: cmd, sysfsPath: pool.sysfsPath } });
}

/**
 * Backs guest RAM with huge pages: THP through madvise, or hugetlbfs pages of 2 MiB / 1 GiB through the
 * `allocateMemory` hook, with a coded error or a configured fallback when the host cannot.
 */
export default function hugepages(options: HugepagesOptions = {}): Plugin {
  return {
    name: NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    validateOptions(o) {
      checkOptions(NAME, o, {
        mode: { type: ['thp', 'hugetlb'] }, size: { type: ['2M', '1G'] }, fallback: { type: ['error', 'thp', 'none'] },
        backing: { type: ['anonymous', 'memfd'] }, sysfs: { type: 'string' },
      });
    },
    apply(machine: MachineApi, { log }) {
      const mode = options.mode ?? 'thp';
      const size: HugePageSize = options.size ?? '2M';
      const fallback = options.fallback ?? 'error';
      const sysfs = options.sysfs ?? '/sys';
      let effective: Effective | undefined;
      let needed = 0;
      const warnings: Array<{ code: string; message: string }> = [];
      const backings: Array<{ name: string; hva: bigint; size: number; kind: string }> = [];
      /** Ranges that got hugetlb memory (no madvise for those). */
      const hugetlbRanges = new Set<string>();

      const warn = (e: KvmkitError, then: string): void => {
        const message = `${e.message} — falling back to ${then}`;
        warnings.push({ code: e.code, message });
        log.warn({ code: e.code, fallback: then, ...e.details }, message);
      };
      /** THP, or whatever the fallback allows when THP is off. */
      const thpOrFallback = (why?: KvmkitError): Effective => {
        const t = thpMode(sysfs);
        if (t === 'always' || t === 'madvise') {
          if (why) warn(why, 'transparent huge pages');
          return 'thp';
        }
        const e = new KvmkitError(HUGEPAGES_ERRORS.THP_UNAVAILABLE,
          `hugepages: transparent huge pages are ${t === 'never' ? 'disabled' : 'not available'} on this host (${sysfs}/kernel/mm/transparent_hugepage/enabled is ${t}); enable them with: echo madvise > /sys/kernel/mm/transparent_hugepage/enabled`,
          { details: { thp: t } });
        if (why) warn(why, 'transparent huge pages');
        if (fallback === 'error') throw e;
        warn(e, '4 KiB pages');
        return 'none';
      };

      machine.provide(NAME, {
        effective: () => effective,
        pagesNeeded: () => needed,
        warnings: () => warnings.map((w) => ({ ...w })),
        backings: () => backings.map((b) => ({ ...b })),
      } satisfies HugepagesApi);

      // Decide once the final layout is known (stage: after every other memoryLayout tap), before any mmap.
      machine.hooks.memoryLayout.tap({ name: NAME, stage: 1000 }, (layout, config) => {
        if (mode === 'thp') {
          effective = thpOrFallback();
          return layout;
        }
        needed = pagesFor(layout.ram, size);
        const pool = readPool(size, sysfs);
        let problem: KvmkitError | undefined;
        if (!pool.supported) {
          problem = new KvmkitError(HUGEPAGES_ERRORS.UNSUPPORTED, `hugepages: this host offers no ${size} huge pages (${sysfs}/kernel/mm/hugepages/hugepages-${PAGE_BYTES[size] / 1024}kB is missing)`, { details: { size } });
        } else if (pool.available < needed) {
          problem = insufficientError(pool, needed, config.memory);
        }
        if (!problem) {
          effective = 'hugetlb';
          log.info({ size, pages: needed, available: pool.available }, 'guest RAM on hugetlbfs pages');
        } else if (fallback === 'error') {
          throw problem;
        } else if (fallback === 'thp') {
          effective = thpOrFallback(problem);
        } else {
          warn(problem, '4 KiB pages');
          effective = 'none';
        }
        return layout;
      });

      machine.hooks.allocateMemory.tap(NAME, (r: LayoutRange): MemoryBacking | undefined => {
        if (effective !== 'hugetlb') return undefined;
        const page = PAGE_BYTES[size];
        const len = roundUp(r.size, page);
        const sizeFlag = size === '1G' ? ffi.MAP_HUGE_1GB : ffi.MAP_HUGE_2MB;
        let hva: bigint | number;
        let fd = -1;
        if (options.backing === 'memfd') {
          fd = ffi.memfdCreate(`kvmkit-${machine.name}-${r.name}`, ffi.MFD_CLOEXEC | ffi.MFD_HUGETLB | (size === '1G' ? ffi.MFD_HUGE_1GB : ffi.MFD_HUGE_2MB));
          ffi.ftruncate(fd, len);
          // SAFETY: a shared mapping of our memfd; lives until release() below, after the VM fd is closed.
          hva = ffi.tryMmap(len, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_SHARED, fd, 0);
        } else {
          // SAFETY: private hugetlb mapping; the pages are reserved now (no MAP_NORESERVE) and live until release().
          hva = ffi.tryMmap(len, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS | ffi.MAP_HUGETLB | sizeFlag);
        }
        if (typeof hva === 'number') {
          if (fd >= 0) ffi.closeFd(fd);
          // Someone took the pages between the check and the mmap (or the check could not see a cgroup limit).
          const e = hva === -12
            ? insufficientError(readPool(size, sysfs), roundUp(r.size, page) / page, machine.config.memory)
            : new KvmkitError(HUGEPAGES_ERRORS.INSUFFICIENT, `hugepages: mmap of ${len} bytes of ${size} pages for ${r.name} failed with errno ${-hva}`, { details: { errno: -hva } });
          if (fallback === 'error') throw e;
          effective = fallback === 'thp' ? thpOrFallback(e) : (warn(e, '4 KiB pages'), 'none');
          return undefined;
        }
        const addr = hva;
        const kind = `hugetlb-${size}${fd >= 0 ? '-memfd' : ''}`;
        hugetlbRanges.add(r.name);
        backings.push({ name: r.name, hva: addr, size: r.size, kind });
        if (len !== r.size) log.info({ range: r.name, size: r.size, mapped: len }, 'range rounded up to whole huge pages');
        return {
          hva: addr, size: r.size, kind, ...(fd >= 0 ? { fd } : {}),
          release: () => {
            ffi.munmap(addr, len);
            if (fd >= 0) ffi.closeFd(fd);
          },
        };
      });

      machine.hooks.memoryMapped.tapPromise(NAME, async (memory) => {
        for (const reg of memory.regions) {
          if (hugetlbRanges.has(reg.name)) continue;
          if (effective === 'thp') {
            const r = ffi.madvise(reg.hva, reg.size, ffi.MADV_HUGEPAGE);
            if (r < 0) {
              const e = new KvmkitError(HUGEPAGES_ERRORS.THP_UNAVAILABLE, `hugepages: madvise(MADV_HUGEPAGE) on ${reg.name} failed with errno ${-r}`, { details: { errno: -r, range: reg.name } });
              if (fallback === 'error') throw e;
              warn(e, '4 KiB pages');
              backings.push({ name: reg.name, hva: reg.hva, size: reg.size, kind: 'anonymous' });
              continue;
            }
            backings.push({ name: reg.name, hva: reg.hva, size: reg.size, kind: 'thp' });
          } else {
            if (effective === 'hugetlb') {
              // Another plugin's allocateMemory tap answered first (e.g. a snapshot restore mapping a file).
              const message = `hugepages: RAM range ${reg.name} was mapped by another plugin before this one; it is not on huge pages (register hugepages earlier)`;
              warnings.push({ code: HUGEPAGES_ERRORS.UNSUPPORTED, message });
              log.warn({ code: HUGEPAGES_ERRORS.UNSUPPORTED, range: reg.name }, message);
            }
            backings.push({ name: reg.name, hva: reg.hva, size: reg.size, kind: 'anonymous' });
          }
        }
        log.debug({ effective, backings: backings.map((b) => `${b.name}:${b.kind}`) }, 'guest RAM backing');
      });
    },
  };
}
