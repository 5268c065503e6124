import { createServer, connect, type Server, type Socket } from 'node:net';
import { mkdirSync, chmodSync, unlinkSync, existsSync, lstatSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { KvmkitError, type Machine, type MachineApi, type Logger } from '@kvmkit/kernel';
import { ctlErr, toLine, lineSplitter, type ControlRequest, type ControlResponse } from './protocol.js';

/** Default control socket: `$XDG_RUNTIME_DIR/kvmkit/<vm>.sock`, else `/run/kvmkit/<vm>.sock`. */
export function controlSocketPath(vm: string, env: NodeJS.ProcessEnv = process.env): string {
  if (!/^[A-Za-z0-9._-]+$/.test(vm)) throw new KvmkitError('KVMKIT_ERR_CONFIG', `VM name ${JSON.stringify(vm)} cannot name a control socket (use letters, digits, . _ -)`);
  const base = env.XDG_RUNTIME_DIR ? join(env.XDG_RUNTIME_DIR, 'kvmkit') : '/run/kvmkit';
  return join(base, `${vm}.sock`);
}

export interface ControlOptions {
  /** Socket path (default controlSocketPath(machine.config.name)). */
  path?: string;
  log?: Logger;
  /** Extra methods: name → handler(params) (e.g. device-specific commands). */
  methods?: Record<string, (params: Record<string, unknown>) => unknown>;
}

export interface ControlServer {
  readonly path: string;
  close(): Promise<void>;
}

/** The view strategies run against: the machine API (state save/restore, plugins, stop). */
function stateful(machine: Machine): MachineApi {
  return machine.api;
}

/** Is a live process listening on `path`? */
function probe(path: string): Promise<boolean> {
  return new Promise((res) => {
    const s = connect(path);
    s.once('connect', () => { s.destroy(); res(true); });
    s.once('error', () => res(false));
  });
}

/**
 * Serves a JSON-lines RPC on a unix socket (mode 0600, directory 0700) for a running machine:
 * status, pause, resume, stop, snapshot {strategy, path, then}, migrate {to, strategy, downtimeMs, maxRounds}.
 * The server closes itself (and removes the socket) when the machine stops.
 */
export async function serveControl(machine: Machine, opts: ControlOptions = {}): Promise<ControlServer> {
  const path = opts.path ?? controlSocketPath(machine.config.name);
  const log = opts.log ?? machine.log.child({ plugin: 'control' });
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  if (existsSync(path)) {
    if (!lstatSync(path).isSocket()) throw ctlErr('KVMKIT_ERR_CONTROL_IN_USE', `${path} exists and is not a socket`, { path });
    if (await probe(path)) throw ctlErr('KVMKIT_ERR_CONTROL_IN_USE', `${path} is served by another live process`, { path });
    unlinkSync(path); // stale, from a process that died
  }
  const t0 = Date.now();
  let busy: string | undefined;
  const sockets = new Set<Socket>();

  const methods: Record<string, (p: Record<string, unknown>) => unknown> = {
    status: () => ({
      name: machine.config.name,
      state: machine.state,
      memoryMiB: machine.config.memory,
      cpus: machine.config.cpus,
      pid: process.pid,
      uptimeMs: Date.now() - t0,
      busy: busy ?? null,
      plugins: machine.pluginHost.list().map((p) => ({ name: p.name, version: p.version })),
      strategies: machine.api.strategies(),
    }),
    pause: async () => { await machine.pause(); return { state: machine.state }; },
    resume: async () => { await machine.resume(); return { state: machine.state }; },
    stop: async () => {
      machine.requestStop({ reason: 'user', exitCode: 0, message: 'stopped through the control socket' });
      await machine.stop();
      return { state: machine.state };
    },
    snapshot: (p) => exclusive('snapshot', async () => {
      const { strategy = 'full', ...rest } = p as { strategy?: string };
      const s = machine.hooks.snapshotStrategy.get(String(strategy))?.call();
      if (!s) throw new KvmkitError('KVMKIT_ERR_SNAPSHOT_STRATEGY', `no snapshot strategy named '${strategy}' is registered`, { details: { strategy } });
      return s.run(stateful(machine), rest);
    }),
    migrate: (p) => exclusive('migrate', async () => {
      const { strategy = 'precopy', ...rest } = p as { strategy?: string };
      const s = machine.hooks.migrationStrategy.get(String(strategy))?.call();
      if (!s) throw new KvmkitError('KVMKIT_ERR_MIGRATE_STRATEGY', `no migration strategy named '${strategy}' is registered`, { details: { strategy } });
      return s.run(stateful(machine), rest);
    }),
    ...opts.methods,
  };

  async function exclusive<T>(what: string, f: () => Promise<T>): Promise<T> {
    if (busy) throw ctlErr('KVMKIT_ERR_CONTROL_BUSY', `a ${busy} is running on this VM`, { running: busy });
    busy = what;
    try {
      return await f();
    } finally {
      busy = undefined;
    }
  }

  async function handle(line: string, sock: Socket): Promise<void> {
    let req: ControlRequest;
    const reply = (r: ControlResponse) => { if (!sock.destroyed) sock.write(toLine(r)); };
    try {
      req = JSON.parse(line) as ControlRequest;
      if (!req || typeof req !== 'object' || typeof req.method !== 'string' || (typeof req.id !== 'number' && typeof req.id !== 'string')) throw new Error('need {id, method, params?}');
      if (req.params !== undefined && (typeof req.params !== 'object' || req.params === null || Array.isArray(req.params))) throw new Error('params must be an object');
    } catch (e) {
      reply({ id: null, error: { code: 'KVMKIT_ERR_CONTROL_REQUEST', message: `bad request: ${(e as Error).message}` } });
      return;
    }
    const fn = Object.prototype.hasOwnProperty.call(methods, req.method) ? methods[req.method] : undefined;
    if (!fn) {
      reply({ id: req.id, error: { code: 'KVMKIT_ERR_CONTROL_METHOD', message: `unknown method ${req.method} (known: ${Object.keys(methods).join(', ')})` } });
      return;
    }
    const done = (async () => {
      try {
        log.debug({ method: req.method }, 'control request');
        const result = await fn(req.params ?? {});
        reply({ id: req.id, result: result ?? null });
      } catch (e) {
        const err = e as KvmkitError;
        reply({ id: req.id, error: { code: typeof err.code === 'string' ? err.code : 'KVMKIT_ERR_CONTROL_REQUEST', message: err.message ?? String(e), ...(err.details ? { details: err.details } : {}) } });
      }
    })();
    inflight.add(done);
    await done;
    inflight.delete(done);
  }
  /** Requests being answered: close() lets them reply first (a migration's report comes after its VM stopped). */
  const inflight = new Set<Promise<void>>();

  const server: Server = createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => sock.destroy());
    sock.on('data', lineSplitter((l) => void handle(l, sock), () => {
      sock.end(toLine({ id: null, error: { code: 'KVMKIT_ERR_CONTROL_REQUEST', message: 'request line too long' } }));
    }));
  });
  const oldMask = process.umask(0o177);
  try {
    await new Promise<void>((res, rej) => {
      server.once('error', rej);
      server.listen(path, () => { server.off('error', rej); res(); });
    });
  } finally {
    process.umask(oldMask);
  }
  chmodSync(path, 0o600);
  log.info({ path }, 'control socket listening');

  let closed: Promise<void> | undefined;
  const close = () => {
    if (!closed) {
      closed = Promise.race([Promise.allSettled([...inflight]), new Promise((r) => setTimeout(r, 10_000).unref())]).then(() => new Promise<void>((res) => {
        server.close(() => res());
        for (const s of sockets) s.end();
        setTimeout(() => { for (const s of sockets) s.destroy(); }, 500).unref();
      })).then(() => { try { unlinkSync(path); } catch { /* gone */ } });
    }
    return closed;
  };
  void machine.waitForStop().then(() => setTimeout(() => void close(), 50));
  return { path, close };
}
