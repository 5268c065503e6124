import type { WorkerHandler } from '@kvmkit/kernel';

/** Index of the LSR mirror in the shared Int32Array: the LSR value, or -1 when a read has side effects. */
export const MIRROR_LSR = 0;
export const MIRROR_INTS = 1;

/**
 * vCPU-thread handler for the UART (loaded by the kernel's vCPU worker): answers LSR reads from a
 * SharedArrayBuffer mirror the main thread keeps current, so a guest polling LSR before each THR write
 * (Linux's console, most boot loaders) costs one main-thread hop per character instead of two.
 * Everything else — and LSR reads while error bits are set (reading clears them) — goes to the main thread.
 */
export default function serialFastPath(shared: unknown): WorkerHandler {
  const mirror = new Int32Array(shared as SharedArrayBuffer);
  return {
    read(offset: number, data: Uint8Array): boolean {
      if (offset !== 5 || data.length === 0) return false;
      const v = Atomics.load(mirror, MIRROR_LSR);
      if (v < 0) return false;
      data.fill(0);
      data[0] = v;
      return true;
    },
  };
}
