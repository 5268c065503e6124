import { KvmkitError, type BusEntry, type GuestMemory, type Logger, type MachineApi, type StateReader, type StateWriter, type WorkerHandlerSpec } from '@kvmkit/kernel';
import type { VirtioDevice } from './device.js';
import { VirtioMmioTransport, type VirtioMmioState, type VirtioVm } from './mmio.js';

/** The parts of the kernel's DeviceRegistry used here (structural, so tests can fake it). */
export interface VirtioRegistry {
  readonly memory: GuestMemory;
  readonly vm: VirtioVm;
  allocateMmio(size: number, name: string, align?: number): bigint;
  allocateIrq(name: string, want?: number): number;
  addMmio(
    base: bigint | number,
    size: number,
    device: { read(o: number, d: Uint8Array): void; write(o: number, d: Uint8Array): void },
    name: string,
    worker?: WorkerHandlerSpec,
  ): BusEntry | unknown;
  addCmdline(part: string): void;
  pulseIrq(gsi: number): void;
}

export interface VirtioMmioRegistration {
  transport: VirtioMmioTransport;
  base: bigint;
  irq: number;
  /** The cmdline fragment added: `virtio_mmio.device=4K@0x<base>:<irq>`. */
  cmdline: string;
}

/** Size of one virtio-mmio window. */
export const VIRTIO_MMIO_SIZE = 0x1000;

/**
 * Puts `device` on the MMIO bus from a `devices` hook: allocates a 4 KiB window and an IRQ, registers the
 * transport, wires ioeventfd (QueueNotify, datamatch = queue) + irqfd, and announces the device on the
 * Linux cmdline.
 */
export function registerVirtioMmio(reg: VirtioRegistry, device: VirtioDevice, opts: { name: string; irq?: number; log?: Logger }): VirtioMmioRegistration {
  const base = reg.allocateMmio(VIRTIO_MMIO_SIZE, opts.name);
  const irq = reg.allocateIrq(opts.name, opts.irq);
  const transport = new VirtioMmioTransport(device, { memory: reg.memory, ...(opts.log ? { log: opts.log } : {}) });
  // InterruptStatus/InterruptACK are answered on the vCPU thread (no main-thread hop per interrupt).
  reg.addMmio(base, VIRTIO_MMIO_SIZE, transport, opts.name, transport.workerHandler());
  transport.attachKvm(reg.vm, base, irq, () => reg.pulseIrq(irq));
  const cmdline = `virtio_mmio.device=4K@0x${base.toString(16)}:${irq}`;
  reg.addCmdline(cmdline);
  return { transport, base, irq, cmdline };
}

const STATE_VERSION = 1;

/**
 * Wires a virtio-mmio device into a machine's lifecycle from a plugin's `apply`: creates the device in the
 * `devices` hook, pauses/resumes its transport with the machine (in-flight requests finish on pause, before
 * any snapshot reads memory), saves/restores its full state under section `pluginName`, and closes it in
 * `afterStop`. Returns a getter for the registration (undefined before `devices` ran).
 */
export function useVirtioMmio(
  machine: MachineApi,
  pluginName: string,
  createDevice: (reg: VirtioRegistry) => VirtioDevice | Promise<VirtioDevice>,
  opts: { irq?: number; log?: Logger } = {},
): () => VirtioMmioRegistration | undefined {
  let r: VirtioMmioRegistration | undefined;
  machine.hooks.devices.tapPromise(pluginName, async (reg) => {
    const device = await createDevice(reg as unknown as VirtioRegistry);
    r = registerVirtioMmio(reg as unknown as VirtioRegistry, device, { name: pluginName, ...(opts.irq !== undefined ? { irq: opts.irq } : {}), log: opts.log ?? machine.log });
  });
  machine.hooks.paused.tapPromise(pluginName, async () => {
    // In-flight requests complete here, before a snapshot strategy reads guest memory.
    await r?.transport.pause();
  });
  machine.hooks.resumed.tapPromise(pluginName, async () => {
    r?.transport.resume();
  });
  machine.hooks.saveState.tapPromise(pluginName, async (w: StateWriter) => {
    if (!r) return;
    // Normally already paused (machine paused before saveState); pausing again is harmless and guarantees
    // that no request is in flight while the state is captured.
    const wasPaused = r.transport.isPaused;
    await r.transport.pause();
    w.write(pluginName, STATE_VERSION, r.transport.saveState());
    if (!wasPaused) r.transport.resume();
  });
  machine.hooks.restoreState.tapPromise(pluginName, async (rd: StateReader) => {
    if (!r) throw new KvmkitError('KVMKIT_ERR_STATE', `${pluginName}: restore before the device exists`);
    // Leaves the transport paused: guest memory may still be loading. It resumes with the machine
    // (`resumed`), or, for a restore done before the first run (beforeRun), when the vCPU threads start.
    r.transport.restoreState(rd.read<VirtioMmioState>(pluginName, STATE_VERSION));
  });
  machine.hooks.vcpuThread.tapPromise(pluginName, async () => {
    if (r && r.transport.isPaused && machine.state !== 'paused') r.transport.resume();
  });
  machine.hooks.afterStop.tapPromise(pluginName, async () => {
    await r?.transport.close();
  });
  return () => r;
}
