import { openSync, closeSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Machine, ffi, KvmkitError, type MachineConfig, type Plugin, type Logger, type StateSection, type MemoryBacking } from '@kvmkit/kernel';
import { readStateFile, hostInfo, type LoadedSnapshot, type HostInfo } from './format.js';
import { readFullMemoryAsync, applyDiffMemory, checkMemorySize, verifyMemoryFile } from './memfile.js';
import { Progress, type ProgressCallback } from './progress.js';
import { snapErr, ioErr } from './errors.js';
import type { SnapshotApi } from './plugin.js';

const MAX_CHAIN = 1000;

/** Reads a snapshot and, for a diff, its ancestors: [full, diff1, …, tip], each verified against its child's reference. */
export function loadChain(path: string): LoadedSnapshot[] {
  const chain: LoadedSnapshot[] = [];
  let cur = readStateFile(resolve(path));
  chain.unshift(cur);
  while (cur.body.kind === 'diff') {
    if (chain.length > MAX_CHAIN) throw snapErr('KVMKIT_ERR_SNAPSHOT_PARENT', `${path}: diff chain longer than ${MAX_CHAIN}`, { path });
    const ref = cur.body.parent!;
    const ppath = resolve(dirname(cur.path), ref.path);
    let parent: LoadedSnapshot;
    try {
      parent = readStateFile(ppath);
    } catch (e) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_PARENT', `${cur.path}: parent ${ppath} cannot be read: ${(e as Error).message}`, { path: cur.path, parent: ppath, cause: (e as KvmkitError).code }, e);
    }
    if (parent.sha256 !== ref.sha256) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_PARENT', `${cur.path}: parent ${ppath} is not the snapshot this diff was taken on (sha256 ${parent.sha256.slice(0, 12)}…, expected ${ref.sha256.slice(0, 12)}…)`, {
        path: cur.path, parent: ppath, expected: ref.sha256, actual: parent.sha256,
      });
    }
    const a = parent.body.memory.ranges;
    const b = cur.body.memory.ranges;
    if (a.length !== b.length || a.some((r, i) => r.gpa !== b[i]!.gpa || r.size !== b[i]!.size)) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_PARENT', `${cur.path}: RAM layout differs from its parent ${ppath}`, { path: cur.path, parent: ppath });
    }
    chain.unshift(parent);
    cur = parent;
  }
  return chain;
}

/**
 * Checks a snapshot against the restoring host and machine; throws KVMKIT_ERR_SNAPSHOT_HOST_MISMATCH or
 * KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH naming the first difference. Kernel release differences only warn.
 */
export function checkCompatible(s: LoadedSnapshot, config: Pick<MachineConfig, 'memory' | 'cpus'>, plugins: ReadonlyArray<{ name: string; version: string }>, host: HostInfo, log?: Logger): void {
  const h = s.body.host;
  for (const k of ['arch', 'cpuVendor', 'cpuFamily', 'cpuModel'] as const) {
    if (h[k] !== host[k]) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_HOST_MISMATCH', `${s.path}: taken on a host with ${k} ${JSON.stringify(h[k])}, this host has ${JSON.stringify(host[k])}`, { what: k, saved: h[k], here: host[k] });
    }
  }
  if (h.kernelRelease !== host.kernelRelease) log?.warn({ saved: h.kernelRelease, here: host.kernelRelease }, 'snapshot taken under another host kernel release');
  const c = s.body.config;
  if (c.memory !== config.memory) {
    throw snapErr('KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', `${s.path}: memory is ${c.memory} MiB in the snapshot, ${config.memory} MiB here`, { what: 'memory', saved: c.memory, here: config.memory });
  }
  if (c.cpus !== config.cpus) {
    throw snapErr('KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', `${s.path}: ${c.cpus} vCPU(s) in the snapshot, ${config.cpus} here`, { what: 'cpus', saved: c.cpus, here: config.cpus });
  }
  const have = new Map(plugins.map((p) => [p.name, p.version]));
  for (const [name] of s.body.sections) {
    if (name === 'kernel') continue;
    if (!have.has(name)) {
      const v = c.plugins.find((p) => p.name === name)?.version;
      throw snapErr('KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', `${s.path}: has state of plugin '${name}'${v ? ` ${v}` : ''}, which this machine does not load`, { what: 'plugin', plugin: name });
    }
  }
}

export interface RestoreOptions {
  /** The snapshot's state file (a full snapshot or the tip of a diff chain). */
  path: string;
  /** 'eager' (default): read and verify all memory before the vCPUs start. 'lazy': map the memory file MAP_PRIVATE. */
  mode?: 'eager' | 'lazy';
  /**
   * lazy only: also verify the base memory file's checksum before the vCPUs start (reads the whole file with
   * O_DIRECT into scratch buffers: no page-cache pages, no copy into guest RAM). Default false.
   */
  verify?: boolean;
  /** Start dirty tracking with this snapshot as the base, so a 'diff' can follow (needs the snapshot plugin). Default true. */
  track?: boolean;
  onProgress?: ProgressCallback;
  progress?: boolean;
}

export interface RestoreInfo {
  path: string;
  mode: 'eager' | 'lazy';
  chain: number;
  /** Bytes read from memory files before the vCPUs started. */
  bytesRead: number;
  /** Diff pages applied. */
  pages: number;
  /** restore(): wall time from construction to running vCPUs (includes the kernel's Machine.start), ms. */
  ms: number;
  /** Time spent in the restore plugin itself, ms: loading + checking files, memory (read/map), machine state, dirty-tracking start. */
  phases: { load: number; memory: number; state: number; track: number };
  /** Memory checksums verified: 'sha256' (eager, or lazy with verify) or 'size-only' (lazy: the base memory file's size was checked, not its content). */
  verified: 'sha256' | 'size-only';
}

/**
 * The restore plugin: answers `boot` first (no loader writes memory), maps RAM from the memory file in lazy
 * mode, and in `beforeRun` puts memory and the machine state back. Needs the Machine itself (for
 * restoreState and the plugin list): pass a getter. `restore()` wires all of this.
 */
export function restorePlugin(options: RestoreOptions, getMachine: () => Machine): Plugin {
  const mode = options.mode ?? 'eager';
  return {
    name: 'snapshot-restore',
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    apply(m, { log }) {
      const t0 = performance.now();
      // Eager reads go into guest RAM across event-loop turns: a stop meanwhile releases RAM only after them.
      let reading: Promise<void> | undefined;
      m.hooks.afterStop.tapPromise('snapshot-restore', async () => {
        await reading?.catch(() => { /* reported by beforeRun */ });
      });
      let chain: LoadedSnapshot[] = [];
      let tip!: LoadedSnapshot;
      const info: RestoreInfo = { path: resolve(options.path), mode, chain: 0, bytesRead: 0, pages: 0, ms: 0, verified: mode === 'eager' || options.verify === true ? 'sha256' : 'size-only', phases: { load: 0, memory: 0, state: 0, track: 0 } };
      m.provide('snapshot-restore', info);
      m.hooks.validate.tap('snapshot-restore', (config) => {
        const tl = performance.now();
        chain = loadChain(options.path);
        tip = chain[chain.length - 1]!;
        info.chain = chain.length;
        const plugins = getMachine().pluginHost.list().map((p) => ({ name: p.name, version: p.version }));
        checkCompatible(tip, config, plugins, hostInfo(), log);
        info.phases.load = performance.now() - tl;
      });
      if (mode === 'lazy') {
        m.hooks.allocateMemory.tap('snapshot-restore', (range) => {
          const tm = performance.now();
          const base = chain[0]!;
          const r = base.body.memory.ranges.find((x) => x.gpa === range.gpa && x.size === range.size);
          if (!r) {
            throw snapErr('KVMKIT_ERR_SNAPSHOT_LAZY', `lazy restore: RAM range ${range.name} (gpa 0x${range.gpa.toString(16)}, ${range.size} bytes) is not in ${base.path}`, { range: range.name });
          }
          checkMemorySize(base.memoryPath, base.body.memory.size);
          let fd: number;
          try {
            fd = openSync(base.memoryPath, 'r');
          } catch (e) {
            throw ioErr(e, 'snapshot memory file', base.memoryPath);
          }
          try {
            // SAFETY: a private (copy-on-write) mapping of the file; guest writes never reach the file. It lives
            // until release(), which the kernel calls after the VM fd is closed. The fd may close right away.
            const hva = ffi.mmap(range.size, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_NORESERVE, fd, r.offset);
            const backing: MemoryBacking = { hva, size: range.size, kind: `file:${base.memoryPath}`, release: () => ffi.munmap(hva, range.size) };
            return backing;
          } finally {
            closeSync(fd);
            info.phases.memory += performance.now() - tm;
          }
        });
      }
      m.hooks.boot.tapPromise({ name: 'snapshot-restore', stage: -100 }, async () => ({ loader: 'snapshot', vcpus: [] }));
      m.hooks.beforeRun.tapPromise('snapshot-restore', async () => {
        const tm = performance.now();
        const regions = m.memory!.regions;
        const view = (ranges: LoadedSnapshot['body']['memory']['ranges']) => (i: number) => {
          const r = ranges[i]!;
          const reg = regions.find((x) => x.gpa === r.gpa && x.size === r.size);
          if (!reg) throw snapErr('KVMKIT_ERR_SNAPSHOT_CONFIG_MISMATCH', `RAM range at 0x${r.gpa.toString(16)} (${r.size} bytes) does not exist in this machine`, { what: 'ram' });
          return reg.bytes;
        };
        const show = options.progress ?? process.stderr.isTTY === true;
        const base = chain[0]!;
        if (mode === 'eager') {
          const p = new Progress('restore memory', base.body.memory.size, options.onProgress, show);
          const direct = regions.every((x) => x.hva !== 0n && x.hva % 4096n === 0n);
          const io = readFullMemoryAsync(base.memoryPath, base.body.memory.ranges, base.body.memory.size, base.body.memory.sha256, base.body.memory.hash ?? 'sha256', view(base.body.memory.ranges), direct, p);
          reading = io;
          try {
            await io;
          } finally {
            reading = undefined;
          }
          p.done();
          info.bytesRead += base.body.memory.size;
        } else if (options.verify === true) {
          // Read the file itself (O_DIRECT into page-aligned scratch buffers), not the mapping: no page-cache
          // pages are allocated for it, holes included; the guest's mapping then faults in what it touches.
          const n = 5;
          const len = 8 << 20;
          const addr = ffi.mmap(n * len, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS | ffi.MAP_NORESERVE);
          try {
            const all = new Uint8Array(ffi.viewOf(addr, n * len));
            const scratch = Array.from({ length: n }, (_, i) => all.subarray(i * len, (i + 1) * len));
            await verifyMemoryFile(base.memoryPath, base.body.memory.size, base.body.memory.sha256, base.body.memory.hash ?? 'sha256', scratch, true);
          } finally {
            // SAFETY: the reads into it have settled (verifyMemoryFile waits for them, also on failure).
            ffi.munmap(addr, n * len);
          }
          info.bytesRead += base.body.memory.size;
        }
        for (const d of chain.slice(1)) {
          info.pages += applyDiffMemory(d.memoryPath, d.body.memory.ranges, d.body.memory.size, d.body.memory.sha256, d.body.memory.hash ?? 'sha256', view(d.body.memory.ranges));
          info.bytesRead += d.body.memory.size;
        }
        const ts = performance.now();
        info.phases.memory += ts - tm;
        await getMachine().restoreState(new Map<string, StateSection>(tip.body.sections));
        const tt = performance.now();
        info.phases.state = tt - ts;
        if (options.track !== false) {
          const snap = m.use<SnapshotApi>('snapshot');
          snap?.setBase({ path: tip.path, sha256: tip.sha256 });
        }
        info.phases.track = performance.now() - tt;
        info.ms = performance.now() - t0;
        log.info({ path: tip.path, mode, chain: chain.length, bytesRead: info.bytesRead, ms: Math.round(info.ms) }, 'snapshot restored');
      });
    },
  };
}

export interface RestoreMachineOptions extends RestoreOptions {
  config: MachineConfig;
  /** The machine's plugins (devices as when the snapshot was taken; a boot plugin is not needed). */
  plugins?: Plugin[];
  log?: Logger;
  kvmPath?: string;
}

/** Builds a Machine from `config` + `plugins`, restores the snapshot into it and starts it. */
export async function restore(o: RestoreMachineOptions): Promise<{ machine: Machine; info: RestoreInfo }> {
  const t0 = performance.now();
  let machine!: Machine;
  const { config, plugins, log, kvmPath, ...ro } = o;
  machine = new Machine({ config, plugins: [restorePlugin(ro, () => machine), ...(plugins ?? [])], ...(log ? { log } : {}), ...(kvmPath ? { kvmPath } : {}) });
  await machine.start();
  const info = machine.api.use<RestoreInfo>('snapshot-restore')!;
  info.ms = performance.now() - t0;
  return { machine, info };
}

export { KvmkitError };
