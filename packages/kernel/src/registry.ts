import { KvmkitError } from './errors.js';
import type { Bus, BusDevice, BusEntry, WorkerHandlerSpec } from './bus.js';
import type { GuestMemory } from './memory.js';
import type { MemoryLayout } from './config.js';
import type { Vm } from './kvm/vm.js';
import type { Logger } from './logger.js';

/** IOAPIC pins free for devices (0-4 and 8, 12 are left to legacy PC devices unless asked for). */
const FREE_IRQS = [5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/**
 * What the `devices` hook hands to plugins: the buses, guest memory, the VM (for ioeventfd/irqfd),
 * an MMIO window allocator, IRQ allocation and assertion, and cmdline fragments.
 */
export class DeviceRegistry {
  private nextMmio: bigint;
  private readonly mmioEnd: bigint;
  private readonly usedIrqs = new Map<number, string>();
  readonly cmdlineParts: string[] = [];
  private warnedNoIrqchip = false;

  constructor(
    readonly pio: Bus,
    readonly mmio: Bus,
    readonly memory: GuestMemory,
    readonly vm: Vm,
    readonly layout: Readonly<MemoryLayout>,
    private readonly log: Logger,
  ) {
    this.nextMmio = layout.mmioWindow.gpa;
    this.mmioEnd = layout.mmioWindow.gpa + BigInt(layout.mmioWindow.size);
  }

  addPio(base: number, size: number, device: BusDevice, name: string, worker?: WorkerHandlerSpec): BusEntry {
    return this.pio.register(base, size, device, name, worker);
  }

  addMmio(base: bigint | number, size: number, device: BusDevice, name: string, worker?: WorkerHandlerSpec): BusEntry {
    return this.mmio.register(Number(base), size, device, name, worker);
  }

  /** Reserves `size` bytes (rounded up to 4 KiB) in the MMIO window, aligned to `align`. */
  allocateMmio(size: number, name: string, align = 0x1000): bigint {
    const a = BigInt(Math.max(align, 0x1000));
    const sz = BigInt(Math.ceil(size / 0x1000) * 0x1000);
    const base = ((this.nextMmio + a - 1n) / a) * a;
    if (sz <= 0n || base + sz > this.mmioEnd) {
      throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `MMIO window exhausted allocating ${size} bytes for ${name}`, { details: { name, size } });
    }
    this.nextMmio = base + sz;
    return base;
  }

  /** Claims an IRQ (GSI). With `want`, that line or an error; else the next free device line. */
  allocateIrq(name: string, want?: number): number {
    if (want !== undefined) {
      if (!Number.isInteger(want) || want < 0 || want > 23) {
        throw new KvmkitError('KVMKIT_ERR_CONFIG', `IRQ ${want} for ${name} is not an IOAPIC pin (0-23)`);
      }
      const owner = this.usedIrqs.get(want);
      if (owner !== undefined) throw new KvmkitError('KVMKIT_ERR_CONFIG', `IRQ ${want} for ${name} is already used by ${owner}`);
      this.usedIrqs.set(want, name);
      return want;
    }
    for (const irq of FREE_IRQS) {
      if (!this.usedIrqs.has(irq)) {
        this.usedIrqs.set(irq, name);
        return irq;
      }
    }
    throw new KvmkitError('KVMKIT_ERR_CONFIG', `no free IRQ line left for ${name}`);
  }

  /** The IRQ lines claimed so far, with their owners. */
  claimedIrqs(): Array<{ irq: number; name: string }> {
    return [...this.usedIrqs].map(([irq, name]) => ({ irq, name })).sort((a, b) => a.irq - b.irq);
  }

  /** Sets an IRQ line level (KVM_IRQ_LINE). Without an in-kernel irqchip the call is dropped (logged once). */
  setIrq(gsi: number, level: boolean): void {
    if (!this.vm.hasIrqchip) {
      if (!this.warnedNoIrqchip) {
        this.warnedNoIrqchip = true;
        this.log.debug({ gsi }, 'no in-kernel irqchip: interrupt dropped (add @kvmkit/plugin-platform-pc)');
      }
      return;
    }
    this.vm.irqLine(gsi, level);
  }

  /** Edge: raise then lower. */
  pulseIrq(gsi: number): void {
    this.setIrq(gsi, true);
    this.setIrq(gsi, false);
  }

  /** Adds a kernel cmdline fragment (e.g. `virtio_mmio.device=4K@0xd0000000:5`). */
  addCmdline(part: string): void {
    this.cmdlineParts.push(part);
  }
}
