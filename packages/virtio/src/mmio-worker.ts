/**
 * vCPU-thread handler for the virtio-mmio registers a driver touches on every interrupt: InterruptStatus
 * (read) and InterruptACK (write). The vCPU worker imports this module (see `WorkerHandlerSpec` in the kernel)
 * and answers those two accesses itself, without the hop to the main thread; every other register is passed
 * on to the main-thread transport (`return false`). The interrupt status word lives in the SharedArrayBuffer
 * `shared` (an Int32Array of 1), which the transport updates with Atomics on the main thread.
 */
import type { WorkerHandler, WorkerHandlerContext } from '@kvmkit/kernel';

/** Register offsets (duplicated from constants.ts so this module stays dependency-free for the worker). */
const INTERRUPT_STATUS = 0x060;
const INTERRUPT_ACK = 0x064;

export default function virtioMmioWorkerHandler(shared: unknown, _ctx: WorkerHandlerContext): WorkerHandler {
  if (!(shared instanceof SharedArrayBuffer) || shared.byteLength < 4) {
    // Nothing to share: every access goes to the main thread.
    return {};
  }
  const isr = new Int32Array(shared, 0, 1);
  return {
    read(offset: number, data: Uint8Array): boolean {
      if (offset !== INTERRUPT_STATUS || data.length !== 4) return false;
      const v = Atomics.load(isr, 0);
      data[0] = v & 0xff;
      data[1] = (v >>> 8) & 0xff;
      data[2] = (v >>> 16) & 0xff;
      data[3] = (v >>> 24) & 0xff;
      return true;
    },
    write(offset: number, data: Uint8Array): boolean {
      if (offset !== INTERRUPT_ACK || data.length !== 4) return false;
      const v = (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) | 0;
      Atomics.and(isr, 0, ~v);
      return true;
    },
  };
}
