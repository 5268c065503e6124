import { createHash, randomBytes } from 'node:crypto';
import { openSync, readSync, closeSync, fstatSync, writeSync, fsyncSync, renameSync, unlinkSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import { release } from 'node:os';
import { Kvm, encodeState, decodeState, type StateSection } from '@kvmkit/kernel';
import { snapErr, ioErr } from './errors.js';

/** "KVMKSNAP" */
export const STATE_MAGIC = Buffer.from('KVMKSNAP', 'latin1');
/**
 * 2: the memory checksum is a sha256 tree over 64 KiB leaves (`memory.hash: 'sha256-tree-64k'`).
 * 1: a flat sha256 of the memory file (no `memory.hash`); still read.
 */
export const FORMAT_VERSION = 2;
export const READABLE_VERSIONS: readonly number[] = [1, 2];

/** The memory checksum algorithms: 'sha256' (format 1: sha256 of the file) and 'sha256-tree-64k' (format 2). */
export type MemoryHash = 'sha256' | 'sha256-tree-64k';
/** What this version writes. */
export const MEMORY_HASH: MemoryHash = 'sha256-tree-64k';
/** magic(8) version u32(4) flags u32(4) bodyLength u64(8) sha256(body)(32) */
export const HEADER_SIZE = 56;
export const PAGE = 4096;

/** What restore checks against the restoring host. */
export interface HostInfo {
  arch: string;
  cpuVendor: string;
  cpuFamily: number;
  cpuModel: number;
  kernelRelease: string;
}

/** What restore checks against the restoring machine. */
export interface ConfigSummary {
  name: string;
  memory: number;
  cpus: number;
  plugins: Array<{ name: string; version: string }>;
}

/** One guest RAM range in the memory file. Full: `offset` of its bytes. Diff: its dirtied pages. */
export interface MemoryRange {
  gpa: bigint;
  size: number;
  /** Offset of this range's data in the memory file (full: whole range; diff: its pages, in `pages` order). */
  offset: number;
  /** Diff only: page indexes within the range, u32 little-endian. */
  pages?: Uint8Array;
  /**
   * Full, format 2: 1 bit per 64 KiB block of the range (LSB first), set where the block is all zero (a hole in
   * the memory file). Eager restore does not read those blocks.
   */
  zero?: Uint8Array;
}

export interface SnapshotBody {
  kind: 'full' | 'diff';
  created: string;
  /** Diff: the parent state file (path relative to this file's directory) and its body sha256. */
  parent?: { path: string; sha256: string };
  config: ConfigSummary;
  host: HostInfo;
  /** `sha256` is the checksum by `hash` (format 1 files have no `hash`: read as 'sha256'). */
  memory: { file: string; size: number; sha256: string; hash?: MemoryHash; pageSize: number; ranges: MemoryRange[] };
  sections: Array<[string, StateSection]>;
}

export interface LoadedSnapshot {
  path: string;
  /** sha256 of the body: the snapshot's identity (diffs reference their parent by it). */
  sha256: string;
  /** Format version of the file. */
  version: number;
  body: SnapshotBody;
  /** Absolute path of the memory file. */
  memoryPath: string;
}

let hostCache: HostInfo | undefined;

/** This host as a snapshot records it (CPUID vendor/family/model from KVM_GET_SUPPORTED_CPUID). */
export function hostInfo(kvmPath?: string): HostInfo {
  if (hostCache) return hostCache;
  const kvm = Kvm.open(kvmPath);
  try {
    const ids = kvm.supportedCpuid();
    const l0 = ids.find((e) => e.function === 0);
    const l1 = ids.find((e) => e.function === 1);
    const vendor = l0 ? Buffer.from(new Uint32Array([l0.ebx, l0.edx, l0.ecx]).buffer).toString('latin1') : 'unknown';
    const eax = l1?.eax ?? 0;
    const baseFamily = (eax >>> 8) & 0xf;
    const family = baseFamily === 0xf ? baseFamily + ((eax >>> 20) & 0xff) : baseFamily;
    const model = baseFamily === 0x6 || baseFamily === 0xf ? (((eax >>> 16) & 0xf) << 4) | ((eax >>> 4) & 0xf) : (eax >>> 4) & 0xf;
    hostCache = { arch: process.arch, cpuVendor: vendor, cpuFamily: family, cpuModel: model, kernelRelease: release() };
    return hostCache;
  } finally {
    kvm.close();
  }
}

/** Encodes header + body (`version`: tests write older versions). */
export function encodeStateFile(body: SnapshotBody, version: number = FORMAT_VERSION): { bytes: Buffer; sha256: string } {
  const json = Buffer.from(encodeState(body), 'utf8');
  const sha = createHash('sha256').update(json).digest();
  const h = Buffer.alloc(HEADER_SIZE);
  STATE_MAGIC.copy(h, 0);
  h.writeUInt32LE(version, 8);
  h.writeUInt32LE(0, 12);
  h.writeBigUInt64LE(BigInt(json.length), 16);
  sha.copy(h, 24);
  return { bytes: Buffer.concat([h, json]), sha256: sha.toString('hex') };
}

/** Reads and verifies a state file (magic, version, length, sha256, body shape). */
export function readStateFile(path: string): LoadedSnapshot {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    throw ioErr(e, 'snapshot state file', path);
  }
  try {
    const size = fstatSync(fd).size;
    const h = Buffer.alloc(HEADER_SIZE);
    const got = readSync(fd, h, 0, HEADER_SIZE, 0);
    if (got >= 8 && !h.subarray(0, 8).equals(STATE_MAGIC)) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_MAGIC', `${path} is not a kvmkit snapshot state file (bad magic)`, { path });
    }
    if (got < HEADER_SIZE) throw snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `${path}: truncated header (${got} of ${HEADER_SIZE} bytes)`, { path, size });
    const version = h.readUInt32LE(8);
    if (!READABLE_VERSIONS.includes(version)) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_VERSION', `${path}: snapshot format version ${version}; this kvmkit reads versions ${READABLE_VERSIONS.join(', ')}`, { path, version });
    }
    const len = Number(h.readBigUInt64LE(16));
    if (size !== HEADER_SIZE + len) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `${path}: ${size} bytes, header says ${HEADER_SIZE + len}`, { path, size, expected: HEADER_SIZE + len });
    }
    const body = Buffer.alloc(len);
    let off = 0;
    while (off < len) {
      const n = readSync(fd, body, off, len - off, HEADER_SIZE + off);
      if (n <= 0) throw snapErr('KVMKIT_ERR_SNAPSHOT_TRUNCATED', `${path}: short read`, { path });
      off += n;
    }
    const sha = createHash('sha256').update(body).digest();
    if (!sha.equals(h.subarray(24, 56))) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_CHECKSUM', `${path}: state body sha256 mismatch (file corrupt)`, { path, expected: h.subarray(24, 56).toString('hex'), actual: sha.toString('hex') });
    }
    let parsed: unknown;
    try {
      parsed = decodeState(body.toString('utf8'));
    } catch (e) {
      throw snapErr('KVMKIT_ERR_SNAPSHOT_FORMAT', `${path}: body is not valid JSON: ${(e as Error).message}`, { path }, e);
    }
    const b = checkBody(parsed, path, version);
    return { path, sha256: sha.toString('hex'), version, body: b, memoryPath: join(dirname(path), b.memory.file) };
  } finally {
    closeSync(fd);
  }
}

function checkBody(x: unknown, path: string, version: number): SnapshotBody {
  const bad = (what: string) => snapErr('KVMKIT_ERR_SNAPSHOT_FORMAT', `${path}: malformed snapshot body (${what})`, { path, what });
  if (!x || typeof x !== 'object') throw bad('not an object');
  const b = x as SnapshotBody;
  if (b.kind !== 'full' && b.kind !== 'diff') throw bad('kind');
  if (b.kind === 'diff' && (!b.parent || typeof b.parent.path !== 'string' || typeof b.parent.sha256 !== 'string')) throw bad('parent');
  if (!b.config || typeof b.config.memory !== 'number' || typeof b.config.cpus !== 'number' || !Array.isArray(b.config.plugins)) throw bad('config');
  if (!b.host || typeof b.host.cpuVendor !== 'string') throw bad('host');
  const m = b.memory;
  if (!m || typeof m.file !== 'string' || basename(m.file) !== m.file || typeof m.size !== 'number' || typeof m.sha256 !== 'string' || m.pageSize !== PAGE || !Array.isArray(m.ranges)) {
    throw bad('memory');
  }
  if (version === 1 ? m.hash !== undefined : m.hash !== 'sha256-tree-64k') throw bad('memory hash');
  m.hash ??= 'sha256';
  let expect = 0;
  for (const r of m.ranges) {
    if (typeof r.gpa !== 'bigint' || !Number.isSafeInteger(r.size) || r.size <= 0 || r.size % PAGE !== 0 || r.offset !== expect) throw bad('memory range');
    if (r.zero !== undefined && (version < 2 || b.kind !== 'full' || !(r.zero instanceof Uint8Array) || r.zero.byteLength !== Math.ceil(Math.ceil(r.size / 65536) / 8))) throw bad('memory range zero map');
    if (b.kind === 'diff') {
      if (!(r.pages instanceof Uint8Array) || r.pages.byteLength % 4 !== 0) throw bad('memory range pages');
      const idx = pageList(r);
      for (const p of idx) if (p >= r.size / PAGE) throw bad('page index out of range');
      expect += idx.length * PAGE;
    } else expect += r.size;
  }
  if (expect !== m.size) throw bad('memory size');
  if (!Array.isArray(b.sections) || !b.sections.some(([n]) => n === 'kernel')) throw bad('sections');
  return b;
}

/** The page indexes of a diff range. */
export function pageList(r: MemoryRange): Uint32Array {
  const p = r.pages!;
  const copy = new Uint8Array(p.byteLength);
  copy.set(p);
  return new Uint32Array(copy.buffer, 0, p.byteLength / 4);
}

export function tmpName(path: string): string {
  return `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

/** Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory. */
export function writeFileAtomic(path: string, data: Uint8Array): void {
  const tmp = tmpName(path);
  try {
    const fd = openSync(tmp, 'w', 0o600);
    try {
      let off = 0;
      while (off < data.byteLength) off += writeSync(fd, data, off, data.byteLength - off);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
    fsyncDir(dirname(path));
  } catch (e) {
    try { unlinkSync(tmp); } catch { /* already gone */ }
    throw ioErr(e, 'writing snapshot', path);
  }
}

export function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
