import { existsSync, unlinkSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { dirname, basename, relative, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { KvmkitError, checkOptions, type Strategy, type MachineApi } from '@kvmkit/kernel';
import { encodeStateFile, hostInfo, readStateFile, writeFileAtomic, PAGE, type SnapshotBody } from './format.js';
import { writeFullMemory, writeDiffMemory, bitmapPages, type WrittenMemory } from './memfile.js';
import { Progress, type ProgressCallback } from './progress.js';
import { requireStateful, type StatefulMachine } from './machine.js';
import { snapErr } from './errors.js';

export interface SnapshotOptions {
  /** The state file to write; the memory file goes next to it (`<path>.<id>.mem`). */
  path: string;
  /** After writing: 'resume' (default when the machine was running), 'pause' (stay paused) or 'stop'. */
  then?: 'resume' | 'pause' | 'stop';
  /** full only: start/continue dirty-page tracking so that a later 'diff' can build on this one (default true). */
  track?: boolean;
  /** Progress callback; a TTY on stderr also gets a progress line. */
  onProgress?: ProgressCallback;
  /** Show the stderr progress line (default: process.stderr.isTTY). */
  progress?: boolean;
}

export interface SnapshotResult {
  kind: 'full' | 'diff';
  path: string;
  memoryPath: string;
  sha256: string;
  /** Bytes of guest memory written (diff: dirtied pages only). */
  memoryBytes: number;
  pages: number;
  stateBytes: number;
  /** Wall time from pause to the files being durable, ms. */
  ms: number;
  /** Time the guest was paused, ms. */
  pausedMs: number;
  parent?: string;
}

/** Per-machine diff tracking: the last snapshot and the pages dirtied since (carried over a failed write). */
export interface Tracker {
  base: { path: string; sha256: string } | undefined;
  /** slot → accumulated dirty bitmap since `base` */
  pending: Map<number, Uint8Array>;
  logging: boolean;
  /**
   * Memory I/O in flight on guest RAM (a full save's async writes and hashing). The plugin's afterStop tap waits
   * for it, so a stop requested meanwhile (device, control channel) cannot unmap RAM under it.
   */
  io: Set<Promise<unknown>>;
}

export function newTracker(): Tracker {
  return { base: undefined, pending: new Map(), logging: false, io: new Set() };
}

/** Turns dirty logging on for every slot and folds what KVM logged so far into `pending`. */
export function collectDirty(m: MachineApi, t: Tracker): void {
  const vm = m.vm!;
  for (const r of m.memory!.regions) {
    if (!t.logging) {
      // Just switched on: KVM's log (and the VMM's) is empty, reading it would only cost an ioctl.
      vm.setDirtyLogging(r.slot, true);
      t.pending.set(r.slot, new Uint8Array(Math.ceil(r.size / PAGE / 64) * 8));
      continue;
    }
    const bm = vm.getDirtyLog(r.slot);
    const acc = t.pending.get(r.slot);
    if (!acc) t.pending.set(r.slot, bm.slice());
    else for (let i = 0; i < acc.length; i++) acc[i]! |= bm[i]!;
  }
  t.logging = true;
}

function validate(o: unknown): SnapshotOptions {
  const x = checkOptions('snapshot', o, { path: { type: 'string', required: true }, then: { type: ['resume', 'pause', 'stop'] }, track: { type: 'boolean' }, progress: { type: 'boolean' } }, true) as unknown as SnapshotOptions;
  if (typeof x.path !== 'string' || x.path.length === 0) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'snapshot: option path is required', { details: { key: 'path' } });
  return x;
}

function memoryFileName(path: string): string {
  return `${basename(path)}.${randomBytes(6).toString('hex')}.mem`;
}

/** The memory file the state file at `path` currently references, if it is a readable snapshot. */
function previousMemoryFile(path: string): string | undefined {
  if (!existsSync(path)) return undefined;
  try {
    return readStateFile(path).memoryPath;
  } catch {
    return undefined;
  }
}

async function takeSnapshot(kind: 'full' | 'diff', m0: MachineApi, raw: unknown, t: Tracker): Promise<SnapshotResult> {
  const m: StatefulMachine = requireStateful(m0);
  const o = validate(raw);
  const path = resolve(o.path);
  if (kind === 'diff' && !t.base) {
    throw snapErr('KVMKIT_ERR_SNAPSHOT_NO_BASE', "diff snapshot: take a 'full' snapshot (or restore one with track) on this machine first", { path });
  }
  const wasRunning = m.state === 'running';
  if (!wasRunning && m.state !== 'paused') throw new KvmkitError('KVMKIT_ERR_STATE', `snapshot: machine is ${m.state}`);
  const then = o.then ?? (wasRunning ? 'resume' : 'pause');
  const t0 = performance.now();
  if (wasRunning) await m.pause();
  let pausedMs = 0;
  let oldMem: string | undefined;
  try {
    const sections = await m.saveState();
    const regions = m.memory!.regions;
    const track = kind === 'diff' || o.track !== false;
    if (track) collectDirty(m, t);
    const memName = memoryFileName(path);
    const memPath = resolve(dirname(path), memName);
    const old = previousMemoryFile(path);
    let written: WrittenMemory;
    let pages: number;
    if (kind === 'full') {
      const total = regions.reduce((s, r) => s + r.size, 0);
      const p = new Progress('snapshot memory', total, o.onProgress, o.progress ?? process.stderr.isTTY === true);
      const io = writeFullMemory(memPath, regions, p);
      t.io.add(io);
      try {
        written = await io;
      } finally {
        t.io.delete(io);
      }
      p.done();
      pages = total / PAGE;
    } else {
      const lists = regions.map((r) => bitmapPages(t.pending.get(r.slot) ?? new Uint8Array(0), r.size / PAGE));
      pages = lists.reduce((s, l) => s + l.length, 0);
      const p = new Progress('diff snapshot memory', pages * PAGE, o.onProgress, o.progress ?? process.stderr.isTTY === true);
      written = writeDiffMemory(memPath, regions, lists, p);
      p.done();
    }
    const body: SnapshotBody = {
      kind,
      created: new Date().toISOString(),
      ...(kind === 'diff' ? { parent: { path: relative(dirname(path), t.base!.path), sha256: t.base!.sha256 } } : {}),
      config: { name: m.config.name, memory: m.config.memory, cpus: m.config.cpus, plugins: [...m.plugins] },
      host: hostInfo(),
      memory: { file: memName, size: written.size, sha256: written.sha256, hash: written.hash, pageSize: PAGE, ranges: written.ranges },
      sections: [...sections.entries()],
    };
    const { bytes, sha256 } = encodeStateFile(body);
    try {
      writeFileAtomic(path, bytes);
    } catch (e) {
      try { unlinkSync(memPath); } catch { /* gone */ }
      throw e;
    }
    if (old && old !== memPath) oldMem = old;
    if (track) {
      t.base = { path, sha256 };
      for (const bm of t.pending.values()) bm.fill(0);
    }
    pausedMs = performance.now() - t0;
    const res: SnapshotResult = { kind, path, memoryPath: memPath, sha256, memoryBytes: written.size, pages, stateBytes: bytes.byteLength, ms: performance.now() - t0, pausedMs, ...(body.parent ? { parent: body.parent.path } : {}) };
    m.log.info({ kind, path, memoryBytes: res.memoryBytes, pages, ms: Math.round(res.ms) }, 'snapshot written');
    return res;
  } finally {
    if (then === 'resume' && m.state === 'paused') await m.resume();
    else if (then === 'stop') m.requestStop({ reason: 'user', exitCode: 0, message: 'stopped after snapshot' });
    // The replaced snapshot's memory file goes once the guest runs again (freeing a big file's extents takes
    // tens of ms here); in the thread pool, so the event loop keeps serving devices meanwhile.
    if (oldMem) await unlink(oldMem).catch(() => { /* gone */ });
  }
}

export function fullStrategy(t: Tracker): Strategy {
  return { name: 'full', description: 'pause, write state + whole memory, resume (or stop)', run: (m, o) => takeSnapshot('full', m, o, t) };
}

export function diffStrategy(t: Tracker): Strategy {
  return { name: 'diff', description: 'pages dirtied since the previous snapshot (KVM dirty log), referencing it by hash', run: (m, o) => takeSnapshot('diff', m, o, t) };
}
