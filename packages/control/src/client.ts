import { connect, type Socket } from 'node:net';
import { KvmkitError } from '@kvmkit/kernel';
import { ctlErr, toLine, lineSplitter, type ControlResponse } from './protocol.js';

export interface ControlStatus {
  name: string;
  state: string;
  memoryMiB: number;
  cpus: number;
  pid: number;
  uptimeMs: number;
  busy: string | null;
  plugins: Array<{ name: string; version: string }>;
  strategies: { snapshot: string[]; migration: string[] };
}

/** A connection to a VM's control socket. Calls may overlap; answers are matched by id. */
export class ControlClient {
  private nextId = 1;
  private readonly pending = new Map<number, { res: (v: unknown) => void; rej: (e: Error) => void; timer?: NodeJS.Timeout }>();
  private closedErr: KvmkitError | undefined;

  constructor(private readonly sock: Socket, readonly path: string) {
    sock.on('data', lineSplitter((l) => this.onLine(l), () => this.failAll(ctlErr('KVMKIT_ERR_CONTROL_REQUEST', 'answer line too long'))));
    sock.on('close', () => this.failAll(ctlErr('KVMKIT_ERR_CONTROL_CLOSED', `control connection to ${path} closed`)));
    sock.on('error', (e) => this.failAll(ctlErr('KVMKIT_ERR_CONTROL_CLOSED', `control connection to ${path}: ${e.message}`, {}, e)));
  }

  private onLine(l: string): void {
    let r: ControlResponse;
    try {
      r = JSON.parse(l) as ControlResponse;
    } catch {
      return;
    }
    const p = typeof r.id === 'number' ? this.pending.get(r.id) : undefined;
    if (!p) return;
    this.pending.delete(r.id as number);
    if (p.timer) clearTimeout(p.timer);
    if (r.error) p.rej(new KvmkitError(r.error.code as `KVMKIT_ERR_${string}`, r.error.message, { details: r.error.details ?? {} }));
    else p.res(r.result);
  }

  private failAll(e: KvmkitError): void {
    this.closedErr ??= e;
    for (const [id, p] of this.pending) {
      if (p.timer) clearTimeout(p.timer);
      p.rej(e);
      this.pending.delete(id);
    }
  }

  /** Calls a method; rejects with the server's coded error, or CLOSED/TIMEOUT. timeoutMs 0 = none (default). */
  call<T = unknown>(method: string, params: Record<string, unknown> = {}, timeoutMs = 0): Promise<T> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const id = this.nextId++;
    return new Promise<T>((res, rej) => {
      const entry: { res: (v: unknown) => void; rej: (e: Error) => void; timer?: NodeJS.Timeout } = { res: res as (v: unknown) => void, rej };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.pending.delete(id);
          rej(ctlErr('KVMKIT_ERR_CONTROL_TIMEOUT', `${method}: no answer within ${timeoutMs} ms`, { method }));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      this.sock.write(toLine({ id, method, params }));
    });
  }

  status(): Promise<ControlStatus> { return this.call('status'); }
  pause(): Promise<{ state: string }> { return this.call('pause'); }
  resume(): Promise<{ state: string }> { return this.call('resume'); }
  stop(): Promise<{ state: string }> { return this.call('stop'); }
  /** → the strategy's result (SnapshotResult for 'full'/'diff'). */
  snapshot(params: { path: string; strategy?: string; then?: 'resume' | 'pause' | 'stop' }): Promise<Record<string, unknown>> { return this.call('snapshot', params); }
  /** → the strategy's report (MigrationReport for 'precopy'). */
  migrate(params: { to: string | { host?: string; port: number }; strategy?: string; downtimeMs?: number; maxRounds?: number }): Promise<Record<string, unknown>> { return this.call('migrate', params); }

  close(): void {
    this.sock.end();
  }
}

/** Connects to a control socket (e.g. controlSocketPath('vm1')). */
export function connectControl(path: string, timeoutMs = 5000): Promise<ControlClient> {
  return new Promise((res, rej) => {
    const s = connect(path);
    const t = setTimeout(() => { s.destroy(); rej(ctlErr('KVMKIT_ERR_CONTROL_CONNECT', `connecting to ${path} timed out`, { path })); }, timeoutMs);
    s.once('connect', () => { clearTimeout(t); s.removeAllListeners('error'); res(new ControlClient(s, path)); });
    s.once('error', (e) => {
      clearTimeout(t);
      const code = (e as NodeJS.ErrnoException).code;
      rej(ctlErr('KVMKIT_ERR_CONTROL_CONNECT', `cannot connect to ${path}: ${code === 'ENOENT' || code === 'ECONNREFUSED' ? 'no VM is serving it' : e.message}`, { path, errno: code }, e));
    });
  });
}
