import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { KvmkitError, ffi, type Plugin, type MachineApi } from '@kvmkit/kernel';

const NAME = 'numa';

export const NUMA_ERRORS = {
  /** A node that does not exist on this host, or has no memory. */
  NODE: 'KVMKIT_ERR_NUMA_NODE',
  /** mbind failed, or get_mempolicy reads back a different policy. */
  POLICY: 'KVMKIT_ERR_NUMA_POLICY',
} as const;

export type NumaPolicy = 'bind' | 'preferred' | 'interleave';

export interface NumaRangePolicy {
  policy: NumaPolicy;
  nodes: number[];
}

export interface NumaOptions {
  /** Policy for every guest RAM range (default 'bind'). */
  policy?: NumaPolicy;
  /** Host nodes (required unless every range has its own entry in `ranges`). */
  nodes?: number[];
  /** Per RAM range name ('ram', 'ram-high', …): its own policy and nodes. */
  ranges?: Record<string, NumaRangePolicy>;
  /** Move pages already faulted in to the nodes (MPOL_MF_MOVE; default true). */
  move?: boolean;
  /** sysfs root (tests). Default /sys. */
  sysfs?: string;
}

export interface HostNode {
  node: number;
  cpus: number[];
  /** MemTotal of the node in KiB (0 for CPU-only nodes; undefined when sysfs does not say). */
  memoryKiB: number | undefined;
}

/** What `machine.use('numa')` returns. */
export interface NumaApi {
  hostNodes(): HostNode[];
  /** Per range: the policy applied and what get_mempolicy reads back. */
  applied(): Array<{ range: string; hva: bigint; size: number; policy: NumaPolicy; nodes: number[] }>;
}

function parseList(s: string): number[] {
  const out: number[] = [];
  for (const part of s.trim().split(',')) {
    if (part === '') continue;
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) continue;
    for (let i = Number(m[1]); i <= Number(m[2] ?? m[1]); i++) out.push(i);
  }
  return out;
}

/** Host NUMA nodes from /sys/devices/system/node (a host without that directory is one node 0). */
export function hostNodes(sysfs = '/sys'): HostNode[] {
  const dir = join(sysfs, 'devices/system/node');
  if (!existsSync(dir)) return [{ node: 0, cpus: [], memoryKiB: undefined }];
  const out: HostNode[] = [];
  for (const d of readdirSync(dir)) {
    const m = /^node(\d+)$/.exec(d);
    if (!m) continue;
    let cpus: number[] = [];
    let memoryKiB: number | undefined;
    try { cpus = parseList(readFileSync(join(dir, d, 'cpulist'), 'utf8')); } catch { /* none */ }
    try {
      const mm = /MemTotal:\s+(\d+) kB/.exec(readFileSync(join(dir, d, 'meminfo'), 'utf8'));
      if (mm) memoryKiB = Number(mm[1]);
    } catch { /* none */ }
    out.push({ node: Number(m[1]), cpus, memoryKiB });
  }
  return out.sort((a, b) => a.node - b.node);
}

const MODE: Record<NumaPolicy, number> = { bind: ffi.MPOL_BIND, preferred: ffi.MPOL_PREFERRED, interleave: ffi.MPOL_INTERLEAVE };

function optErr(message: string, key: string): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${NAME}: ${message}`, { details: { plugin: NAME, key } });
}

function checkPolicy(p: unknown, key: string): void {
  if (p !== 'bind' && p !== 'preferred' && p !== 'interleave') throw optErr(`${key} must be "bind", "preferred" or "interleave" (got ${JSON.stringify(p)})`, key);
}
function checkNodes(n: unknown, key: string): void {
  if (!Array.isArray(n) || n.length === 0 || !n.every((x) => Number.isInteger(x) && x >= 0 && x < 1024)) throw optErr(`${key} must be a non-empty array of node numbers (got ${JSON.stringify(n)})`, key);
}

export function validateNumaOptions(o: unknown): void {
  if (o === undefined || o === null) o = {};
  if (typeof o !== 'object' || Array.isArray(o)) throw optErr('options must be an object', '');
  const x = o as Record<string, unknown>;
  for (const k of Object.keys(x)) if (!['policy', 'nodes', 'ranges', 'move', 'sysfs'].includes(k)) throw optErr(`unknown option ${k} (known: policy, nodes, ranges, move, sysfs)`, k);
  if (x.policy !== undefined) checkPolicy(x.policy, 'policy');
  if (x.nodes !== undefined) checkNodes(x.nodes, 'nodes');
  if (x.move !== undefined && typeof x.move !== 'boolean') throw optErr('move must be a boolean', 'move');
  if (x.sysfs !== undefined && typeof x.sysfs !== 'string') throw optErr('sysfs must be a string', 'sysfs');
  if (x.ranges !== undefined) {
    if (typeof x.ranges !== 'object' || x.ranges === null || Array.isArray(x.ranges)) throw optErr('ranges must be an object: range name → { policy, nodes }', 'ranges');
    for (const [name, r] of Object.entries(x.ranges as Record<string, unknown>)) {
      const rr = (r ?? {}) as Record<string, unknown>;
      checkPolicy(rr.policy, `ranges.${name}.policy`);
      checkNodes(rr.nodes, `ranges.${name}.nodes`);
    }
  }
  if (x.nodes === undefined && x.ranges === undefined) throw optErr('nodes is required (or per-range entries in ranges)', 'nodes');
}

/**
 * Binds guest RAM ranges to host NUMA nodes with mbind(2) (`memoryMapped`, before KVM maps the memory and before
 * the boot loader writes into it), checked with get_mempolicy. Nodes are validated against the host in `validate`.
 */
export default function numa(options: NumaOptions = {}): Plugin {
  return {
    name: NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    validateOptions: validateNumaOptions,
    apply(machine: MachineApi, { log }) {
      let nodes: HostNode[] = [];
      const applied: Array<{ range: string; hva: bigint; size: number; policy: NumaPolicy; nodes: number[] }> = [];
      machine.provide(NAME, { hostNodes: () => nodes.map((n) => ({ ...n })), applied: () => applied.map((a) => ({ ...a })) } satisfies NumaApi);

      const wanted = (range: string): NumaRangePolicy | undefined => {
        const r = options.ranges?.[range];
        if (r) return r;
        if (options.nodes) return { policy: options.policy ?? 'bind', nodes: options.nodes };
        return undefined;
      };

      machine.hooks.validate.tap(NAME, () => {
        nodes = hostNodes(options.sysfs);
        const known = new Map(nodes.map((n) => [n.node, n]));
        const all = [...(options.nodes ? [{ key: 'nodes', p: { policy: options.policy ?? 'bind', nodes: options.nodes } }] : []),
          ...Object.entries(options.ranges ?? {}).map(([k, p]) => ({ key: `ranges.${k}`, p }))];
        for (const { key, p } of all) {
          const missing = p.nodes.filter((n) => !known.has(n));
          if (missing.length > 0) {
            throw new KvmkitError(NUMA_ERRORS.NODE, `${NAME}: ${key} names node ${missing.join(', ')}, which this host does not have (host nodes: ${nodes.map((n) => n.node).join(', ')})`, {
              details: { key, missing, hostNodes: nodes.map((n) => n.node) },
            });
          }
          const memless = p.nodes.filter((n) => known.get(n)!.memoryKiB === 0);
          if (p.policy === 'bind' && memless.length === p.nodes.length) {
            throw new KvmkitError(NUMA_ERRORS.NODE, `${NAME}: ${key} binds to node ${memless.join(', ')}, which has no memory`, { details: { key, nodes: memless } });
          }
        }
        log.info({ hostNodes: nodes.map((n) => n.node), policy: options.policy ?? 'bind', nodes: options.nodes, ranges: options.ranges }, 'NUMA placement');
      });

      machine.hooks.memoryMapped.tapPromise(NAME, async (memory) => {
        for (const r of memory.regions) {
          const p = wanted(r.name);
          if (!p) continue;
          let mode = MODE[p.policy];
          if (p.policy === 'preferred' && p.nodes.length > 1) mode = ffi.MPOL_PREFERRED_MANY;
          const flags = options.move === false ? 0 : ffi.MPOL_MF_MOVE;
          const rc = ffi.mbind(r.hva, r.size, mode, p.nodes, flags);
          if (rc < 0) {
            throw new KvmkitError(NUMA_ERRORS.POLICY, `${NAME}: mbind(${r.name}, ${p.policy}, nodes ${p.nodes.join(',')}) failed with errno ${-rc}`, { details: { range: r.name, errno: -rc, policy: p.policy, nodes: p.nodes } });
          }
          const back = ffi.getMempolicy(r.hva);
          if (back.mode !== mode || back.nodes.join(',') !== [...p.nodes].sort((a, b) => a - b).join(',')) {
            throw new KvmkitError(NUMA_ERRORS.POLICY, `${NAME}: ${r.name} reads back policy ${back.mode} nodes ${back.nodes.join(',')} after mbind(${mode}, ${p.nodes.join(',')})`, { details: { range: r.name, back } });
          }
          applied.push({ range: r.name, hva: r.hva, size: r.size, policy: p.policy, nodes: [...p.nodes] });
          log.debug({ range: r.name, policy: p.policy, nodes: p.nodes }, 'guest RAM bound');
        }
      });
    },
  };
}
