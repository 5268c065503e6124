import { checkOptions, type Machine, type Plugin } from '@kvmkit/kernel';
import { statefulMachine } from '@kvmkit/plugin-snapshot';
import { precopyStrategy, type MigrateOptions, type MigrationReport } from './source.js';
import { migErr } from './protocol.js';

/** Registers the 'precopy' strategy on `machine.hooks.migrationStrategy`. */
export default function migratePrecopy(options: Record<string, never> = {}): Plugin {
  return {
    name: 'migrate-precopy',
    version: '0.1.0',
    kernel: '^0.1.0',
    provides: ['migration-strategy:precopy'],
    options,
    validateOptions(o) {
      checkOptions('migrate-precopy', o, {});
    },
    apply(machine) {
      const s = precopyStrategy();
      machine.hooks.migrationStrategy.for('precopy').tap('migrate-precopy', () => s);
    },
  };
}

/** Migrates a running machine with the named strategy (default 'precopy'); resolves with its report. */
export async function migrate(machine: Machine, options: MigrateOptions & { strategy?: string }): Promise<MigrationReport> {
  const { strategy = 'precopy', ...rest } = options;
  const s = machine.hooks.migrationStrategy.get(strategy)?.call();
  if (!s) throw migErr('KVMKIT_ERR_MIGRATE_STRATEGY', `no migration strategy named '${strategy}' is registered (add @kvmkit/plugin-migrate-precopy)`, { strategy });
  return (await s.run(statefulMachine(machine), rest)) as MigrationReport;
}
