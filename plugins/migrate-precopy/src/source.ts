import { connect as netConnect, type Socket } from 'node:net';
import { KvmkitError, checkOptions, encodeState, type MachineApi, type MemoryRegion, type Strategy } from '@kvmkit/kernel';
import { requireStateful, hostInfo, bitmapPages, type SnapshotApi } from '@kvmkit/plugin-snapshot';
import { Channel, F, PAGE, allocFrame, sealFrame, PROTOCOL, PROTOCOL_VERSION, checkAddress, migErr, type Address } from './protocol.js';

export interface MigrateOptions {
  /** Destination: a unix socket path, "host:port" or { host, port } (loopback only unless allowRemote). */
  to: Address;
  /** Downtime budget: the final (paused) round must fit in this many ms at the measured rate. Default 50. */
  downtimeMs?: number;
  /** Most live rounds (round 0 = all memory) before pausing anyway. Default 30. */
  maxRounds?: number;
  /** How long to wait for each answer of the destination. Default 30000 ms. */
  timeoutMs?: number;
  allowRemote?: boolean;
  /** After success: 'stop' the source (default) or leave it 'pause'd. */
  then?: 'stop' | 'pause';
  onProgress?: (p: { round: number; pages: number; dirty: number; rateMBs: number }) => void;
  /** Tests: cut the stream at this phase ('hello' | 'round0' | 'round' | 'final' | 'commit'). */
  fault?: string;
}

export interface MigrationReport {
  /** connect → destination running, ms */
  totalMs: number;
  /** live rounds (round 0 = the first full pass) before the final paused round */
  rounds: number;
  pagesSent: number;
  /** pages sent as "zero" markers (later rounds) */
  zeroPages: number;
  /** zero pages skipped in round 0 (the destination's fresh RAM is already zero) */
  zeroSkipped: number;
  bytesSent: number;
  /** pages sent while paused */
  finalPages: number;
  /** source paused → destination running, ms */
  downtimeMs: number;
  /** measured send rate, MB/s */
  rateMBs: number;
  stateBytes: number;
  /** Where the downtime went, ms: pausing, final pages, saving + sending state, destination restore (END → RESTORED), commit (COMMIT → RUNNING). */
  phases: { pause: number; finalPages: number; state: number; restore: number; commit: number };
}

/** Pages per PAGES frame (1 MiB of data: 4 MiB frames measured slower at the destination). */
const BATCH = 256;
const ZERO_PAGE = Buffer.alloc(PAGE);

/** A Buffer view of a region's RAM, made once per region (per-page views would allocate per page). */
const views = new WeakMap<Uint8Array, Buffer>();
function ramView(r: MemoryRegion): Buffer {
  let v = views.get(r.bytes);
  if (!v) views.set(r.bytes, (v = Buffer.from(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength)));
  return v;
}

class Sender {
  pagesSent = 0;
  zeroPages = 0;
  zeroSkipped = 0;
  sendMs = 0;
  dataBytes = 0;
  /** `alive()`: false once the machine is stopping (its RAM may be unmapped after the next await). */
  constructor(private readonly ch: Channel, private readonly alive: () => boolean = () => true) {}

  private check(): void {
    if (!this.alive()) throw migErr('KVMKIT_ERR_MIGRATE_STATE', 'migrate: the machine stopped during the migration');
  }

  /** Sends `pages` of region `ri`; zero pages are skipped (round 0) or sent as ZERO markers. */
  async send(ri: number, r: MemoryRegion, pages: Iterable<number>, skipZero: boolean): Promise<void> {
    this.check();
    const ram = ramView(r);
    const data = new Uint32Array(BATCH);
    let nd = 0;
    let zero: number[] = [];
    const flushData = async () => {
      if (nd === 0) return;
      const tf = performance.now();
      const n = nd;
      const { frame, payload: b } = allocFrame(F.PAGES, 8 + 4 * n + PAGE * n);
      b.writeUInt32LE(ri, 0);
      b.writeUInt32LE(n, 4);
      new Uint8Array(b.buffer, b.byteOffset + 8, 4 * n).set(new Uint8Array(data.buffer, 0, 4 * n)); // u32 LE (x86 host)
      // consecutive pages are copied as one run
      const base = 8 + 4 * n;
      for (let k = 0; k < n; ) {
        let j = k + 1;
        while (j < n && data[j] === data[j - 1]! + 1) j++;
        ram.copy(b, base + PAGE * k, data[k]! * PAGE, (data[j - 1]! + 1) * PAGE);
        k = j;
      }
      this.pagesSent += n;
      this.dataBytes += b.length;
      nd = 0;
      await this.ch.sendFrame(sealFrame(frame));
      this.sendMs += performance.now() - tf;
    };
    const flushZero = async () => {
      if (zero.length === 0) return;
      const b = Buffer.allocUnsafe(8 + 4 * zero.length);
      b.writeUInt32LE(ri, 0);
      b.writeUInt32LE(zero.length, 4);
      zero.forEach((p, k) => b.writeUInt32LE(p, 8 + 4 * k));
      this.zeroPages += zero.length;
      zero = [];
      await this.ch.send(F.ZERO, b);
    };
    for (const p of pages) {
      if (ZERO_PAGE.compare(ram, p * PAGE, (p + 1) * PAGE) === 0) {
        if (skipZero) this.zeroSkipped++;
        else {
          zero.push(p);
          if (zero.length >= 4096) {
            await flushZero();
            this.check();
          }
        }
        continue;
      }
      data[nd++] = p;
      if (nd >= BATCH) {
        await flushData();
        this.check(); // RAM is touched again below: only while the machine is not stopping
      }
    }
    await flushData();
    await flushZero();
  }

  /** bytes per ms spent building and sending page frames (0 until 1 MiB was measured) */
  rate(): number {
    return this.dataBytes >= 1 << 20 && this.sendMs > 0 ? this.dataBytes / this.sendMs : 0;
  }
}

function connect(to: Address, timeoutMs: number): Promise<Socket> {
  return new Promise((res, rej) => {
    const s = typeof to === 'string' ? netConnect(to) : netConnect(to.port, to.host);
    const t = setTimeout(() => { s.destroy(); rej(migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration: connecting to ${JSON.stringify(to)} timed out`)); }, timeoutMs);
    s.once('connect', () => { clearTimeout(t); s.removeAllListeners('error'); res(s); });
    s.once('error', (e) => { clearTimeout(t); rej(migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration: cannot connect to ${JSON.stringify(to)}: ${e.message}`, { errno: (e as NodeJS.ErrnoException).code }, e)); });
  });
}

const busy = new WeakSet<object>();

/** Pre-copy live migration of `m0` (a StatefulMachine) to a waiting destination (receiveMigration). */
export async function runPrecopy(m0: MachineApi, raw: unknown): Promise<MigrationReport> {
  const m = requireStateful(m0);
  const o = checkOptions('migrate', raw, { downtimeMs: { type: 'number' }, maxRounds: { type: 'integer' }, timeoutMs: { type: 'integer' }, allowRemote: { type: 'boolean' }, then: { type: ['stop', 'pause'] }, fault: { type: 'string' } }, true) as unknown as MigrateOptions;
  const to = checkAddress(o.to, o.allowRemote);
  const downtime = o.downtimeMs ?? 50;
  const maxRounds = o.maxRounds ?? 30;
  const timeout = o.timeoutMs ?? 30_000;
  const wasRunning = m.state === 'running';
  if (!wasRunning && m.state !== 'paused') throw migErr('KVMKIT_ERR_MIGRATE_STATE', `migrate: machine is ${m.state}`);
  if (busy.has(m.memory!)) throw migErr('KVMKIT_ERR_MIGRATE_STATE', 'migrate: a migration of this machine is already in progress');
  busy.add(m.memory!);
  const t0 = performance.now();
  const vm = m.vm!;
  const regions = m.memory!.regions;
  const snap = m.use<SnapshotApi>('snapshot');
  const fault = (phase: string) => {
    if (o.fault === phase) ch?.socket.destroy();
  };
  let ch: Channel | undefined;
  let logging = false;
  let pausedHere = false;
  const readDirty = (): number[][] =>
    regions.map((r) => {
      const bm = vm.getDirtyLog(r.slot);
      snap?.noteDirty(r.slot, bm);
      return bitmapPages(bm, r.size / PAGE);
    });
  try {
    ch = new Channel(await connect(to, timeout));
    await ch.sendJson(F.HELLO, {
      protocol: PROTOCOL, version: PROTOCOL_VERSION,
      config: { name: m.config.name, memory: m.config.memory, cpus: m.config.cpus },
      plugins: m.plugins, host: hostInfo(),
      ram: regions.map((r) => ({ gpa: r.gpa.toString(), size: r.size })),
    });
    fault('hello');
    await ch.expect(F.HELLO_OK, timeout);
    for (const r of regions) if (!snap?.logging()) vm.setDirtyLogging(r.slot, true);
    logging = true;
    readDirty(); // start of round 0: everything from here on is re-sent if written
    const s = new Sender(ch, () => m.state !== 'stopping' && m.state !== 'stopped');
    for (const [i, r] of regions.entries()) await s.send(i, r, range(r.size / PAGE), true);
    fault('round0');
    let rounds = 1;
    let carry: number[][];
    for (;;) {
      carry = readDirty();
      // Test fault 'round': cut during the live rounds, whether or not the guest dirtied anything (an idle or
      // descheduled guest may end round 0 with no dirty page, which used to skip the cut).
      if (rounds === 1) fault('round');
      const dirty = carry.reduce((a, l) => a + l.length, 0);
      const rate = s.rate() || 100_000; // bytes/ms; 100 MB/s until measured
      o.onProgress?.({ round: rounds, pages: s.pagesSent, dirty, rateMBs: rate / 1000 });
      if ((dirty * PAGE) / rate <= downtime || rounds >= maxRounds) break;
      for (const [i, r] of regions.entries()) await s.send(i, r, carry[i]!, false);
      await ch.sendJson(F.ROUND, { round: rounds, pages: dirty });
      rounds++;
    }
    const tPause = performance.now();
    if (wasRunning) {
      await m.pause();
      pausedHere = true;
    }
    const t1 = performance.now();
    const last = readDirty();
    const before = s.pagesSent + s.zeroPages;
    for (const [i, r] of regions.entries()) await s.send(i, r, new Set([...carry[i]!, ...last[i]!]), false);
    const finalPages = s.pagesSent + s.zeroPages - before;
    fault('final');
    const t2 = performance.now();
    const sections = await m.saveState();
    const state = Buffer.from(encodeState([...sections.entries()]), 'utf8');
    await ch.send(F.STATE, state);
    await ch.send(F.END);
    const t3 = performance.now();
    await ch.expect(F.RESTORED, timeout);
    const t4 = performance.now();
    fault('commit');
    await ch.send(F.COMMIT);
    await ch.expect(F.RUNNING, timeout);
    const t5 = performance.now();
    const downtimeMs = t5 - tPause;
    const phases = { pause: t1 - tPause, finalPages: t2 - t1, state: t3 - t2, restore: t4 - t3, commit: t5 - t4 };
    const report: MigrationReport = {
      totalMs: performance.now() - t0, rounds, pagesSent: s.pagesSent, zeroPages: s.zeroPages, zeroSkipped: s.zeroSkipped,
      bytesSent: ch.bytesSent, finalPages, downtimeMs, rateMBs: s.rate() / 1000, stateBytes: state.length, phases,
    };
    ch.close();
    m.log.info({ ...report, to }, 'migrated');
    if (o.then !== 'pause') {
      m.requestStop({ reason: 'user', exitCode: 0, message: `migrated to ${typeof to === 'string' ? to : `${to.host}:${to.port}`}` });
      await m.stop();
    }
    return report;
  } catch (e) {
    // Leave the source as it was: resumed if we paused it, dirty logging as before, stream gone.
    ch?.abort((e as KvmkitError).code ?? 'KVMKIT_ERR_MIGRATE_STREAM', (e as Error).message);
    if (logging && !snap?.logging()) for (const r of regions) { try { vm.setDirtyLogging(r.slot, false); } catch { /* stopped */ } }
    if (pausedHere && m.state === 'paused') await m.resume();
    m.log.warn({ err: (e as Error).message }, 'migration failed; the source keeps running');
    throw e instanceof KvmkitError ? e : migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration failed: ${(e as Error).message}`, {}, e);
  } finally {
    busy.delete(m.memory!);
  }
}

function* range(n: number): Generator<number> {
  for (let i = 0; i < n; i++) yield i;
}

export function precopyStrategy(): Strategy {
  return { name: 'precopy', description: 'pre-copy live migration over a unix socket or loopback TCP', run: (m, o) => runPrecopy(m, o) };
}
