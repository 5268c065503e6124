import type { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { readFileSync } from 'node:fs';
import { KvmkitError, toKvmkitError, reviveError } from './errors.js';
import { GuestMemory, type MemoryRegion } from './memory.js';
import { PioBus, MmioBus, type BusEntry } from './bus.js';
import { validateMachineConfig, defaultMemoryLayout, type MachineConfig, type MemoryLayout } from './config.js';
import { createHooks, tapOnly, traceHooks, registeredKeys, type Hooks, type TapHooks, type BootContext, type MemoryBacking } from './hooks.js';
import { PluginHost, type MachineApi, type MachineState, type Plugin, type StopReason } from './plugin.js';
import { DeviceRegistry } from './registry.js';
import { StateReader, StateWriter, type StateSection } from './state.js';
import { createLogger, type Logger } from './logger.js';
import { Kvm } from './kvm/kvm.js';
import { Vm } from './kvm/vm.js';
import type { Vcpu } from './kvm/vcpu.js';
import * as ffi from './kvm/ffi.js';
import type { CpuidEntry, VcpuBootState } from './kvm/types.js';
import { saveVcpuState, restoreVcpuState, type VcpuState } from './kvm/vcpu-state.js';
import { KVM_EXIT, KVM_SYSTEM_EVENT, type VcpuExit } from './exits.js';
import * as P from './vcpu/protocol.js';
import { EventFd, watchFd, type FdWatch } from './fdwatch.js';
import { spawnVcpuWorker, takePrespawned, terminateVcpuWorker, workerFailure } from './vcpu/pool.js';

export const KERNEL_VERSION: string = (() => {
  try {
    const here = fileURLToPath(new URL('../package.json', import.meta.url));
    return (JSON.parse(readFileSync(here, 'utf8')) as { version: string }).version;
  } catch {
    return '0.1.0';
  }
})();

export interface MachineOptions {
  config: MachineConfig;
  plugins?: Plugin[];
  log?: Logger;
  /** Path of the KVM device (default /dev/kvm or $KVMKIT_KVM_DEVICE). */
  kvmPath?: string;
  /**
   * How a vCPU worker wakes the main thread for an exit a main-thread device must answer:
   * 'waitAsync' (Atomics.waitAsync on the mailbox, default) or 'eventfd' (an eventfd watched with uv_poll).
   * bench/exit-latency.mjs measures both; see the kernel README.
   */
  mailboxWake?: 'waitAsync' | 'eventfd';
}

interface VcpuRuntime {
  index: number;
  vcpu: Vcpu;
  worker: Worker;
  ctrl: Int32Array;
  mb: Int32Array;
  mbBytes: Uint8Array;
  tid: number;
  thread: bigint;
  exited: Promise<void>;
  done: boolean;
  wake: EventFd | undefined;
  watch: FdWatch | undefined;
}

/** Capabilities the kernel itself needs. */
const REQUIRED_CAPS = ['USER_MEMORY', 'IMMEDIATE_EXIT', 'EXT_CPUID', 'SET_TSS_ADDR'] as const;

let sigusr2Installed = false;
/** SIGUSR2 kicks a vCPU thread out of KVM_RUN (EINTR). A no-op listener makes libuv install a handler. */
function installKickSignal(): void {
  if (sigusr2Installed) return;
  sigusr2Installed = true;
  process.on('SIGUSR2', () => {});
}

/**
 * A virtual machine: assembles a VM from config + plugins and owns its lifecycle
 * `created → configured → running ⇄ paused → stopped`.
 */
export class Machine {
  readonly hooks: Hooks;
  readonly tapHooks: TapHooks;
  readonly log: Logger;
  readonly pluginHost: PluginHost;
  readonly api: MachineApi;
  config: MachineConfig;
  private _state: MachineState = 'created';
  private kvm: Kvm | undefined;
  private _vm: Vm | undefined;
  private _memory: GuestMemory | undefined;
  private backings: MemoryBacking[] = [];
  private _vcpus: Vcpu[] = [];
  private runtimes: VcpuRuntime[] = [];
  readonly pio = new PioBus();
  readonly mmio = new MmioBus();
  private layout: MemoryLayout | undefined;
  private stopReason: StopReason | undefined;
  private stopResolve!: (r: StopReason) => void;
  private readonly stopPromise: Promise<StopReason>;
  private stopping: Promise<void> | undefined;
  private readonly provided = new Map<string, unknown>();
  private registry: DeviceRegistry | undefined;
  private cmdline = '';
  private resetRequested = false;
  private devicesRan = false;
  /** vCPU workers spawned early, so their start-up overlaps the rest of start(); handed their init later. */
  private prewarmed: Worker[] = [];
  private readonly kvmPath: string | undefined;
  private readonly mailboxWake: 'waitAsync' | 'eventfd';
  /** Number of exits handled on the main thread per vCPU (diagnostics). */
  readonly stats = { mainExits: 0 };

  constructor(opts: MachineOptions) {
    validateMachineConfig(opts.config);
    this.config = { ...opts.config };
    this.kvmPath = opts.kvmPath;
    this.mailboxWake = opts.mailboxWake ?? 'waitAsync';
    this.log = (opts.log ?? createLogger()).child({ vm: this.config.name });
    this.hooks = createHooks();
    traceHooks(this.hooks, this.log);
    this.tapHooks = tapOnly(this.hooks);
    this.pluginHost = new PluginHost(KERNEL_VERSION);
    this.stopPromise = new Promise((res) => (this.stopResolve = res));
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    this.api = Object.freeze({
      get name() { return self.config.name; },
      get config() { return self.config; },
      hooks: this.tapHooks,
      log: this.log,
      get state() { return self._state; },
      get memory() { return self._memory; },
      get vm() { return self._vm; },
      get vcpus() { return self._vcpus; },
      requestStop: (r: StopReason) => this.requestStop(r),
      stop: (r?: StopReason) => this.stop(r),
      requestReset: (source: string) => this.requestReset(source),
      pause: () => this.pause(),
      resume: () => this.resume(),
      get plugins() { return self.pluginHost.list().map((p) => ({ name: p.name, version: p.version, provides: [...(p.provides ?? [])] })); },
      strategies: () => ({ snapshot: registeredKeys(this.hooks.snapshotStrategy), migration: registeredKeys(this.hooks.migrationStrategy) }),
      saveState: () => this.saveState(),
      restoreState: (sections: ReadonlyMap<string, StateSection>) => this.restoreState(sections),
      provide: (name: string, api: unknown) => { this.provided.set(name, api); },
      use: <T>(name: string) => this.provided.get(name) as T | undefined,
    }) as MachineApi;
    for (const p of opts.plugins ?? []) this.pluginHost.register(p);
  }

  get state(): MachineState { return this._state; }
  get memory(): GuestMemory | undefined { return this._memory; }
  get vm(): Vm | undefined { return this._vm; }
  get vcpus(): readonly Vcpu[] { return this._vcpus; }
  get kernelCmdline(): string { return this.cmdline; }
  /** Linux thread ids of the vCPU workers (for pinning and tests). */
  get vcpuThreadIds(): number[] { return this.runtimes.map((r) => r.tid); }
  /** Total KVM exits seen by each vCPU worker so far. */
  exitCounts(): { total: number[]; main: number[] } {
    return { total: this.runtimes.map((r) => r.ctrl[P.EXITS]!), main: this.runtimes.map((r) => r.ctrl[P.EXITS_MAIN]!) };
  }

  /** Registers one more plugin before start(). */
  use(plugin: Plugin): this {
    if (this._state !== 'created') throw new KvmkitError('KVMKIT_ERR_STATE', `cannot add plugin ${plugin.name}: machine is ${this._state}`);
    this.pluginHost.register(plugin);
    return this;
  }

  private async guard<T>(what: string, plugin: string | undefined, f: () => T | Promise<T>): Promise<T> {
    try {
      return await f();
    } catch (e) {
      if (e instanceof KvmkitError) throw e;
      throw new KvmkitError('KVMKIT_ERR_PLUGIN_HOOK', `${plugin ? `plugin ${plugin}` : 'a plugin'} threw in ${what}: ${(e as Error)?.message ?? e}`, {
        cause: e,
        details: { hook: what, ...(plugin ? { plugin } : {}) },
      });
    }
  }

  /**
   * Builds and starts the VM. With `paused: true` the vCPU threads start but wait paused (state 'paused') until
   * resume(): for restores and incoming migrations that must not run the guest yet. On failure everything
   * acquired so far is released and the error rethrown.
   */
  async start(opts: { paused?: boolean } = {}): Promise<void> {
    if (this._state !== 'created') throw new KvmkitError('KVMKIT_ERR_STATE', `start(): machine is ${this._state}`);
    try {
      await this.startInner(opts.paused === true);
    } catch (e) {
      const err = toKvmkitError(e, 'KVMKIT_ERR_PLUGIN_HOOK');
      this.fail(err);
      // Devices may hold host resources (TAP fds, eventfds, files) from the devices hook on: let them go.
      if (this.devicesRan) {
        try {
          await this.hooks.afterStop.promise(this.api);
        } catch (e2) {
          this.log.error({ err: e2 }, 'an afterStop tap failed after a failed start');
        }
      }
      for (const w of this.prewarmed) if (!this.runtimes.some((rt) => rt.worker === w)) await terminateVcpuWorker(w);
      this.prewarmed = [];
      for (const rt of this.runtimes) {
        Atomics.store(rt.ctrl, P.CMD, P.CMD_STOP);
        Atomics.notify(rt.ctrl, P.CMD);
        Atomics.notify(rt.ctrl, P.STATE);
        await terminateVcpuWorker(rt.worker);
        rt.watch?.close();
        rt.wake?.close();
      }
      await this.release();
      this._state = 'stopped';
      this.settle({ reason: 'error', exitCode: 1, message: err.message, error: err });
      throw err;
    }
  }

  private async startInner(paused: boolean): Promise<void> {
    const log = this.log;
    this.pluginHost.check();
    for (const p of this.pluginHost.list()) {
      await this.guard('apply', p.name, () => p.apply(this.api, { log: log.child({ plugin: p.name }), options: p.options }));
    }
    await this.guard('validate', undefined, () => this.hooks.validate.call(this.config));
    this.config = await this.guard('configure', undefined, () => this.hooks.configure.call(this.config));
    validateMachineConfig(this.config);
    this._state = 'configured';
    // Thread + isolate + module start-up of the vCPU workers runs while memory, devices and boot are set up
    // (workers pre-spawned by the process, see vcpu/pool.ts, are adopted first). Until startWorkers() adopts a
    // worker, a failure is remembered instead of lost (workerFailure).
    this.prewarmed = Array.from({ length: this.config.cpus }, (_, i) => takePrespawned() ?? spawnVcpuWorker(`vcpu${i}`));

    const kvm = (this.kvm = Kvm.open(this.kvmPath));
    kvm.requireCapabilities([...REQUIRED_CAPS]);
    const layout = (this.layout = await this.guard('memoryLayout', undefined, () =>
      this.hooks.memoryLayout.call(defaultMemoryLayout(this.config.memory), this.config)));
    checkLayout(layout);

    // Guest RAM: one anonymous mapping per range.
    const regions: MemoryRegion[] = [];
    for (const [slot, r] of layout.ram.entries()) {
      const provided = await this.guard('allocateMemory', undefined, () => this.hooks.allocateMemory.call(r, this.config));
      let backing: MemoryBacking;
      if (provided) {
        if (provided.size !== r.size) {
          provided.release();
          throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `allocateMemory returned ${provided.size} bytes for ${r.name} (${r.size} needed)`);
        }
        backing = provided;
      } else {
        // SAFETY: the mapping lives until release(), after the VM fd (which references it) is closed.
        const addr = ffi.mmap(r.size, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS | ffi.MAP_NORESERVE);
        backing = { hva: addr, size: r.size, kind: 'anonymous', release: () => ffi.munmap(addr, r.size) };
      }
      this.backings.push(backing);
      regions.push({ gpa: r.gpa, size: r.size, bytes: new Uint8Array(ffi.viewOf(backing.hva, r.size)), hva: backing.hva, slot, name: r.name, anonymousPrivate: !provided });
      log.debug({ range: r.name, size: r.size, backing: backing.kind }, 'guest RAM mapped');
    }
    const memory = (this._memory = new GuestMemory(regions));
    await this.guard('memoryMapped', undefined, () => this.hooks.memoryMapped.promise(memory));

    const vm = (this._vm = new Vm(kvm));
    vm.hostDirty = memory;
    for (const r of memory.regions) vm.setMemoryRegion(r.slot, r.gpa, r.size, r.hva);
    await this.guard('vmCreated', undefined, () => this.hooks.vmCreated.promise(vm));

    const registry = (this.registry = new DeviceRegistry(this.pio, this.mmio, memory, vm, layout, log));
    this.devicesRan = true;
    await this.guard('devices', undefined, () => this.hooks.devices.promise(registry));
    const parts = await this.guard('cmdline', undefined, () => this.hooks.cmdline.call([...registry.cmdlineParts]));
    this.cmdline = [...parts, this.config.cmdline ?? ''].filter((s) => s.length > 0).join(' ');

    const supported = kvm.supportedCpuid();
    for (let i = 0; i < this.config.cpus; i++) {
      const vcpu = vm.createVcpu(i);
      this._vcpus.push(vcpu);
      const entries = await this.guard('cpuid', undefined, () => this.hooks.cpuid.call(fixupCpuid(supported, i, this.config.cpus), i));
      vcpu.setCpuid(entries);
      await this.guard('vcpuCreated', undefined, () => this.hooks.vcpuCreated.promise({ index: i, vcpu }));
    }

    const ctx: BootContext = { config: this.config, memory, layout, vm, cpus: this.config.cpus, cmdline: this.cmdline, log };
    const boot = await this.guard('boot', undefined, () => this.hooks.boot.promise(ctx));
    if (!boot) {
      throw new KvmkitError('KVMKIT_ERR_NO_FIRMWARE', 'no boot plugin prepared the vCPUs (add one that provides "firmware", e.g. @kvmkit/plugin-boot-linux)');
    }
    log.info({ loader: boot.loader, cpus: this.config.cpus, memoryMiB: this.config.memory }, 'boot prepared');
    boot.vcpus.forEach((s, i) => {
      const v = this._vcpus[i];
      if (s && v) applyBootState(v, s);
    });
    await this.guard('beforeRun', undefined, () => this.hooks.beforeRun.promise(this.api));
    await this.startWorkers(paused);
    if (paused) {
      await this.waitStates((st) => st === P.ST_PAUSED || st === P.ST_DONE, 5000, 'start paused', false);
      this._state = 'paused';
    } else this._state = 'running';
  }

  private async startWorkers(paused: boolean): Promise<void> {
    installKickSignal();
    const handlers: P.WorkerInit['handlers'] = [];
    const ranges = (entries: readonly BusEntry[], kind: 'pio' | 'mmio'): P.WorkerRange[] =>
      entries.map((e) => {
        let handler = -1;
        if (e.worker) {
          handler = handlers.length;
          handlers.push({ module: e.worker.module, exportName: e.worker.exportName, shared: e.worker.shared, kind, base: e.base });
        }
        return { base: e.base, size: e.size, handler };
      });
    const pio = ranges(this.pio.list(), 'pio');
    const mmio = ranges(this.mmio.list(), 'mmio');
    this.prewarmed = this.prewarmed.slice(0, this._vcpus.length);
    const ready: Array<Promise<void>> = [];
    for (const vcpu of this._vcpus) {
      const ctrlSab = new SharedArrayBuffer(P.CTRL_INTS * 4);
      const mbSab = new SharedArrayBuffer(P.MB_BYTES);
      const wake = this.mailboxWake === 'eventfd' ? EventFd.create() : undefined;
      const init: P.WorkerInit = { index: vcpu.index, fd: vcpu.fd, mmapSize: vcpu.mmapSize, ctrl: ctrlSab, mailbox: mbSab, pio, mmio, handlers, wakeFd: wake ? wake.fd : -1 };
      const pre = this.prewarmed[vcpu.index];
      const early = pre ? workerFailure(pre) : undefined;
      if (early) throw new KvmkitError('KVMKIT_ERR_VCPU_WORKER', `vCPU ${vcpu.index} worker failed while starting: ${early.message}`, { cause: early });
      const worker = pre ?? spawnVcpuWorker(`vcpu${vcpu.index}`, init);
      if (pre) worker.postMessage(init);
      const rt: VcpuRuntime = {
        index: vcpu.index, vcpu, worker, ctrl: new Int32Array(ctrlSab), mb: new Int32Array(mbSab), mbBytes: new Uint8Array(mbSab),
        tid: 0, thread: 0n, done: false, exited: Promise.resolve(), wake, watch: undefined,
      };
      rt.exited = new Promise<void>((res) => worker.once('exit', () => { rt.done = true; res(); }));
      this.runtimes.push(rt);
      ready.push(new Promise<void>((res, rej) => {
        worker.on('message', (m: P.WorkerMessage) => {
          if (m.type === 'ready') {
            rt.tid = m.tid;
            rt.thread = m.thread;
            res();
          } else if (m.type === 'error') {
            const err = reviveError(m.error) as KvmkitError;
            rej(err);
            this.fail(toKvmkitError(err, 'KVMKIT_ERR_VCPU_WORKER'));
            this.requestStop({ reason: 'error', exitCode: 1, message: `vCPU ${rt.index}: ${err.message}`, error: toKvmkitError(err, 'KVMKIT_ERR_VCPU_WORKER') });
          }
        });
        worker.once('error', (e) => {
          const err = new KvmkitError('KVMKIT_ERR_VCPU_WORKER', `vCPU ${rt.index} worker crashed: ${e.message}`, { cause: e });
          rej(err);
          this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
        });
        worker.once('exit', () => rej(new KvmkitError('KVMKIT_ERR_VCPU_WORKER', `vCPU ${rt.index} worker exited before it was ready`)));
      }));
    }
    await Promise.all(ready);
    // A paused start is 'paused' from here on: vcpuThread taps (e.g. virtio transports) must not start devices.
    if (paused) this._state = 'paused';
    for (const rt of this.runtimes) await this.guard('vcpuThread', undefined, () => this.hooks.vcpuThread.promise({ index: rt.index, tid: rt.tid }));
    for (const rt of this.runtimes) {
      this.serveMailbox(rt);
      Atomics.store(rt.ctrl, P.CMD, paused ? P.CMD_PAUSE : P.CMD_RUN);
      Atomics.store(rt.ctrl, P.STATE, P.ST_RUNNING);
      Atomics.notify(rt.ctrl, P.STATE);
    }
  }

  /** Serves one vCPU's mailbox on the main thread until the worker is gone. */
  private serveMailbox(rt: VcpuRuntime): void {
    if (rt.wake) {
      const wake = rt.wake;
      const serve = (): void => {
        wake.drain();
        if (rt.done || Atomics.load(rt.mb, P.MB_STATE) !== P.MB_REQUEST) return;
        rt.mb[P.MB_ACTION] = this.serveOne(rt);
        Atomics.store(rt.mb, P.MB_STATE, P.MB_RESPONSE);
        Atomics.notify(rt.mb, P.MB_STATE);
      };
      rt.watch = watchFd(wake.fd, serve);
      serve();
      return;
    }
    const step = (): void => {
      if (rt.done) return;
      const v = Atomics.load(rt.mb, P.MB_STATE);
      if (v === P.MB_REQUEST) {
        rt.mb[P.MB_ACTION] = this.serveOne(rt);
        Atomics.store(rt.mb, P.MB_STATE, P.MB_RESPONSE);
        Atomics.notify(rt.mb, P.MB_STATE);
        step();
        return;
      }
      const w = Atomics.waitAsync(rt.mb, P.MB_STATE, v);
      if (w.async) void w.value.then(step);
      else queueMicrotask(step);
    };
    step();
  }

  /** Answers the pending mailbox request; returns the action for the worker. */
  private serveOne(rt: VcpuRuntime): number {
    let action = P.ACTION_CONTINUE;
    try {
      action = this.handleRequest(rt);
    } catch (e) {
      const err = toKvmkitError(e, 'KVMKIT_ERR_PLUGIN_HOOK', `device error on vCPU ${rt.index}: ${(e as Error)?.message ?? e}`);
      this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
      action = P.ACTION_PARK;
    }
    if (this._state === 'stopping' || this.stopReason) action = P.ACTION_PARK;
    return action;
  }

  private handleRequest(rt: VcpuRuntime): number {
    this.stats.mainExits++;
    const mb = rt.mb;
    const kind = mb[P.MB_KIND]!;
    const addr = (mb[P.MB_ADDR_LO]! >>> 0) + (mb[P.MB_ADDR_HI]! >>> 0) * 0x1_0000_0000;
    const size = mb[P.MB_SIZE]!;
    const count = mb[P.MB_COUNT]!;
    const data = rt.mbBytes;
    switch (kind) {
      case P.MB_KIND_PIO_OUT:
        for (let i = 0; i < count; i++) this.pio.write(addr, data.subarray(P.MB_DATA + i * size, P.MB_DATA + (i + 1) * size));
        return P.ACTION_CONTINUE;
      case P.MB_KIND_PIO_IN:
        for (let i = 0; i < count; i++) this.pio.read(addr, data.subarray(P.MB_DATA + i * size, P.MB_DATA + (i + 1) * size));
        return P.ACTION_CONTINUE;
      case P.MB_KIND_MMIO_WRITE:
        this.mmio.write(addr, data.subarray(P.MB_DATA, P.MB_DATA + size));
        return P.ACTION_CONTINUE;
      case P.MB_KIND_MMIO_READ:
        this.mmio.read(addr, data.subarray(P.MB_DATA, P.MB_DATA + size));
        return P.ACTION_CONTINUE;
      case P.MB_KIND_EXIT:
        return this.handleExit(rt, mb[P.MB_REASON]!, data.subarray(P.MB_DATA, P.MB_DATA + 256));
      default:
        return P.ACTION_CONTINUE;
    }
  }

  /** Decides what happens on an exit no bus handled. */
  private handleExit(rt: VcpuRuntime, reason: number, union: Uint8Array): number {
    const dv = new DataView(union.buffer, union.byteOffset, union.byteLength);
    const u64s = (off: number, n: number) => Array.from({ length: Math.min(n, 16) }, (_, i) => dv.getBigUint64(off + i * 8, true));
    let exit: VcpuExit;
    switch (reason) {
      case KVM_EXIT.HLT:
        exit = { kind: 'hlt' };
        break;
      case KVM_EXIT.SHUTDOWN:
        exit = { kind: 'shutdown' };
        break;
      case KVM_EXIT.SYSTEM_EVENT:
        exit = { kind: 'system-event', type: dv.getUint32(0, true), data: u64s(8, dv.getUint32(4, true)) };
        break;
      case KVM_EXIT.FAIL_ENTRY:
        exit = { kind: 'fail-entry', reason: dv.getBigUint64(0, true), cpu: dv.getUint32(8, true) };
        break;
      case KVM_EXIT.INTERNAL_ERROR:
        exit = { kind: 'internal-error', suberror: dv.getUint32(0, true), data: u64s(8, dv.getUint32(4, true)) };
        break;
      case KVM_EXIT.DEBUG:
        exit = { kind: 'debug' };
        break;
      default:
        exit = { kind: 'unknown', reason };
    }
    const decided = this.hooks.unhandledExit.call(exit, rt.index);
    if (decided === 'continue') return P.ACTION_CONTINUE;
    if (decided === 'stop') {
      this.requestStop({ reason: 'user', exitCode: 0, message: `stopped by a plugin on ${exit.kind}` });
      return P.ACTION_PARK;
    }
    switch (exit.kind) {
      case 'hlt': {
        // Without an in-kernel LAPIC nothing can wake a halted vCPU: it is done. All done → the VM halts.
        rt.ctrl[P.STATE] = P.ST_PARKED;
        const allParked = this.runtimes.every((r) => r === rt || Atomics.load(r.ctrl, P.STATE) === P.ST_PARKED || r.done);
        this.log.debug({ vcpu: rt.index }, 'vCPU halted');
        if (allParked) this.requestStop({ reason: 'halt', exitCode: 0, message: 'all vCPUs halted' });
        return P.ACTION_PARK;
      }
      case 'shutdown': {
        const err = new KvmkitError('KVMKIT_ERR_GUEST_SHUTDOWN', `vCPU ${rt.index}: guest triple fault (KVM_EXIT_SHUTDOWN)`, { details: this.regDump(rt) });
        this.log.error(err.details, err.message);
        this.requestStop({ reason: 'triple-fault', exitCode: 1, message: err.message, error: err });
        return P.ACTION_PARK;
      }
      case 'system-event':
        if (exit.type === KVM_SYSTEM_EVENT.RESET) {
          this.requestReset('system-event');
        } else if (exit.type === KVM_SYSTEM_EVENT.SHUTDOWN) {
          this.requestStop({ reason: 'shutdown', exitCode: 0, message: 'guest shut down' });
        } else {
          const err = new KvmkitError('KVMKIT_ERR_GUEST_CRASH', `vCPU ${rt.index}: guest reported a crash (KVM_SYSTEM_EVENT type ${exit.type})`, {
            details: { type: exit.type, data: exit.data.map((d) => `0x${d.toString(16)}`), ...this.regDump(rt) },
          });
          this.log.error(err.details, err.message);
          this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
        }
        return P.ACTION_PARK;
      case 'internal-error': {
        const err = new KvmkitError('KVMKIT_ERR_GUEST_INTERNAL', `vCPU ${rt.index}: KVM internal error, suberror ${exit.suberror}${exit.suberror === 1 ? ' (emulation failure)' : ''}`, {
          details: { suberror: exit.suberror, data: exit.data.map((d) => `0x${d.toString(16)}`), ...this.regDump(rt) },
        });
        this.log.error(err.details, err.message);
        this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
        return P.ACTION_PARK;
      }
      case 'fail-entry': {
        const err = new KvmkitError('KVMKIT_ERR_GUEST_FAIL_ENTRY', `vCPU ${rt.index}: KVM_EXIT_FAIL_ENTRY, hardware reason 0x${exit.reason.toString(16)}`, {
          details: { reason: `0x${exit.reason.toString(16)}`, ...this.regDump(rt) },
        });
        this.log.error(err.details, err.message);
        this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
        return P.ACTION_PARK;
      }
      default: {
        const err = new KvmkitError('KVMKIT_ERR_GUEST_UNHANDLED_EXIT', `vCPU ${rt.index}: unhandled exit ${exit.kind}${exit.kind === 'unknown' ? ` (${exit.reason})` : ''}`, { details: this.regDump(rt) });
        this.log.error(err.details, err.message);
        this.requestStop({ reason: 'error', exitCode: 1, message: err.message, error: err });
        return P.ACTION_PARK;
      }
    }
  }

  /** Registers of a vCPU that is not in KVM_RUN (it is waiting on its mailbox), for error reports. */
  private regDump(rt: VcpuRuntime): Record<string, unknown> {
    try {
      const r = rt.vcpu.getRegs();
      const s = rt.vcpu.getSregs();
      const hex = (x: bigint) => `0x${x.toString(16)}`;
      return {
        vcpu: rt.index,
        regs: Object.fromEntries(Object.entries(r).map(([k, v]) => [k, hex(v as bigint)])),
        sregs: { cr0: hex(s.cr0), cr3: hex(s.cr3), cr4: hex(s.cr4), efer: hex(s.efer), cs: s.cs.selector, cpl: s.cs.dpl, csBase: hex(s.cs.base), ss: s.ss.selector },
      };
    } catch (e) {
      return { vcpu: rt.index, regsError: (e as Error).message };
    }
  }

  private fail(err: KvmkitError): void {
    try {
      this.hooks.failed.call(err);
    } catch (e) {
      this.log.warn({ err: e }, 'a failed-hook tap threw');
    }
  }

  requestStop(reason: StopReason): void {
    if (this.stopReason) return;
    this.stopReason = reason;
    if (reason.error) this.fail(reason.error);
    this.log.info({ reason: reason.reason, exitCode: reason.exitCode, message: reason.message }, 'stop requested');
    // Stop asynchronously so that a device callback asking for a stop returns first.
    setImmediate(() => void this.stop().catch((e) => this.log.error({ err: e }, 'stop failed')));
  }

  requestReset(source: string): void {
    if (this.config.onReset === 'reboot') {
      // Reboot = stop; the caller (CLI) restarts a fresh machine. Recorded in the stop reason.
      this.resetRequested = true;
      this.requestStop({ reason: 'reset', exitCode: 0, message: `guest reset (${source}); reboot requested` });
    } else {
      this.requestStop({ reason: 'reset', exitCode: 0, message: `guest reset (${source})` });
    }
  }

  /** True when the guest asked for a reset and config.onReset is 'reboot'. */
  get rebootRequested(): boolean {
    return this.resetRequested;
  }

  private kick(rt: VcpuRuntime): void {
    if (rt.done) return;
    rt.vcpu.setImmediateExit(true);
    if (rt.thread !== 0n) ffi.pthreadKill(rt.thread, ffi.SIGUSR2);
  }

  private async waitStates(pred: (s: number, rt: VcpuRuntime) => boolean, timeoutMs: number, what: string, rekick: boolean): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const pending = this.runtimes.filter((rt) => !rt.done && !pred(Atomics.load(rt.ctrl, P.STATE), rt));
      if (pending.length === 0) return;
      if (Date.now() > deadline) {
        throw new KvmkitError('KVMKIT_ERR_TIMEOUT', `${what}: vCPU(s) ${pending.map((r) => r.index).join(',')} did not respond within ${timeoutMs} ms`);
      }
      const rt = pending[0]!;
      const s = Atomics.load(rt.ctrl, P.STATE);
      const w = Atomics.waitAsync(rt.ctrl, P.STATE, s, 5);
      if (w.async) {
        // A pending waitAsync does not keep Node's event loop alive: race it with a (ref'd) timer so a caller
        // awaiting pause()/stop() with nothing else pending is not dropped by an exiting loop (exit code 13).
        let t: NodeJS.Timeout | undefined;
        await Promise.race([w.value, new Promise((r) => (t = setTimeout(r, 6)))]);
        clearTimeout(t);
      }
      if (rekick) for (const r of pending) this.kick(r);
    }
  }

  /** Kicks every vCPU out of KVM_RUN and resolves when all are paused. */
  async pause(): Promise<void> {
    if (this._state === 'paused') return;
    if (this._state !== 'running') throw new KvmkitError('KVMKIT_ERR_STATE', `pause(): machine is ${this._state}`);
    for (const rt of this.runtimes) {
      Atomics.store(rt.ctrl, P.CMD, P.CMD_PAUSE);
      this.kick(rt);
    }
    await this.waitStates((s) => s === P.ST_PAUSED || s === P.ST_PARKED || s === P.ST_DONE, 5000, 'pause', true);
    this._state = 'paused';
    await this.hooks.paused.promise(this.api);
  }

  async resume(): Promise<void> {
    if (this._state === 'running') return;
    if (this._state !== 'paused') throw new KvmkitError('KVMKIT_ERR_STATE', `resume(): machine is ${this._state}`);
    for (const rt of this.runtimes) {
      Atomics.store(rt.ctrl, P.CMD, P.CMD_RUN);
      Atomics.notify(rt.ctrl, P.CMD);
    }
    await this.waitStates((s) => s === P.ST_RUNNING || s === P.ST_PARKED || s === P.ST_DONE, 5000, 'resume', false);
    this._state = 'running';
    await this.hooks.resumed.promise(this.api);
  }

  /** Resolves with the stop reason once the machine has stopped and released everything. */
  waitForStop(): Promise<StopReason> {
    return this.stopPromise;
  }

  /** Stops the VM (idempotent): vCPUs out, afterStop hooks, every fd, mapping and worker released. */
  stop(reason: StopReason = { reason: 'user', exitCode: 0, message: 'stopped by the host' }): Promise<void> {
    if (!this.stopReason) this.stopReason = reason;
    if (!this.stopping) this.stopping = this.stopInner();
    return this.stopping;
  }

  private async stopInner(): Promise<void> {
    if (this._state === 'stopped') return;
    const wasStarted = this.runtimes.length > 0;
    this._state = 'stopping';
    for (const rt of this.runtimes) {
      Atomics.store(rt.ctrl, P.CMD, P.CMD_STOP);
      Atomics.notify(rt.ctrl, P.CMD);
      this.kick(rt);
    }
    try {
      await this.waitStates((s) => s === P.ST_DONE, 5000, 'stop', true);
    } catch (e) {
      this.log.error({ err: e }, 'vCPUs did not stop; terminating workers');
    }
    await Promise.race([Promise.all(this.runtimes.map((r) => r.exited)), new Promise((r) => setTimeout(r, 2000))]);
    for (const rt of this.runtimes) if (!rt.done) await terminateVcpuWorker(rt.worker);
    for (const rt of this.runtimes) {
      rt.watch?.close();
      rt.wake?.close();
    }
    if (wasStarted || this.devicesRan) {
      try {
        await this.hooks.afterStop.promise(this.api);
      } catch (e) {
        this.log.error({ err: e }, 'an afterStop tap failed');
      }
    }
    await this.release();
    this._state = 'stopped';
    this.settle(this.stopReason ?? { reason: 'user', exitCode: 0 });
  }

  private settle(r: StopReason): void {
    this.stopResolve(r);
  }

  private async release(): Promise<void> {
    for (const v of this._vcpus) {
      try { v.close(); } catch (e) { this.log.warn({ err: e }, 'vcpu close failed'); }
    }
    this._vcpus = [];
    this._vm?.close();
    this._memory?.close();
    for (const b of this.backings) {
      try { b.release(); } catch (e) { this.log.warn({ err: e }, 'releasing guest memory failed'); }
    }
    this.backings = [];
    this.kvm?.close();
    this.kvm = undefined;
  }

  /**
   * Collects the machine's state except guest RAM: section `kernel` (config summary, every vCPU's complete
   * state) and every plugin's section (saveState hook). The machine must be paused.
   */
  async saveState(): Promise<Map<string, StateSection>> {
    if (this._state !== 'paused') throw new KvmkitError('KVMKIT_ERR_STATE', `saveState: machine must be paused (is ${this._state})`);
    const w = new StateWriter();
    const kvm = this.kvm!;
    const msrs = kvm.msrIndexList();
    w.write('kernel', 1, {
      memory: this.config.memory,
      cpus: this.config.cpus,
      ram: this._memory!.regions.map((r) => ({ gpa: r.gpa, size: r.size, name: r.name })),
      vcpus: this._vcpus.map((v) => saveVcpuState(kvm, v, this._vm!.hasIrqchip, msrs)),
    });
    await this.hooks.saveState.promise(w);
    return w.sections;
  }

  /**
   * Restores what saveState wrote, into a machine with the same config: call it while paused, or from a
   * `beforeRun` tap (state 'configured': devices exist, vCPUs not yet running). Throws
   * KVMKIT_ERR_STATE_FORMAT naming the mismatch when memory size, vCPU count or RAM layout differ.
   */
  async restoreState(sections: ReadonlyMap<string, StateSection>): Promise<void> {
    if (this._state !== 'paused' && this._state !== 'configured') throw new KvmkitError('KVMKIT_ERR_STATE', `restoreState: machine must be paused (is ${this._state})`);
    const r = new StateReader(sections);
    const k = r.read<{ memory: number; cpus: number; ram: Array<{ gpa: bigint; size: number }>; vcpus: VcpuState[] }>('kernel', 1);
    const mismatch = (what: string, saved: unknown, here: unknown) =>
      new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `saved state does not fit this machine: ${what} is ${String(saved)} in the state, ${String(here)} here`, { details: { what, saved, here } });
    if (k.memory !== this.config.memory) throw mismatch('memory (MiB)', k.memory, this.config.memory);
    if (k.cpus !== this.config.cpus || k.vcpus.length !== this._vcpus.length) throw mismatch('vCPU count', k.cpus, this.config.cpus);
    const here = this._memory!.regions;
    if (k.ram.length !== here.length || k.ram.some((x, i) => x.gpa !== here[i]!.gpa || x.size !== here[i]!.size)) {
      throw mismatch('RAM layout', JSON.stringify(k.ram.map((x) => [String(x.gpa), x.size])), JSON.stringify(here.map((x) => [String(x.gpa), x.size])));
    }
    // Plugins first (irqchip/PIT in platform-pc must precede LAPIC/vCPU events), then the vCPUs.
    await this.hooks.restoreState.promise(r);
    k.vcpus.forEach((s, i) => restoreVcpuState(this._vcpus[i]!, s));
  }
}

function checkLayout(l: MemoryLayout): void {
  const rs = [...l.ram].sort((a, b) => (a.gpa < b.gpa ? -1 : 1));
  rs.forEach((r, i) => {
    if (r.size <= 0 || r.size % 4096 !== 0 || r.gpa % 4096n !== 0n) {
      throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `RAM range ${r.name} must be page aligned and non-empty (gpa 0x${r.gpa.toString(16)}, size ${r.size})`);
    }
    const prev = rs[i - 1];
    if (prev && prev.gpa + BigInt(prev.size) > r.gpa) throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `RAM ranges ${prev.name} and ${r.name} overlap`);
    for (const x of l.reserved) {
      if (r.gpa < x.gpa + BigInt(x.size) && x.gpa < r.gpa + BigInt(r.size)) {
        throw new KvmkitError('KVMKIT_ERR_MEMORY_LAYOUT', `RAM range ${r.name} overlaps reserved window ${x.name}`);
      }
    }
  });
}

/** Per-vCPU CPUID: APIC ids in leaves 1, 0xB and 0x1F. */
export function fixupCpuid(entries: CpuidEntry[], index: number, cpus: number): CpuidEntry[] {
  return entries.map((e0) => {
    const e = { ...e0 };
    if (e.function === 1) {
      e.ebx = ((e.ebx & 0x0000ffff) | ((Math.min(cpus, 255) & 0xff) << 16) | ((index & 0xff) << 24)) >>> 0;
      e.edx = (e.edx | (1 << 28)) >>> 0; // HTT: logical count field valid
    } else if (e.function === 0xb || e.function === 0x1f) {
      e.edx = index >>> 0;
    }
    return e;
  });
}

function applyBootState(v: Vcpu, s: VcpuBootState): void {
  if (s.sregs) v.setSregs({ ...v.getSregs(), ...s.sregs });
  if (s.regs) v.setRegs({ ...v.getRegs(), ...s.regs });
  if (s.msrs && s.msrs.length > 0) v.setMsrs(s.msrs);
  if (s.mpState !== undefined) v.setMpState(s.mpState);
}
