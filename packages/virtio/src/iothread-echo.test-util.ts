// Worker-side echo device for the I/O thread tests (not exported from the package; loaded by URL from dist/).
import { readSync } from 'node:fs';
import type { VirtioDeviceContext } from './device.js';
import type { IoThreadDevice } from './iothread.js';

export interface EchoWorkerData {
  /** Block this many ms per chain (a slow disk). */
  slowMs?: number;
  /** When a chain's first readable byte is this value: exit the thread (a crash). */
  crashOn?: number;
  /** When a chain's first readable byte is this value: throw a plain Error (a device bug). */
  throwOn?: number;
  /** Int32Array counters for the extra-fd test: [0] fdReadable calls. */
  counters?: SharedArrayBuffer;
  /** fdReadable: drain the eventfd (8 bytes) and keep waiting (true), or leave it unread and set it aside (false). */
  fdMode?: 'drain' | 'setAside';
  /** The extra fds (as in IoThreadSpec.fds). */
  fds?: number[];
}

export default function echoWorker(data: unknown, ctx: VirtioDeviceContext): IoThreadDevice {
  const o = (data ?? {}) as EchoWorkerData;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const counters = o.counters ? new Int32Array(o.counters) : undefined;
  const buf = Buffer.alloc(8);
  return {
    fdReadable(i: number): boolean {
      if (counters) Atomics.add(counters, 0, 1);
      if (o.fdMode === 'setAside') return false;
      readSync(o.fds![i]!, buf);
      return true;
    },
    processQueue(q: number): void {
      const queue = ctx.queue(q);
      let n = 0;
      try {
        // Between chains: stop when the owner wants the rings back (ctx.active turns false).
        for (let c = queue.pop(); c; c = n < queue.size && ctx.active ? queue.pop() : null) {
          n++;
          const bytes = c.read(ctx.memory);
          if (o.crashOn !== undefined && bytes[0] === o.crashOn) process.exit(7);
          if (o.throwOn !== undefined && bytes[0] === o.throwOn) throw new Error('echo worker: injected device bug');
          if (o.slowMs) Atomics.wait(sleeper, 0, 0, o.slowMs);
          const w = c.write(ctx.memory, bytes);
          queue.pushUsed(c, w);
        }
      } finally {
        if (n > 0) ctx.signalUsed(q);
      }
    },
  };
}
