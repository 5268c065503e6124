import { readFileSync } from 'node:fs';
import { KvmkitError, ffi, type Plugin, type MachineApi } from '@kvmkit/kernel';
import { readHostCpus, spreadOrder, packOrder, parseCpuList, formatCpuList, type HostCpuInfo } from './topology.js';

export { parseCpuList, formatCpuList, readHostCpus, spreadOrder, packOrder } from './topology.js';
export type { HostCpu, HostCpuInfo } from './topology.js';

const NAME = 'pinning';

/** Error code of every pinning failure (invalid, offline or forbidden CPUs; affinity calls that fail). */
export const ERR_PINNING = 'KVMKIT_ERR_PINNING';

export type PinningPolicy = 'spread' | 'pack';

export interface PinningOptions {
  /** How vCPUs that the map does not name are placed: one CPU each, in `spread` or `pack` order. Default `spread` when no vCPU is mapped. */
  policy?: PinningPolicy;
  /** Host CPUs the policy may use (default: every online CPU this process may run on). */
  cpus?: number[];
  /** CPUs for the VMM's main thread (device emulation, mailbox, I/O); `'all'` = every allowed CPU. Unset: not pinned. */
  io?: number[] | 'all';
  /** sysfs root (tests). Default /sys. */
  sysfs?: string;
  /** `vcpu0: [0]`, `vcpu1: [1, 2]`, … explicit CPU sets per vCPU. */
  [vcpu: `vcpu${number}`]: number[] | undefined;
}

/** The resolved placement. `vcpus[i]` undefined = vCPU i is not pinned. */
export interface PinningPlan {
  vcpus: Array<number[] | undefined>;
  io: number[] | undefined;
  /** CPUs that are online and allowed for this process. */
  available: number[];
}

/** What the plugin publishes with `machine.use('pinning')`. */
export interface PinningApi {
  plan(): PinningPlan | undefined;
  /** Affinity as read back with sched_getaffinity after pinning: vCPU tid → CPUs. */
  applied(): Array<{ index: number; tid: number; cpus: number[] }>;
}

function fail(message: string, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError(ERR_PINNING, `pinning: ${message}`, { details });
}

const KNOWN = new Set(['policy', 'cpus', 'io', 'sysfs']);

function checkCpuArray(key: string, v: unknown): number[] {
  if (!Array.isArray(v) || v.length === 0 || !v.every((c) => Number.isInteger(c) && c >= 0 && c < 1024)) {
    throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `pinning: option ${key} must be a non-empty array of CPU numbers 0..1023 (got ${JSON.stringify(v)})`, {
      details: { plugin: NAME, key },
    });
  }
  return [...new Set(v as number[])].sort((a, b) => a - b);
}

/** Checks option shapes (no host access). */
export function validatePinningOptions(o: unknown): void {
  if (o === undefined || o === null) return;
  if (typeof o !== 'object' || Array.isArray(o)) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'pinning: options must be an object', { details: { plugin: NAME } });
  for (const [k, v] of Object.entries(o)) {
    if (/^vcpu(0|[1-9]\d{0,3})$/.test(k)) checkCpuArray(k, v);
    else if (k === 'policy') {
      if (v !== 'spread' && v !== 'pack') throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `pinning: option policy must be "spread" or "pack" (got ${JSON.stringify(v)})`, { details: { plugin: NAME, key: k } });
    } else if (k === 'cpus') checkCpuArray(k, v);
    else if (k === 'io') {
      if (v !== 'all') checkCpuArray(k, v);
    } else if (k === 'sysfs') {
      if (typeof v !== 'string') throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'pinning: option sysfs must be a string', { details: { plugin: NAME, key: k } });
    } else if (!KNOWN.has(k)) {
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `pinning: unknown option ${k} (known: vcpu<N>, policy, cpus, io, sysfs)`, { details: { plugin: NAME, key: k } });
    }
  }
}

/**
 * CPUs this process may run on: the cgroup's effective cpuset when readable, else the calling thread's affinity.
 * (The main thread's affinity may be narrower than the cpuset if someone pinned it; the cpuset is the hard limit.)
 */
export function allowedCpus(): number[] {
  for (const p of ['/sys/fs/cgroup/cpuset.cpus.effective']) {
    try {
      const l = parseCpuList(readFileSync(p, 'utf8'));
      if (l.length > 0) return l;
    } catch {
      /* no cgroup v2 cpuset */
    }
  }
  return ffi.getAffinity(0);
}

/**
 * Resolves options into a per-vCPU plan for `cpus` vCPUs on `host`; throws KVMKIT_ERR_PINNING naming every CPU
 * that is not online or not allowed, and every vCPU key beyond the VM's vCPU count.
 */
export function planPinning(options: PinningOptions, cpus: number, host: HostCpuInfo, allowed: readonly number[]): PinningPlan {
  validatePinningOptions(options);
  const online = new Set(host.online);
  const allow = new Set(allowed);
  const available = host.online.filter((c) => allow.has(c));
  const check = (key: string, list: number[]): number[] => {
    const offline = list.filter((c) => !online.has(c));
    if (offline.length > 0) {
      throw fail(`${key} names CPU ${formatCpuList(offline)}, which ${offline.length > 1 ? 'are' : 'is'} not online (online: ${formatCpuList(host.online)})`, {
        key, cpus: offline, online: host.online,
      });
    }
    const forbidden = list.filter((c) => !allow.has(c));
    if (forbidden.length > 0) {
      throw fail(`${key} names CPU ${formatCpuList(forbidden)}, which this process may not use (cpuset: ${formatCpuList(allowed)})`, {
        key, cpus: forbidden, allowed,
      });
    }
    return list;
  };
  const o = options as Record<string, unknown>;
  const vcpus: Array<number[] | undefined> = Array.from({ length: cpus }, () => undefined);
  let mapped = 0;
  for (const [k, v] of Object.entries(o)) {
    const m = /^vcpu(\d+)$/.exec(k);
    if (!m) continue;
    const i = Number(m[1]);
    if (i >= cpus) throw fail(`${k} given but the VM has ${cpus} vCPU${cpus > 1 ? 's' : ''} (vcpu0..vcpu${cpus - 1})`, { key: k, cpus });
    vcpus[i] = check(k, checkCpuArray(k, v));
    mapped++;
  }
  const policy = options.policy ?? (mapped === 0 ? 'spread' : undefined);
  if (policy) {
    const pool = options.cpus ? check('cpus', checkCpuArray('cpus', options.cpus)) : available;
    if (pool.length === 0) throw fail('no CPU is available for the policy', { online: host.online, allowed });
    const inPool = new Set(pool);
    const topo = host.cpus.filter((c) => inPool.has(c.cpu));
    const order = policy === 'spread' ? spreadOrder(topo) : packOrder(topo);
    let next = 0;
    for (let i = 0; i < cpus; i++) {
      if (vcpus[i]) continue;
      vcpus[i] = [order[next % order.length]!];
      next++;
    }
  }
  let io: number[] | undefined;
  if (options.io === 'all') io = available;
  else if (options.io) io = check('io', checkCpuArray('io', options.io));
  return { vcpus, io, available };
}

/**
 * Pins each vCPU worker thread (by its Linux tid, from the `vcpuThread` hook) and, with `io`, the VMM's main
 * thread. Everything is checked in `validate`, before any KVM object exists.
 */
export default function pinning(options: PinningOptions = {}): Plugin {
  return {
    name: NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    validateOptions: validatePinningOptions,
    apply(machine: MachineApi, { log }) {
      let plan: PinningPlan | undefined;
      const applied: Array<{ index: number; tid: number; cpus: number[] }> = [];
      let seen = 0;
      let mainBefore: number[] | undefined;
      machine.provide(NAME, { plan: () => plan, applied: () => applied.map((a) => ({ ...a, cpus: [...a.cpus] })) } satisfies PinningApi);

      machine.hooks.validate.tap(NAME, (config) => {
        let host: HostCpuInfo;
        try {
          host = readHostCpus(options.sysfs);
        } catch (e) {
          throw fail(`cannot read the host's CPUs from ${options.sysfs ?? '/sys'}: ${(e as Error).message}`);
        }
        plan = planPinning(options, config.cpus, host, options.sysfs ? host.online : allowedCpus());
        log.info({ vcpus: plan.vcpus.map((c) => (c ? formatCpuList(c) : 'unpinned')), io: plan.io ? formatCpuList(plan.io) : 'unpinned' }, 'pinning plan');
      });

      const pin = (what: string, tid: number, cpus: number[]): number[] => {
        const r = ffi.setAffinity(tid, cpus);
        if (r < 0) throw fail(`sched_setaffinity(${what}, tid ${tid}, CPUs ${formatCpuList(cpus)}) failed with errno ${-r}`, { tid, cpus, errno: -r });
        const got = ffi.getAffinity(tid);
        if (formatCpuList(got) !== formatCpuList(cpus)) throw fail(`${what} (tid ${tid}) runs on CPUs ${formatCpuList(got)} after pinning to ${formatCpuList(cpus)}`, { tid, cpus, got });
        return got;
      };

      machine.hooks.vcpuThread.tapPromise(NAME, async ({ index, tid }) => {
        if (!plan) return;
        const cpus = plan.vcpus[index];
        if (cpus) {
          const got = pin(`vCPU ${index}`, tid, cpus);
          applied.push({ index, tid, cpus: got });
          log.debug({ vcpu: index, tid, cpus: formatCpuList(got) }, 'vCPU pinned');
        }
        seen++;
        // The main thread last: workers inherit the affinity of the thread that creates them, so pinning it
        // earlier would leave unmapped vCPUs on the I/O CPUs.
        if (seen === machine.config.cpus && plan.io) {
          mainBefore = ffi.getAffinity(0);
          pin('main thread', 0, plan.io);
          log.debug({ tid: ffi.gettid(), cpus: formatCpuList(plan.io) }, 'main thread pinned');
        }
      });

      const restore = (): void => {
        if (mainBefore) {
          // The VMM process may go on (tests, a supervisor): give the main thread its old CPUs back.
          const r = ffi.setAffinity(0, mainBefore);
          if (r < 0) log.warn({ errno: -r }, 'could not restore the main thread affinity');
          mainBefore = undefined;
        }
      };
      machine.hooks.afterStop.tapPromise(NAME, async () => restore());
      machine.hooks.failed.tap(NAME, () => restore());
    },
  };
}
