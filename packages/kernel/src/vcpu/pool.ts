/**
 * vCPU worker threads spawned before a Machine exists. A worker's start-up (thread, isolate, Node bootstrap,
 * koffi) takes 20–80 ms; a command line tool that knows it is about to start a VM can begin it first thing
 * (`prespawnVcpuWorkers(n)`), so that it runs while the rest of the program is still being imported. The next
 * Machine.start() in this process adopts these workers instead of spawning its own.
 *
 * Deliberately light: this module imports nothing but node:worker_threads, so a caller can load it (by file URL)
 * before @kvmkit/kernel's index and its dependencies.
 */
import { Worker } from 'node:worker_threads';

/** The vCPU worker script (the built one when running from src/ under vitest). */
export function vcpuWorkerUrl(): URL {
  const here = import.meta.url;
  if (here.endsWith('.ts')) return new URL('../../dist/vcpu/worker.js', here);
  return new URL('./worker.js', here);
}

/** Workers that failed or exited before a Machine adopted them (reported when it does). */
const failures = new WeakMap<Worker, Error>();

/** Spawned, not yet adopted; in order (the first is handed to vCPU 0). */
const pool: Worker[] = [];

/** Resolves once a worker has loaded its modules (its 'loaded' message), errored or exited. */
const loadedOf = new WeakMap<Worker, Promise<void>>();

/** Spawns a vCPU worker that waits for its init message; early failures are remembered (workerFailure). */
export function spawnVcpuWorker(name: string, workerData?: unknown): Worker {
  const w = new Worker(vcpuWorkerUrl(), workerData === undefined ? { name } : { name, workerData });
  w.on('error', (e) => { if (!failures.has(w)) failures.set(w, e); });
  w.once('exit', (code) => { if (!failures.has(w)) failures.set(w, new Error(`exited with code ${code}`)); });
  loadedOf.set(w, new Promise<void>((res) => {
    const onMessage = (m: { type?: string } | undefined) => {
      if (m?.type !== 'loaded') return;
      w.off('message', onMessage);
      res();
    };
    w.on('message', onMessage);
    w.once('error', () => res());
    w.once('exit', () => res());
  }));
  return w;
}

/**
 * Terminates a vCPU worker, first letting it finish loading its modules (at most `waitMs`): Worker.terminate()
 * or process.exit() while koffi's native addon initialises in the worker aborts the process (FATAL ERROR
 * napi_throw, seen with a CLI that failed right after pre-spawning its workers).
 */
export async function terminateVcpuWorker(w: Worker, waitMs = 5000): Promise<void> {
  const loaded = loadedOf.get(w);
  if (loaded) {
    let t: NodeJS.Timeout | undefined;
    await Promise.race([loaded, new Promise<void>((r) => { t = setTimeout(r, waitMs); })]);
    clearTimeout(t);
  }
  await w.terminate();
}

/** Why a spawned worker is unusable (it threw or exited before adoption), or undefined. */
export function workerFailure(w: Worker): Error | undefined {
  return failures.get(w);
}

/**
 * Starts `count` vCPU workers now (up to 64 in the pool) for the next Machine of this process. They do not keep
 * the process alive until adopted. Extra workers are dropped by discardPrespawned() (or with the process).
 */
export function prespawnVcpuWorkers(count: number): void {
  const n = Math.min(64, Math.max(0, Math.floor(count)));
  while (pool.length < n) {
    const w = spawnVcpuWorker(`vcpu${pool.length}`);
    w.unref();
    pool.push(w);
  }
}

/** Number of pre-spawned workers not yet adopted. */
export function prespawnedCount(): number {
  return pool.length;
}

/** The next pre-spawned worker (ref'd again: it now belongs to a Machine), or undefined. */
export function takePrespawned(): Worker | undefined {
  const w = pool.shift();
  w?.ref();
  return w;
}

/** Terminates the workers no Machine adopted. */
export async function discardPrespawned(): Promise<void> {
  const ws = pool.splice(0);
  await Promise.all(ws.map((w) => terminateVcpuWorker(w)));
}
