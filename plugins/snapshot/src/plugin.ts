import { checkOptions, type Machine, type Plugin, type Strategy } from '@kvmkit/kernel';
import type { SnapshotOptions, SnapshotResult, Tracker } from './strategies.js';
import { statefulMachine, findSnapshotStrategy } from './machine.js';

/*
 * Start-up: every VM gets this plugin, but few take a snapshot. The strategy code (state/memory file writers,
 * hashing; ./strategies.js and what it imports) is imported on a strategy's first run, not with the plugin.
 */
type StrategiesModule = typeof import('./strategies.js');
let strategiesModule: Promise<StrategiesModule> | undefined;
const loadStrategies = (): Promise<StrategiesModule> => (strategiesModule ??= import('./strategies.js'));

/** A strategy whose code loads on its first run: the same as `fullStrategy(t)`/`diffStrategy(t)` then. */
function lazyStrategy(kind: 'full' | 'diff', description: string, t: Tracker): Strategy {
  let real: Strategy | undefined;
  return {
    name: kind,
    description,
    run: async (m, o) => {
      if (!real) {
        const s = await loadStrategies();
        real = kind === 'full' ? s.fullStrategy(t) : s.diffStrategy(t);
      }
      return real.run(m, o);
    },
  };
}

/** What the plugin publishes with machine.provide('snapshot', …). */
export interface SnapshotApi {
  /** The snapshot a following 'diff' builds on (set by 'full'/'diff' and by a tracked restore). */
  base(): { path: string; sha256: string } | undefined;
  /** Sets the base (used by the restore plugin); dirty tracking starts at the next snapshot or now if the VM exists. */
  setBase(b: { path: string; sha256: string }): void;
  /** Whether this plugin keeps KVM dirty logging on (another user of the dirty log must leave it on). */
  logging(): boolean;
  /**
   * Another consumer of the KVM dirty log (live migration) hands over the bits it read (KVM clears them on
   * read), so that the next diff still contains those pages.
   */
  noteDirty(slot: number, bitmap: Uint8Array): void;
}

export interface SnapshotPluginOptions {
  /** Register the built-in strategies (default true). */
  strategies?: boolean;
}

/** Registers the 'full' and 'diff' snapshot strategies on `machine.hooks.snapshotStrategy`. */
export default function snapshotPlugin(options: SnapshotPluginOptions = {}): Plugin {
  return {
    name: 'snapshot',
    version: '0.1.0',
    kernel: '^0.1.0',
    provides: ['snapshot-strategy:full', 'snapshot-strategy:diff'],
    options,
    validateOptions(o) {
      checkOptions('snapshot', o, { strategies: { type: 'boolean' } });
    },
    apply(machine) {
      // Same as strategies.js newTracker() (kept here so that the plugin does not import the strategies).
      const t: Tracker = { base: undefined, pending: new Map(), logging: false, io: new Set() };
      if (options.strategies !== false) {
        const full = lazyStrategy('full', 'pause, write state + whole memory, resume (or stop)', t);
        const diff = lazyStrategy('diff', 'pages dirtied since the previous snapshot (KVM dirty log), referencing it by hash', t);
        machine.hooks.snapshotStrategy.for('full').tap('snapshot', () => full);
        machine.hooks.snapshotStrategy.for('diff').tap('snapshot', () => diff);
      }
      const api: SnapshotApi = {
        base: () => t.base,
        setBase: (b) => {
          t.base = b;
          // Start logging now (called before the vCPUs run): pages written from here on go into the next diff.
          const vm = machine.vm;
          const mem = machine.memory;
          if (vm && mem) {
            for (const r of mem.regions) {
              // Just switched on, KVM's log (and the VMM's) is empty: reading it would only cost an ioctl.
              if (!t.logging) vm.setDirtyLogging(r.slot, true);
              else vm.getDirtyLog(r.slot);
              t.pending.set(r.slot, new Uint8Array(Math.ceil(r.size / 4096 / 64) * 8));
            }
            t.logging = true;
          }
        },
        logging: () => t.logging,
        noteDirty: (slot, bm) => {
          if (!t.logging) return;
          const acc = t.pending.get(slot);
          if (!acc) t.pending.set(slot, bm.slice());
          else for (let i = 0; i < acc.length && i < bm.length; i++) acc[i]! |= bm[i]!;
        },
      };
      machine.provide('snapshot', api);
      // A save writes and hashes guest RAM across event-loop turns: RAM is released only after it ended.
      machine.hooks.afterStop.tapPromise('snapshot', async () => {
        await Promise.allSettled([...t.io]);
      });
    },
  };
}

/**
 * Takes a snapshot of a running or paused machine with the named strategy ('full', 'diff', or one a
 * third-party plugin registered). The machine must have @kvmkit/plugin-snapshot (or that plugin).
 */
export async function snapshot(machine: Machine, options: SnapshotOptions & { strategy?: string }): Promise<SnapshotResult> {
  const { strategy = 'full', ...rest } = options;
  return (await findSnapshotStrategy(machine, strategy).run(statefulMachine(machine), rest)) as SnapshotResult;
}
