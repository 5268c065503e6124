import { createServer, type Server, type Socket, type AddressInfo } from 'node:net';
import { chmodSync, unlinkSync, existsSync } from 'node:fs';
import { Machine, KvmkitError, decodeState, type MachineConfig, type Plugin, type Logger, type StateSection } from '@kvmkit/kernel';
import { hostInfo } from '@kvmkit/plugin-snapshot';
import { Channel, F, PAGE, PROTOCOL, PROTOCOL_VERSION, checkAddress, json, migErr, FRAME_NAMES, type Address, type Frame } from './protocol.js';

export interface ReceiveOptions {
  /** Where to listen: a unix socket path (created 0600) or { host, port } / "host:port" (port 0 = any). */
  listen: Address;
  config: MachineConfig;
  /** The machine's plugins (same devices as the source; no boot plugin needed). */
  plugins?: Plugin[];
  log?: Logger;
  kvmPath?: string;
  /** Wait per frame. Default 30000 ms. */
  timeoutMs?: number;
  /** Wait for the source to connect (0 = forever, default). */
  acceptTimeoutMs?: number;
  allowRemote?: boolean;
  /** Called once listening, with the bound address (path, or { host, port }). */
  onListening?: (a: Address) => void;
  /** Tests: called for every frame received. */
  onFrame?: (type: string) => void;
}

export interface ReceiveReport {
  pages: number;
  zeroPages: number;
  rounds: number;
  bytes: number;
  /** accept → running, ms */
  totalMs: number;
}

interface Hello {
  protocol: string;
  version: number;
  config: { name: string; memory: number; cpus: number };
  plugins: Array<{ name: string; version: string }>;
  host: ReturnType<typeof hostInfo>;
  ram: Array<{ gpa: string; size: number }>;
}

function listen(o: ReceiveOptions): Promise<{ server: Server; address: Address }> {
  const a = checkAddress(o.listen, o.allowRemote);
  return new Promise((res, rej) => {
    const server = createServer({ pauseOnConnect: false });
    server.once('error', (e) => rej(migErr('KVMKIT_ERR_MIGRATE_ADDRESS', `migration: cannot listen on ${JSON.stringify(a)}: ${e.message}`, {}, e)));
    const done = () => {
      server.removeAllListeners('error');
      if (typeof a === 'string') {
        chmodSync(a, 0o600);
        res({ server, address: a });
      } else res({ server, address: { host: a.host, port: (server.address() as AddressInfo).port } });
    };
    if (typeof a === 'string') {
      if (existsSync(a)) unlinkSync(a); // a stale socket from a crashed run
      server.listen(a, done);
    } else server.listen(a.port, a.host, done);
  });
}

function accept(server: Server, timeoutMs: number): Promise<Socket> {
  return new Promise((res, rej) => {
    const t = timeoutMs > 0 ? setTimeout(() => rej(migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration: no source connected within ${timeoutMs} ms`)), timeoutMs) : undefined;
    server.once('connection', (s) => { if (t) clearTimeout(t); res(s); });
  });
}

/**
 * The destination side: listens, accepts one source, builds a Machine (config + plugins) whose RAM and state
 * come from the stream, starts it when the source commits, and resolves with it. Any failure (stream cut,
 * source crash, bad frame, restore error) releases the machine, closes the socket and rejects; the source
 * then keeps running.
 */
export async function receiveMigration(o: ReceiveOptions): Promise<{ machine: Machine; report: ReceiveReport }> {
  const timeout = o.timeoutMs ?? 30_000;
  const { server, address } = await listen(o);
  let sock: Socket;
  try {
    o.onListening?.(address);
    sock = await accept(server, o.acceptTimeoutMs ?? 0);
  } finally {
    server.close();
    if (typeof address === 'string') { try { unlinkSync(address); } catch { /* gone */ } }
  }
  const t0 = performance.now();
  const ch = new Channel(sock, (f: Frame) => o.onFrame?.(FRAME_NAMES[f.type] ?? String(f.type)));
  const report: ReceiveReport = { pages: 0, zeroPages: 0, rounds: 0, bytes: 0, totalMs: 0 };
  let machine: Machine | undefined;
  try {
    const hello = json<Hello>(await ch.expect(F.HELLO, timeout));
    if (hello.protocol !== PROTOCOL || hello.version !== PROTOCOL_VERSION) {
      throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration: source speaks ${hello.protocol} v${hello.version}, this destination ${PROTOCOL} v${PROTOCOL_VERSION}`);
    }
    const here = hostInfo(o.kvmPath);
    for (const k of ['arch', 'cpuVendor', 'cpuFamily', 'cpuModel'] as const) {
      if (hello.host?.[k] !== here[k]) throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', `migration: source host has ${k} ${JSON.stringify(hello.host?.[k])}, this host ${JSON.stringify(here[k])}`, { what: k });
    }
    if (hello.config.memory !== o.config.memory) throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', `migration: source has ${hello.config.memory} MiB, this machine ${o.config.memory} MiB`, { what: 'memory' });
    if (hello.config.cpus !== o.config.cpus) throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', `migration: source has ${hello.config.cpus} vCPUs, this machine ${o.config.cpus}`, { what: 'cpus' });
    // The machine starts with its vCPUs parked in a spin loop and is paused at once: worker threads are up
    // before any page arrives, so the downtime does not include starting them.
    const m: Machine = (machine = new Machine({
      config: o.config, plugins: [parking(), ...(o.plugins ?? [])],
      ...(o.log ? { log: o.log } : {}), ...(o.kvmPath ? { kvmPath: o.kvmPath } : {}),
    }));
    await m.start();
    await m.pause();
    const st = await receiveInto(ch, m, hello, report, timeout);
    await m.restoreState(st);
    await ch.send(F.RESTORED);
    await ch.expect(F.COMMIT, timeout);
    await m.resume();
    await ch.send(F.RUNNING);
    report.bytes = ch.bytesReceived;
    report.totalMs = performance.now() - t0;
    m.log.info(report, 'migration received; running');
    ch.close();
    return { machine: m, report };
  } catch (e) {
    const err = e instanceof KvmkitError ? e : migErr('KVMKIT_ERR_MIGRATE_STREAM', (e as Error).message, {}, e);
    ch.abort(err.code, err.message);
    if (machine && machine.state !== 'stopped') await machine.stop();
    throw err;
  }
}

const SPIN_GPA = 0x7000;

/**
 * The destination's boot plugin: no loader; every vCPU starts in real mode on a `jmp $` at 0x7000 (overwritten
 * by the incoming RAM while the machine is paused; the incoming state then replaces every register).
 */
function parking(): Plugin {
  return {
    name: 'migrate-incoming',
    version: '0.1.0',
    kernel: '^0.1.0',
    apply(m) {
      m.hooks.boot.tapPromise({ name: 'migrate-incoming', stage: -100 }, async (ctx) => {
        ctx.memory.write(SPIN_GPA, new Uint8Array([0xeb, 0xfe]));
        const cs = { base: 0n, limit: 0xffff, selector: 0, type: 0xb, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 };
        return { loader: 'migration', vcpus: Array.from({ length: ctx.cpus }, () => ({ regs: { rip: BigInt(SPIN_GPA), rflags: 2n }, sregs: { cs } })) };
      });
    },
  };
}

/** Receives RAM pages until END; returns the STATE frame's sections. */
async function receiveInto(ch: Channel, machine: Machine, hello: Hello, report: ReceiveReport, timeout: number): Promise<Map<string, StateSection>> {
  const regions = machine.memory!.regions;
  if (regions.length !== hello.ram.length || regions.some((r, i) => r.gpa.toString() !== hello.ram[i]!.gpa || r.size !== hello.ram[i]!.size)) {
    throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', 'migration: RAM layout differs from the source', { source: hello.ram });
  }
  await ch.send(F.HELLO_OK);
  let st: Map<string, StateSection> | undefined;
  const bad = (what: string) => migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration: malformed ${what} frame`);
  for (;;) {
    const f = await ch.recv(timeout, 'pages or state');
    if (f.type === F.PAGES || f.type === F.ZERO) {
      const p = f.payload;
      if (p.length < 8) throw bad('page');
      const ri = p.readUInt32LE(0);
      const n = p.readUInt32LE(4);
      const r = regions[ri];
      const want = 8 + 4 * n + (f.type === F.PAGES ? PAGE * n : 0);
      if (!r || p.length !== want) throw bad('page');
      const max = r.size / PAGE;
      const idx = new Uint32Array(n);
      for (let k = 0; k < n; k++) {
        const pg = p.readUInt32LE(8 + 4 * k);
        if (pg >= max) throw bad('page (index out of range)');
        idx[k] = pg;
      }
      // consecutive pages (all of round 0) go in as one run
      const base = 8 + 4 * n;
      for (let k = 0; k < n; ) {
        let j = k + 1;
        while (j < n && idx[j] === idx[j - 1]! + 1) j++;
        const at = idx[k]! * PAGE;
        if (f.type === F.PAGES) r.bytes.set(p.subarray(base + PAGE * k, base + PAGE * j), at);
        else r.bytes.fill(0, at, at + PAGE * (j - k));
        k = j;
      }
      if (f.type === F.PAGES) report.pages += n;
      else report.zeroPages += n;
    } else if (f.type === F.ROUND) report.rounds++;
    else if (f.type === F.STATE) {
      let entries: unknown;
      try {
        entries = decodeState(f.payload.toString('utf8'));
      } catch (e) {
        throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', 'migration: STATE frame is not valid state JSON', {}, e);
      }
      if (!Array.isArray(entries)) throw bad('state');
      st = new Map(entries as Array<[string, StateSection]>);
      const have = new Set(machine.pluginHost.list().map((x) => x.name));
      for (const name of st.keys()) {
        if (name !== 'kernel' && !have.has(name)) throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', `migration: the source has state of plugin '${name}', which this machine does not load`, { plugin: name });
      }
    } else if (f.type === F.END) break;
    else throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration: unexpected ${FRAME_NAMES[f.type] ?? f.type} frame`);
  }
  if (!st) throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', 'migration: END before STATE');
  return st;
}
