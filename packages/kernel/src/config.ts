import { KvmkitError } from './errors.js';

/** A plugin reference in a config: a package name or short name, with its options. */
export interface PluginSpec {
  name: string;
  options?: unknown;
}

/** A VM definition as the kernel sees it (after per-host resolution by @kvmkit/config). */
export interface MachineConfig {
  /** VM name (log binding, control socket name). */
  name: string;
  /** Guest RAM in MiB. */
  memory: number;
  /** Number of vCPUs. */
  cpus: number;
  /** The user's kernel command line (boot plugins append it after plugin contributions). */
  cmdline?: string;
  /** Plugins, in order. */
  plugins?: PluginSpec[];
  /** What the VM does on a guest reset request: stop (default) or reboot. */
  onReset?: 'stop' | 'reboot';
  /** Free-form extra settings; plugins read theirs from their own options, not from here. */
  [key: string]: unknown;
}

export const MAX_VCPUS = 254;
export const MAX_MEMORY_MIB = 1024 * 1024;

/** Checks the fields the kernel itself uses; throws KVMKIT_ERR_CONFIG naming the key. */
export function validateMachineConfig(c: unknown): asserts c is MachineConfig {
  const fail = (path: string, expected: string, got: unknown): never => {
    throw new KvmkitError('KVMKIT_ERR_CONFIG', `machine config: ${path} must be ${expected} (got ${JSON.stringify(got)})`, {
      details: { path, expected, got },
    });
  };
  if (typeof c !== 'object' || c === null || Array.isArray(c)) fail('(root)', 'an object', c);
  const o = c as Record<string, unknown>;
  if (typeof o.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(o.name)) fail('name', 'a name of letters, digits, . _ - (1-64 chars)', o.name);
  if (typeof o.memory !== 'number' || !Number.isInteger(o.memory) || o.memory < 1 || o.memory > MAX_MEMORY_MIB) fail('memory', `an integer number of MiB in 1..${MAX_MEMORY_MIB}`, o.memory);
  if (typeof o.cpus !== 'number' || !Number.isInteger(o.cpus) || o.cpus < 1 || o.cpus > MAX_VCPUS) fail('cpus', `an integer in 1..${MAX_VCPUS}`, o.cpus);
  if (o.cmdline !== undefined && typeof o.cmdline !== 'string') fail('cmdline', 'a string', o.cmdline);
  if (o.onReset !== undefined && o.onReset !== 'stop' && o.onReset !== 'reboot') fail('onReset', '"stop" or "reboot"', o.onReset);
  if (o.plugins !== undefined) {
    if (!Array.isArray(o.plugins)) fail('plugins', 'an array', o.plugins);
    (o.plugins as unknown[]).forEach((p, i) => {
      if (typeof p !== 'object' || p === null || typeof (p as PluginSpec).name !== 'string') fail(`plugins[${i}]`, 'an object with a string "name"', p);
    });
  }
}

/** One guest RAM range or reserved window. */
export interface LayoutRange {
  gpa: bigint;
  size: number;
  name: string;
}

/**
 * The guest physical memory layout. `ram` becomes KVM memory slots; `reserved` are windows that must stay
 * unbacked (MMIO, LAPIC/IOAPIC, firmware holes) and appear as reserved in e820/memmap.
 * `mmioWindow` is where `DeviceRegistry.allocateMmio` hands out device windows.
 */
export interface MemoryLayout {
  ram: LayoutRange[];
  reserved: LayoutRange[];
  mmioWindow: { gpa: bigint; size: number };
}

const MiB = 1024 * 1024;
/** Start of the 32-bit hole below 4 GiB (MMIO, IOAPIC 0xfec00000, LAPIC 0xfee00000). */
export const PCI_HOLE_START = 0xc000_0000n;
export const FOUR_GIB = 0x1_0000_0000n;

/** The default PC layout: RAM from 0 up to 3 GiB, the rest above 4 GiB; MMIO devices at 0xd0000000. */
export function defaultMemoryLayout(memoryMiB: number): MemoryLayout {
  const total = BigInt(memoryMiB) * BigInt(MiB);
  const ram: LayoutRange[] = [];
  const low = total < PCI_HOLE_START ? total : PCI_HOLE_START;
  ram.push({ gpa: 0n, size: Number(low), name: 'ram-low' });
  if (total > low) ram.push({ gpa: FOUR_GIB, size: Number(total - low), name: 'ram-high' });
  return {
    ram,
    reserved: [
      { gpa: PCI_HOLE_START, size: Number(FOUR_GIB - PCI_HOLE_START), name: 'pci-hole' },
    ],
    mmioWindow: { gpa: 0xd000_0000n, size: 0x1000_0000 },
  };
}
