import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';

/** Parses a Linux CPU/node list such as `0-3,8,10-11` (sysfs `online`, `Cpus_allowed_list`). */
export function parseCpuList(s: string): number[] {
  const out = new Set<number>();
  const t = s.trim();
  if (t === '') return [];
  for (const part of t.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m) throw new Error(`not a CPU list: ${JSON.stringify(s)}`);
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a) throw new Error(`not a CPU list: ${JSON.stringify(s)}`);
    for (let i = a; i <= b; i++) out.add(i);
  }
  return [...out].sort((x, y) => x - y);
}

/** Formats CPUs as a compact list (`0-3,8`), like the kernel does. */
export function formatCpuList(cpus: readonly number[]): string {
  const s = [...new Set(cpus)].sort((a, b) => a - b);
  const parts: string[] = [];
  for (let i = 0; i < s.length; ) {
    let j = i;
    while (j + 1 < s.length && s[j + 1] === s[j]! + 1) j++;
    parts.push(i === j ? `${s[i]}` : `${s[i]}-${s[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}

/** One host CPU as sysfs describes it. */
export interface HostCpu {
  cpu: number;
  /** physical_package_id (socket); 0 when unknown. */
  package: number;
  /** core_id within the package; the CPU number when unknown. */
  core: number;
  /** NUMA node; 0 when unknown. */
  node: number;
}

export interface HostCpuInfo {
  online: number[];
  cpus: HostCpu[];
}

/** Reads online CPUs and their topology from `sysfs` (default /sys). */
export function readHostCpus(sysfs = '/sys'): HostCpuInfo {
  const base = join(sysfs, 'devices/system/cpu');
  const online = parseCpuList(readFileSync(join(base, 'online'), 'utf8'));
  const nodeOf = new Map<number, number>();
  const nodeDir = join(sysfs, 'devices/system/node');
  if (existsSync(nodeDir)) {
    for (const d of readdirSync(nodeDir)) {
      const m = /^node(\d+)$/.exec(d);
      if (!m) continue;
      try {
        for (const c of parseCpuList(readFileSync(join(nodeDir, d, 'cpulist'), 'utf8'))) nodeOf.set(c, Number(m[1]));
      } catch {
        /* node without cpulist */
      }
    }
  }
  const num = (p: string, dflt: number): number => {
    try {
      const v = Number(readFileSync(p, 'utf8').trim());
      return Number.isInteger(v) && v >= 0 ? v : dflt;
    } catch {
      return dflt;
    }
  };
  const cpus = online.map((cpu) => ({
    cpu,
    package: num(join(base, `cpu${cpu}`, 'topology/physical_package_id'), 0),
    core: num(join(base, `cpu${cpu}`, 'topology/core_id'), cpu),
    node: nodeOf.get(cpu) ?? 0,
  }));
  return { online, cpus };
}

/**
 * CPU order for the `spread` policy: one CPU per physical core first, alternating between NUMA nodes and
 * packages (so vCPU 0 and 1 land on different sockets when there are several), SMT siblings last.
 */
export function spreadOrder(cpus: readonly HostCpu[]): number[] {
  const byCore = new Map<string, HostCpu[]>();
  for (const c of [...cpus].sort((a, b) => a.cpu - b.cpu)) {
    const k = `${c.node}/${c.package}/${c.core}`;
    const l = byCore.get(k) ?? [];
    l.push(c);
    byCore.set(k, l);
  }
  // Rounds: round r takes the r-th thread of every core; within a round, cores alternate between domains.
  const domains = new Map<string, HostCpu[][]>();
  for (const [k, threads] of byCore) {
    const d = k.slice(0, k.lastIndexOf('/'));
    const l = domains.get(d) ?? [];
    l.push(threads);
    domains.set(d, l);
  }
  const out: number[] = [];
  const maxThreads = Math.max(0, ...[...byCore.values()].map((t) => t.length));
  const doms = [...domains.values()];
  for (let r = 0; r < maxThreads; r++) {
    const maxCores = Math.max(0, ...doms.map((d) => d.length));
    for (let i = 0; i < maxCores; i++) {
      for (const d of doms) {
        const t = d[i]?.[r];
        if (t) out.push(t.cpu);
      }
    }
  }
  return out;
}

/** CPU order for the `pack` policy: node by node, package by package, core by core, SMT siblings together. */
export function packOrder(cpus: readonly HostCpu[]): number[] {
  return [...cpus].sort((a, b) => a.node - b.node || a.package - b.package || a.core - b.core || a.cpu - b.cpu).map((c) => c.cpu);
}
