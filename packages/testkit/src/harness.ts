import {
  isKvmkitError, type KvmkitError, type Machine,
  createHooks, tapOnly, silentLogger, PioBus, MmioBus, GuestMemory, DeviceRegistry, defaultMemoryLayout, PluginHost,
  type Hooks, type MachineApi, type MachineConfig, type Plugin, type StopReason, type Vm, type Segment, type StateSection,
} from '@kvmkit/kernel';

export interface HarnessOptions {
  config?: Partial<MachineConfig>;
  /** The VM the plugin sees (default: a fake with an irqchip whose IRQ line calls are recorded). */
  vm?: Vm;
  /** Guest RAM for the registry (default 1 MiB anonymous). */
  memory?: GuestMemory;
}

/**
 * Runs a plugin against fake machine plumbing, no KVM: real hooks (fired by the test), a MachineApi that records
 * stop/reset requests and provided APIs, and a real DeviceRegistry over real PIO/MMIO buses whose IRQ line
 * changes are recorded. For device unit tests.
 */
export function pluginHarness(plugin: Plugin, opts: HarnessOptions = {}) {
  const hooks: Hooks = createHooks();
  const apis = new Map<string, unknown>();
  const stops: StopReason[] = [];
  const resets: string[] = [];
  const irqs: Array<[number, boolean]> = [];
  const config: MachineConfig = { name: 't', memory: 64, cpus: 1, ...opts.config };
  const vm = opts.vm ?? ({ hasIrqchip: true, irqLine: (g: number, l: boolean) => irqs.push([g, l]) } as unknown as Vm);
  if (opts.vm) {
    // Record IRQ lines on a caller's fake VM too.
    const v = opts.vm as unknown as { irqLine?: (g: number, l: boolean) => void; hasIrqchip?: boolean };
    const orig = v.irqLine;
    v.irqLine = (g, l) => { irqs.push([g, l]); orig?.(g, l); };
  }
  const memory = opts.memory ?? GuestMemory.anonymous(1 << 20);
  const pio = new PioBus();
  const mmio = new MmioBus();
  const registry = new DeviceRegistry(pio, mmio, memory, vm, defaultMemoryLayout(config.memory), silentLogger());
  const machine = {
    name: config.name,
    config,
    hooks: tapOnly(hooks),
    log: silentLogger(),
    state: 'created',
    memory,
    vm,
    vcpus: [],
    plugins: [{ name: plugin.name, version: plugin.version, provides: plugin.provides ?? [] }],
    strategies: () => ({ snapshot: [], migration: [] }),
    saveState: async () => new Map<string, StateSection>(),
    restoreState: async () => {},
    requestStop: (r: StopReason) => { stops.push(r); },
    requestReset: (s: string) => { resets.push(s); },
    stop: async () => {},
    pause: async () => {},
    resume: async () => {},
    provide: (n: string, a: unknown) => { apis.set(n, a); },
    use: <T>(n: string) => apis.get(n) as T | undefined,
  } as MachineApi;
  new PluginHost('0.1.0').register(plugin);
  const applied = Promise.resolve(plugin.apply(machine, { log: silentLogger(), options: plugin.options }));
  const out = (port: number, ...bytes: number[]) => pio.write(port, Uint8Array.from(bytes));
  const inb = (port: number) => {
    const d = new Uint8Array(1);
    pio.read(port, d);
    return d[0]!;
  };
  /** Fires vmCreated (when the fake VM should see it) and devices, like Machine.start does. */
  const start = async (withVmCreated = true) => {
    await applied;
    if (withVmCreated) await hooks.vmCreated.promise(vm);
    await hooks.devices.promise(registry);
  };
  return { hooks, machine, registry, pio, mmio, memory, vm, irqs, stops, resets, apis, out, inb, start, cmdline: registry.cmdlineParts };
}

/** A debug-exit device on port 0xf4 (a guest write stops the VM with that value), for tests without platform-pc. */
export function debugExitPlugin(port = 0xf4): Plugin {
  return {
    name: 'test-exit',
    version: '0.1.0',
    apply(m) {
      m.hooks.devices.tap('test-exit', (reg) =>
        reg.addPio(port, 1, { read() {}, write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0]! }) }, 'test-exit'));
    },
  };
}

/** Load address of realModeBoot's code. */
export const REAL_MODE_LOAD = 0x1000;

/** A test boot plugin: copies 16-bit code to 0x1000 and starts vCPU 0 there in real mode (CS=DS=SS=0, SP 0x8000). */
export function realModeBoot(code: Uint8Array | number[]): Plugin {
  const seg = (type: number): Segment => ({ base: 0n, limit: 0xffff, selector: 0, type, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 });
  return {
    name: 'test-realmode-boot',
    version: '0.1.0',
    provides: ['firmware'],
    apply(m) {
      m.hooks.boot.tapPromise('test-realmode-boot', async (ctx) => {
        ctx.memory.write(REAL_MODE_LOAD, Uint8Array.from(code));
        return { loader: 'test-realmode', vcpus: [{ regs: { rip: BigInt(REAL_MODE_LOAD), rsp: 0x8000n, rflags: 2n }, sregs: { cs: seg(0xb), ds: seg(3), es: seg(3), ss: seg(3) } }] };
      });
    },
  };
}

/**
 * Starts a machine and waits for it to stop; after `timeoutMs` it is stopped with reason 'user' and exit code
 * 99 ('test timeout'), so a hung guest fails the test instead of hanging it.
 */
export async function runToStop(m: Machine, timeoutMs = 30_000): Promise<StopReason> {
  await m.start();
  const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'test timeout' }), timeoutMs);
  const r = await m.waitForStop();
  clearTimeout(t);
  return r;
}

/** The KvmkitError a promise rejects with; anything else (or no rejection) fails. */
export async function kvmkitRejection(p: Promise<unknown>): Promise<KvmkitError> {
  try {
    await p;
  } catch (e) {
    if (isKvmkitError(e)) return e;
    throw e;
  }
  throw new Error('expected a KvmkitError');
}
