import { KvmkitError, type Machine, type MachineApi, type Strategy } from '@kvmkit/kernel';
import { snapErr } from './errors.js';

/**
 * What a snapshot or migration strategy gets: the machine API, which carries state save/restore, the plugin
 * list and stop() (kept as a name for strategies written against it).
 */
export type StatefulMachine = MachineApi;

/** The view strategies run against: the machine's plugin API. */
export function statefulMachine(machine: Machine): StatefulMachine {
  return machine.api;
}

/** Checks that a strategy got a machine API with state save/restore (a third-party caller may pass a mock). */
export function requireStateful(m: MachineApi): StatefulMachine {
  const s = m as Partial<StatefulMachine>;
  if (typeof s.saveState !== 'function' || typeof s.restoreState !== 'function') {
    throw new KvmkitError('KVMKIT_ERR_STATE', 'snapshot/migration strategies need a machine API with saveState/restoreState');
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
