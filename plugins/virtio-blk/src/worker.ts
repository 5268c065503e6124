/**
 * virtio-blk's I/O thread side (loaded by @kvmkit/virtio's I/O thread, see VirtioBlk.ioThread()): the same
 * request code as the main thread (requests.ts), serving every request type synchronously on the image fd the
 * main thread opened (fd numbers are process-wide), counting into the device's shared stats.
 */
import type { IoThreadDevice, VirtioDeviceContext } from '@kvmkit/virtio';
import { BlkRequests, sharedStats, type BlkRequestOptions } from './requests.js';

export interface BlkWorkerData {
  options: BlkRequestOptions;
  stats: SharedArrayBuffer;
}

export default function blkIoThread(data: unknown, ctx: VirtioDeviceContext): IoThreadDevice {
  const d = data as BlkWorkerData;
  const requests = new BlkRequests({ ...d.options, syncAll: true }, () => ctx, sharedStats(d.stats), ctx.log);
  return {
    processQueue(q: number): void {
      // One ring's worth per call; the I/O thread calls again while chains are pending (and checks for a stop).
      requests.drain(q, ctx.queue(q).size, true);
    },
    close(): void {
      requests.close();
    },
  };
}
