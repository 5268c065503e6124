import { KvmkitError, type Machine, type MachineApi, type StateSection, type Strategy } from '@kvmkit/kernel';
import { snapErr } from './errors.js';

/**
 * What a snapshot or migration strategy gets: the plugin view of the machine plus the kernel's state
 * save/restore (which MachineApi does not carry yet) and the registered plugins.
 */
export interface StatefulMachine extends MachineApi {
  saveState(): Promise<Map<string, StateSection>>;
  restoreState(sections: ReadonlyMap<string, StateSection>): Promise<void>;
  /** Name and version of every registered plugin (recorded in snapshots, checked on restore). */
  readonly plugins: ReadonlyArray<{ name: string; version: string }>;
  /** Stops the machine and resolves when it has released everything. */
  stop(): Promise<void>;
}

/** Wraps a Machine into the view strategies run against. */
export function statefulMachine(machine: Machine): StatefulMachine {
  const extra = {
    saveState: { value: () => machine.saveState() },
    restoreState: { value: (s: ReadonlyMap<string, StateSection>) => machine.restoreState(s) },
    plugins: { get: () => machine.pluginHost.list().map((p) => ({ name: p.name, version: p.version })) },
    stop: { value: () => machine.stop() },
  };
  return Object.freeze(Object.create(machine.api, extra)) as StatefulMachine;
}

/** Checks that a strategy got a StatefulMachine (a third-party caller may pass a bare MachineApi). */
export function requireStateful(m: MachineApi): StatefulMachine {
  const s = m as Partial<StatefulMachine>;
  if (typeof s.saveState !== 'function' || typeof s.restoreState !== 'function') {
    throw new KvmkitError('KVMKIT_ERR_STATE', 'snapshot/migration strategies need the machine from statefulMachine(machine), not the plain plugin API');
  }
  return m as StatefulMachine;
}

/** Looks up a snapshot strategy by name ('full', 'diff', or a third party's). */
export function findSnapshotStrategy(machine: Machine, name: string): Strategy {
  const s = machine.hooks.snapshotStrategy.get(name)?.call();
  if (!s) {
    throw snapErr('KVMKIT_ERR_SNAPSHOT_STRATEGY', `no snapshot strategy named '${name}' is registered (add @kvmkit/plugin-snapshot, or the plugin that provides it)`, { strategy: name });
  }
  return s;
}
