#!/usr/bin/env node
import { earlyVcpuCount } from './early.js';

const argv = process.argv.slice(2);

// Start-up: a VM's vCPU worker threads take tens of ms to boot (isolate, Node bootstrap, koffi). Begin them
// before importing the CLI, kernel and plugins, so both happen at once; the Machine adopts them
// (@kvmkit/kernel vcpu/pool.js, loaded by file URL: it imports nothing, unlike the kernel's index).
const early = earlyVcpuCount(argv);
let pool: { prespawnVcpuWorkers(n: number): void; discardPrespawned(): Promise<void> } | undefined;
if (early > 0) {
  try {
    pool = (await import(new URL('./vcpu/pool.js', import.meta.resolve('@kvmkit/kernel')).href)) as typeof pool;
    pool!.prespawnVcpuWorkers(early);
  } catch {
    // Not fatal: the Machine spawns its own workers.
  }
}

/**
 * Workers that were never adopted (the command failed before a VM started) are terminated before exiting: a
 * process.exit() while a worker is still loading koffi's native module aborts the process (SIGABRT, seen under load).
 */
async function exit(code: number): Promise<never> {
  try {
    await pool?.discardPrespawned();
  } catch {
    /* exiting anyway */
  }
  process.exit(code);
}

const { main } = await import('./main.js');

// Exit explicitly: vCPU workers and fd watchers are released by Machine.stop(), but a plugin that leaves a handle
// open must not keep the command alive after the VM stopped. stdout/stderr writes are synchronous for files and
// pipes on Linux, so nothing printed is lost.
main(argv).then(
  (code) => exit(code),
  (e: unknown) => {
    process.stderr.write(`error KVMKIT_ERR_INTERNAL: ${(e as Error)?.stack ?? e}\n`);
    return exit(1);
  },
);
