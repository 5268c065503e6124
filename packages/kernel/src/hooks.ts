import { createRequire } from 'node:module';
import type * as Tapable from 'tapable';
import type { AsyncSeriesHook as AsyncSeriesHookT, AsyncSeriesBailHook as AsyncSeriesBailHookT, SyncHook as SyncHookT, SyncWaterfallHook as SyncWaterfallHookT, SyncBailHook as SyncBailHookT, HookMap as HookMapT } from 'tapable';
import type { MachineConfig, MemoryLayout, LayoutRange } from './config.js';
import type { GuestMemory } from './memory.js';
import type { CpuidEntry, VcpuBootState } from './kvm/types.js';
import type { VcpuExit, ExitAction } from './exits.js';
import type { KvmkitError } from './errors.js';

// The six hook classes used, each from its own file: tapable's index loads all twelve (start-up).
const requireTapable = createRequire(import.meta.url);
const AsyncSeriesHook = requireTapable('tapable/lib/AsyncSeriesHook.js') as typeof Tapable.AsyncSeriesHook;
const AsyncSeriesBailHook = requireTapable('tapable/lib/AsyncSeriesBailHook.js') as typeof Tapable.AsyncSeriesBailHook;
const SyncHook = requireTapable('tapable/lib/SyncHook.js') as typeof Tapable.SyncHook;
const SyncWaterfallHook = requireTapable('tapable/lib/SyncWaterfallHook.js') as typeof Tapable.SyncWaterfallHook;
const SyncBailHook = requireTapable('tapable/lib/SyncBailHook.js') as typeof Tapable.SyncBailHook;
const HookMap = requireTapable('tapable/lib/HookMap.js') as typeof Tapable.HookMap;

// Forward declarations kept structural so hooks.ts has no runtime import cycle.
import type { Vm } from './kvm/vm.js';
import type { Vcpu } from './kvm/vcpu.js';
import type { DeviceRegistry } from './registry.js';
import type { MachineApi } from './plugin.js';
import type { StateWriter, StateReader } from './state.js';
import type { Logger } from './logger.js';

/** What a boot plugin gets. */
export interface BootContext {
  config: Readonly<MachineConfig>;
  memory: GuestMemory;
  layout: Readonly<MemoryLayout>;
  vm: Vm;
  cpus: number;
  /** The final kernel command line: plugin contributions, then the user's cmdline. */
  cmdline: string;
  log: Logger;
}

/** What a boot plugin answers: initial state per vCPU index (undefined = KVM's reset state). */
export interface BootResult {
  /** Name of the loader, for logs ('linux-bzimage', 'pvh', 'flat', …). */
  loader: string;
  vcpus: Array<VcpuBootState | undefined>;
}

/** A vCPU as seen by hooks before it starts running: its index and its fd wrapper. */
export interface VcpuHandle {
  index: number;
  vcpu: Vcpu;
}

/**
 * Host memory for one guest RAM range, supplied by a plugin through `allocateMemory` (hugetlbfs, memfd,
 * a snapshot's memory file mapped MAP_PRIVATE, …). `release` unmaps it (called after the VM fd is closed).
 */
export interface MemoryBacking {
  hva: bigint;
  size: number;
  /** What backs it, for logs and diagnostics ('anonymous', 'hugetlb-2M', 'file:…'). */
  kind: string;
  /** An fd that maps this memory (memfd / file), when the backing has one. */
  fd?: number;
  release(): void;
}

/** Named strategies (snapshot, migration) supplied by plugins. */
export interface Strategy {
  name: string;
  description?: string;
  run(machine: MachineApi, options: unknown): Promise<unknown>;
}

export type StrategyResolver = () => Strategy;

/**
 * Every hook point, declared once. Only the kernel calls them; plugins receive `TapHooks` (tap-only views).
 * Order of firing in Machine.start(): validate → configure → memoryLayout → (mmap) memoryMapped →
 * (KVM_CREATE_VM, slots) vmCreated → devices → cmdline → (vCPUs) cpuid, vcpuCreated → boot → beforeRun.
 */
export function createHooks() {
  return {
    /** Plugins check the machine config (throw KvmkitError to reject). */
    validate: new SyncHook<[MachineConfig]>(['config']),
    /** Plugins adjust the config (return the new config). */
    configure: new SyncWaterfallHook<[MachineConfig]>(['config']),
    /** Plugins adjust the guest memory layout. */
    memoryLayout: new SyncWaterfallHook<[MemoryLayout, MachineConfig]>(['layout', 'config']),
    /** First tap that returns a MemoryBacking maps that RAM range; default: anonymous private memory. */
    allocateMemory: new SyncBailHook<[LayoutRange, MachineConfig], MemoryBacking | undefined>(['range', 'config']),
    /** Guest memory is mmap'd but not yet registered with KVM: madvise, mbind, prefault. */
    memoryMapped: new AsyncSeriesHook<[GuestMemory]>(['memory']),
    /** The VM exists, with memory slots: irqchip, PIT, TSS, identity map. */
    vmCreated: new AsyncSeriesHook<[Vm]>(['vm']),
    /** Devices claim PIO/MMIO ranges, IRQs and cmdline fragments. */
    devices: new AsyncSeriesHook<[DeviceRegistry]>(['registry']),
    /** Kernel cmdline fragments (user's cmdline is appended after this hook by the kernel). */
    cmdline: new SyncWaterfallHook<[string[]]>(['parts']),
    /** CPUID entries for vCPU n (start: KVM_GET_SUPPORTED_CPUID). */
    cpuid: new SyncWaterfallHook<[CpuidEntry[], number]>(['entries', 'vcpu']),
    /** A vCPU was created and its CPUID set: pinning policy, MSRs. */
    vcpuCreated: new AsyncSeriesHook<[VcpuHandle]>(['vcpu']),
    /** First tap to return a BootResult wins (firmware / kernel loaders). */
    boot: new AsyncSeriesBailHook<[BootContext], BootResult | undefined>(['ctx']),
    /** Everything is ready; vCPU workers are about to start. */
    beforeRun: new AsyncSeriesHook<[MachineApi]>(['machine']),
    /** A vCPU worker thread started (tid is the Linux thread id, for pinning). */
    vcpuThread: new AsyncSeriesHook<[{ index: number; tid: number }]>(['thread']),
    paused: new AsyncSeriesHook<[MachineApi]>(['machine']),
    resumed: new AsyncSeriesHook<[MachineApi]>(['machine']),
    /** After all vCPUs stopped and before fds/mappings are released. */
    afterStop: new AsyncSeriesHook<[MachineApi]>(['machine']),
    /** An exit no bus or kernel rule handled; first tap that answers decides. Default: stop with error. */
    unhandledExit: new SyncBailHook<[VcpuExit, number], ExitAction | undefined>(['exit', 'vcpu']),
    /** Every stateful plugin writes its section (machine is paused). */
    saveState: new AsyncSeriesHook<[StateWriter]>(['writer']),
    /** Every stateful plugin restores its section (machine is paused, devices exist). */
    restoreState: new AsyncSeriesHook<[StateReader]>(['reader']),
    /** Snapshot strategies by name ('full', 'diff', …). */
    snapshotStrategy: new HookMap<SyncBailHookT<[], Strategy | undefined>>(() => new SyncBailHook<[], Strategy | undefined>([])),
    /** Migration strategies by name ('precopy', …). */
    migrationStrategy: new HookMap<SyncBailHookT<[], Strategy | undefined>>(() => new SyncBailHook<[], Strategy | undefined>([])),
    /** A fatal error stops the machine. */
    failed: new SyncHook<[KvmkitError]>(['error']),
  } as const;
}

export type Hooks = ReturnType<typeof createHooks>;

type TapOnly<H> = H extends HookMapT<infer Inner>
  ? { for(key: string): TapOnly<Inner> }
  : H extends { tap: infer T; tapAsync?: infer TA; tapPromise?: infer TP }
    ? { tap: T; tapAsync: TA; tapPromise: TP; isUsed(): boolean }
    : never;

/** What plugins see: tap/tapAsync/tapPromise, never call/promise. */
export type TapHooks = { readonly [K in keyof Hooks]: TapOnly<Hooks[K]> };

/** Keys ever requested through a tap-only HookMap view (strategy names plugins registered). */
const hookMapKeys = new WeakMap<object, Set<string>>();

/** The names under which taps were registered on a HookMap through a tap-only view. */
export function registeredKeys(map: HookMapT<any>): string[] {
  return [...(hookMapKeys.get(map) ?? [])].filter((k) => map.get(k)?.isUsed() ?? false).sort();
}

function tapView(hook: any): any {
  if (hook instanceof HookMap) {
    const keys = hookMapKeys.get(hook) ?? new Set<string>();
    hookMapKeys.set(hook, keys);
    return Object.freeze({ for: (key: string) => { keys.add(key); return tapView(hook.for(key)); } });
  }
  const v: Record<string, unknown> = {
    tap: hook.tap.bind(hook),
    isUsed: hook.isUsed.bind(hook),
  };
  v.tapAsync = typeof hook.tapAsync === 'function' ? hook.tapAsync.bind(hook) : () => { throw new Error('this hook is synchronous: use tap()'); };
  v.tapPromise = typeof hook.tapPromise === 'function' ? hook.tapPromise.bind(hook) : () => { throw new Error('this hook is synchronous: use tap()'); };
  return Object.freeze(v);
}

/** A frozen tap-only view over `hooks`. */
export function tapOnly(hooks: Hooks): TapHooks {
  const out: Record<string, unknown> = {};
  for (const [k, h] of Object.entries(hooks)) out[k] = tapView(h);
  return Object.freeze(out) as TapHooks;
}

/** Installs one interceptor per hook that logs {hook, plugin} at debug level. */
export function traceHooks(hooks: Hooks, log: Logger): void {
  for (const [name, h] of Object.entries(hooks)) {
    if (h instanceof HookMap) continue;
    (h as SyncHookT<unknown[]>).intercept({
      register: (tap) => {
        log.debug({ hook: name, plugin: tap.name }, 'tap');
        return tap;
      },
    });
  }
}

export type { AsyncSeriesHookT, AsyncSeriesBailHookT, SyncWaterfallHookT };
