import { checkOptions, type Machine, type Plugin, type Strategy } from '@kvmkit/kernel';
import type { MigrateOptions, MigrationReport } from './source.js';

/*
 * Start-up: every VM gets this plugin, few migrate. The migration code (./source.js, the wire protocol, and
 * @kvmkit/plugin-snapshot's helpers) is imported on the strategy's first run, not with the plugin.
 */
type SourceModule = typeof import('./source.js');
let sourceModule: Promise<SourceModule> | undefined;
const loadSource = (): Promise<SourceModule> => (sourceModule ??= import('./source.js'));

/** The same as source.js `precopyStrategy()`, its code loaded on the first run. */
function lazyPrecopyStrategy(): Strategy {
  return {
    name: 'precopy',
    description: 'pre-copy live migration over a unix socket or loopback TCP',
    run: async (m, o) => (await loadSource()).runPrecopy(m, o),
  };
}

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
      const s = lazyPrecopyStrategy();
      machine.hooks.migrationStrategy.for('precopy').tap('migrate-precopy', () => s);
    },
  };
}

/** Migrates a running machine with the named strategy (default 'precopy'); resolves with its report. */
export async function migrate(machine: Machine, options: MigrateOptions & { strategy?: string }): Promise<MigrationReport> {
  const { strategy = 'precopy', ...rest } = options;
  const [{ statefulMachine }, { migErr }] = await Promise.all([import('@kvmkit/plugin-snapshot'), import('./protocol.js')]);
  const s = machine.hooks.migrationStrategy.get(strategy)?.call();
  if (!s) throw migErr('KVMKIT_ERR_MIGRATE_STRATEGY', `no migration strategy named '${strategy}' is registered (add @kvmkit/plugin-migrate-precopy)`, { strategy });
  return (await s.run(statefulMachine(machine), rest)) as MigrationReport;
}
