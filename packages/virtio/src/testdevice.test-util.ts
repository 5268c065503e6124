// Shared by the tests of this package (not exported).
import { GuestMemory } from '@kvmkit/kernel';
import { VirtioDevice } from './device.js';
import { VirtioMmioTransport } from './mmio.js';
import { VirtioTestDriver } from './driver.js';

/** Echo device: copies each chain's readable bytes into its writable buffers, completes with the count. */
export class EchoDevice extends VirtioDevice {
  readonly deviceId = 0x7f;
  readonly name = 'echo';
  readonly queueSizes: number[];
  readonly features = 1n << 5n;
  processed = 0;
  resets = 0;
  constructor(sizes = [8, 16]) {
    super();
    this.queueSizes = sizes;
    this.config = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
  }
  processQueue(q: number): void {
    const queue = this.ctx.queue(q);
    for (let c = queue.pop(); c; c = queue.pop()) {
      const data = c.read(this.ctx.memory);
      const n = c.write(this.ctx.memory, data);
      queue.pushUsed(c, n);
      this.processed++;
    }
    this.ctx.signalUsed(q);
  }
  activations = 0;
  override activate(): void {
    this.activations++;
  }
  override reset(): void {
    this.resets++;
  }
  override saveState(): unknown {
    return { processed: this.processed };
  }
  override restoreState(s: unknown): void {
    this.processed = (s as { processed: number }).processed;
  }
}

export function setup(opts: { memSize?: number; sizes?: number[] } = {}) {
  const mem = GuestMemory.anonymous(opts.memSize ?? 1 << 20);
  const dev = new EchoDevice(opts.sizes);
  let irqs = 0;
  const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  return { mem, dev, t, drv, irqs: () => irqs };
}
