/**
 * The counter's vCPU-thread handler. The vCPU worker imports this module and calls the default export once
 * per vCPU; accesses are then answered on the vCPU thread with no hop to the main thread. State shared with
 * the main thread lives in the SharedArrayBuffer passed as `shared`.
 */
import type { WorkerHandler, WorkerHandlerContext } from '@kvmkit/kernel';

export default function counterHandler(shared: unknown, _ctx: WorkerHandlerContext): WorkerHandler {
  const counts = new Int32Array(shared as SharedArrayBuffer);
  return {
    write(): boolean {
      Atomics.add(counts, 0, 1);
      return true;
    },
    read(_offset: number, data: Uint8Array): boolean {
      const v = Atomics.load(counts, 0);
      for (let i = 0; i < data.length; i++) data[i] = i < 4 ? (v >>> (8 * i)) & 0xff : 0;
      return true;
    },
  };
}
