/**
 * What bin.ts decides before it imports anything heavy. Kept free of imports: it runs first thing.
 */

/**
 * How many vCPU workers to start before the CLI's modules are imported (0 = none): for `run`/`restore` that will
 * start a VM, `--cpus N` (or 1 when absent/invalid: the default, and vCPU 0 of a config VM). A guess only — the
 * full argument parser decides; a Machine adopts these workers and spawns any it lacks, extra ones are dropped.
 */
export function earlyVcpuCount(argv: readonly string[]): number {
  const cmd = argv[0];
  if (cmd !== 'run' && cmd !== 'restore') return 0;
  let n = 1;
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    if (a === '-h' || a === '--help' || a === '--dry-run') return 0;
    let v: string | undefined;
    if (a === '--cpus') v = argv[++i];
    else if (a.startsWith('--cpus=')) v = a.slice('--cpus='.length);
    else continue;
    const x = v !== undefined && /^[1-9][0-9]{0,2}$/.test(v) ? Number(v) : NaN;
    n = Number.isInteger(x) && x <= 64 ? x : 1;
  }
  return n;
}
