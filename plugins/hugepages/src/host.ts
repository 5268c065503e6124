import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

export type HugePageSize = '2M' | '1G';

export const PAGE_BYTES: Record<HugePageSize, number> = { '2M': 2 * 1024 * 1024, '1G': 1024 * 1024 * 1024 };
const SYSFS_DIR: Record<HugePageSize, string> = { '2M': 'hugepages-2048kB', '1G': 'hugepages-1048576kB' };

/** The host's huge page pool for one size (/sys/kernel/mm/hugepages/hugepages-<n>kB). */
export interface HugePagePool {
  size: HugePageSize;
  /** False when the kernel/CPU does not offer this size at all. */
  supported: boolean;
  total: number;
  free: number;
  /** Reserved by mappings but not yet faulted in (not usable by a new mapping). */
  reserved: number;
  surplus: number;
  /** free − reserved: what a new mapping can reserve. */
  available: number;
  /** The sysfs file that sets the pool size. */
  sysfsPath: string;
  /** True when this is the default huge page size (then `sysctl vm.nr_hugepages` sets it). */
  isDefault: boolean;
}

function num(p: string): number {
  try {
    const v = Number(readFileSync(p, 'utf8').trim());
    return Number.isFinite(v) ? v : 0;
  } catch {
    return 0;
  }
}

/** Reads the pool of `size` pages under `sysfs` (default /sys) and the default size from `meminfo`. */
export function readPool(size: HugePageSize, sysfs = '/sys', meminfo = '/proc/meminfo'): HugePagePool {
  const dir = join(sysfs, 'kernel/mm/hugepages', SYSFS_DIR[size]);
  const supported = existsSync(dir);
  let defaultKb = 2048;
  try {
    const m = /^Hugepagesize:\s+(\d+) kB/m.exec(readFileSync(meminfo, 'utf8'));
    if (m) defaultKb = Number(m[1]);
  } catch {
    /* keep 2 MiB */
  }
  const total = num(join(dir, 'nr_hugepages'));
  const free = num(join(dir, 'free_hugepages'));
  const reserved = num(join(dir, 'resv_hugepages'));
  return {
    size, supported, total, free, reserved,
    surplus: num(join(dir, 'surplus_hugepages')),
    available: Math.max(0, free - reserved),
    sysfsPath: join(dir, 'nr_hugepages'),
    isDefault: defaultKb * 1024 === PAGE_BYTES[size],
  };
}

/** The exact command that grows the pool so that `needed` more pages are available. */
export function reserveCommand(pool: HugePagePool, needed: number): string {
  const target = pool.total + Math.max(0, needed - pool.available);
  if (pool.isDefault) return `sysctl vm.nr_hugepages=${target}`;
  return `echo ${target} > ${pool.sysfsPath}`;
}

/** THP mode from /sys/kernel/mm/transparent_hugepage/enabled ('always' | 'madvise' | 'never' | 'unsupported'). */
export function thpMode(sysfs = '/sys'): 'always' | 'madvise' | 'never' | 'unsupported' {
  try {
    const s = readFileSync(join(sysfs, 'kernel/mm/transparent_hugepage/enabled'), 'utf8');
    const m = /\[(\w+)\]/.exec(s);
    const v = m?.[1];
    return v === 'always' || v === 'madvise' || v === 'never' ? v : 'unsupported';
  } catch {
    return 'unsupported';
  }
}
