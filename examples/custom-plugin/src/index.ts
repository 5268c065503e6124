import { checkOptions, type BusDevice, type Plugin, type WorkerHandlerSpec } from '@kvmkit/kernel';

export interface CounterOptions {
  /** I/O port of the counter (default 0xe0). */
  port?: number;
  /** Also map a 4 KiB MMIO window (allocated from the MMIO area) that counts writes. Default true. */
  mmio?: boolean;
  /** Answer accesses on the vCPU thread (default true). false: every access hops to the main thread. */
  fastPath?: boolean;
}

/** What the plugin publishes with machine.provide('counter', …). */
export interface CounterApi {
  /** Number of guest writes so far (port and MMIO together). */
  value(): number;
  /** Guest physical address of the MMIO window, once devices are set up. */
  mmioBase(): bigint | undefined;
  port: number;
}

function handlerModule(): string {
  const here = import.meta.url;
  // From src/ under vitest the compiled handler lives in dist/.
  return here.endsWith('.ts') ? new URL('../dist/worker.js', here).href : new URL('./worker.js', here).href;
}

/**
 * An example third-party plugin: a counter device. Each guest write to its port (or MMIO window) adds 1;
 * a read returns the count. It shows the whole plugin surface: options validation, a device on both buses,
 * a vCPU-thread fast path, a provided API, hooks, and save/restore.
 */
export default function counter(options: CounterOptions = {}): Plugin {
  return {
    name: 'counter',
    version: '0.1.0',
    kernel: '^0.1.0',
    provides: ['counter'],
    options,
    validateOptions(o) {
      checkOptions('counter', o, { port: { type: 'integer' }, mmio: { type: 'boolean' }, fastPath: { type: 'boolean' } });
      const p = (o as CounterOptions | undefined)?.port;
      if (p !== undefined && (p < 0 || p > 0xffff)) throw new Error(`port ${p} is not a 16-bit I/O port`);
    },
    apply(machine, { log }) {
      const port = options.port ?? 0xe0;
      const counts = new Int32Array(new SharedArrayBuffer(8));
      let mmioBase: bigint | undefined;
      // The main-thread side answers when the fast path is off, or when a vCPU handler declines.
      const device: BusDevice = {
        read(_off, data) {
          const v = Atomics.load(counts, 0);
          for (let i = 0; i < data.length; i++) data[i] = i < 4 ? (v >>> (8 * i)) & 0xff : 0;
        },
        write() {
          Atomics.add(counts, 0, 1);
        },
      };
      const worker: WorkerHandlerSpec | undefined = options.fastPath === false ? undefined : { module: handlerModule(), shared: counts.buffer };
      const api: CounterApi = { value: () => Atomics.load(counts, 0), mmioBase: () => mmioBase, port };
      machine.provide('counter', api);

      machine.hooks.devices.tap('counter', (reg) => {
        reg.addPio(port, 1, device, 'counter', worker);
        if (options.mmio !== false) {
          mmioBase = reg.allocateMmio(0x1000, 'counter');
          reg.addMmio(mmioBase, 0x1000, device, 'counter-mmio', worker);
        }
        log.debug({ port, mmio: mmioBase?.toString(16), fastPath: worker !== undefined }, 'counter device registered');
      });
      machine.hooks.saveState.tap('counter', (w) => w.write('counter', 1, { count: Atomics.load(counts, 0) }));
      machine.hooks.restoreState.tap('counter', (r) => {
        const s = r.read<{ count: number }>('counter', 1);
        Atomics.store(counts, 0, s.count | 0);
      });
      machine.hooks.afterStop.tap('counter', () => log.info({ count: Atomics.load(counts, 0) }, 'counter at stop'));
    },
  };
}
