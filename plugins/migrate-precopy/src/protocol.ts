import { crc32 } from 'node:zlib';
import type { Socket } from 'node:net';
import { KvmkitError } from '@kvmkit/kernel';

/** Error codes raised by @kvmkit/plugin-migrate-precopy (documented in the README). */
export const MigrateErrorCodes = {
  KVMKIT_ERR_MIGRATE_STREAM: 'the migration stream was cut, closed or timed out',
  KVMKIT_ERR_MIGRATE_PROTOCOL: 'the peer sent something this protocol does not allow (bad magic, version, frame type, length, CRC)',
  KVMKIT_ERR_MIGRATE_REFUSED: 'the destination refused the migration (incompatible host/config) or failed to restore',
  KVMKIT_ERR_MIGRATE_ADDRESS: 'the migration address is invalid or not loopback (without allowRemote)',
  KVMKIT_ERR_MIGRATE_STRATEGY: 'no migration strategy of that name is registered',
  KVMKIT_ERR_MIGRATE_STATE: 'the machine is not running or paused, a migration is already in progress, or the machine stopped during it',
} as const;
export type MigrateErrorCode = keyof typeof MigrateErrorCodes;

export function migErr(code: MigrateErrorCode, message: string, details: Record<string, unknown> = {}, cause?: unknown): KvmkitError {
  return new KvmkitError(code, message, { details, ...(cause === undefined ? {} : { cause }) });
}

export const PROTOCOL = 'kvmkit-migrate';
export const PROTOCOL_VERSION = 1;
/** Every frame: u32 magic | u8 type | 3 bytes 0 | u32 payload length | payload | u32 crc32(header+payload). */
export const FRAME_MAGIC = 0x4d4d564b; // "KVMM" little-endian
export const FRAME_HEADER = 12;
export const MAX_PAYLOAD = 64 * 1024 * 1024;
/** Bytes a sender lets queue in its socket before it waits for 'drain'. */
const QUEUE = 4 * 1024 * 1024;
export const PAGE = 4096;

export const F = {
  HELLO: 1, //     src→dst JSON { protocol, version, config, host, ram, plugins }
  HELLO_OK: 2, //  dst→src JSON {}
  PAGES: 3, //     src→dst u32 range, u32 n, u32 page[n], n×4096 bytes
  ZERO: 4, //      src→dst u32 range, u32 n, u32 page[n] (pages now all zero)
  ROUND: 5, //     src→dst JSON { round, pages }
  STATE: 6, //     src→dst encodeState([...sections])
  END: 7, //       src→dst: nothing more; restore now
  RESTORED: 8, //  dst→src: state restored, vCPUs not started
  COMMIT: 9, //    src→dst: the source is paused for good; start
  RUNNING: 10, //  dst→src: the destination runs; the source stops
  ERROR: 11, //    either way JSON { code, message }
} as const;
export const FRAME_NAMES: Record<number, string> = Object.fromEntries(Object.entries(F).map(([k, v]) => [v, k]));

export interface Frame {
  type: number;
  payload: Buffer;
}

export function encodeFrame(type: number, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const f = allocFrame(type, payload.byteLength);
  f.payload.set(payload);
  return sealFrame(f.frame);
}

/** A frame buffer whose payload the caller fills in place (saves a copy for page data); then sealFrame(). */
export function allocFrame(type: number, payloadLength: number): { frame: Buffer; payload: Buffer } {
  const b = Buffer.allocUnsafe(FRAME_HEADER + payloadLength + 4);
  b.writeUInt32LE(FRAME_MAGIC, 0);
  b.writeUInt32LE(type, 4);
  b.writeUInt32LE(payloadLength, 8);
  return { frame: b, payload: b.subarray(FRAME_HEADER, FRAME_HEADER + payloadLength) };
}

/** Writes the CRC32 trailer of a frame from allocFrame(). */
export function sealFrame(b: Buffer): Buffer {
  const end = b.length - 4;
  b.writeUInt32LE(crc32(b.subarray(0, end)), end);
  return b;
}

/** Frames over a socket: ordered sends with backpressure, receives with timeouts; any failure is coded. */
export class Channel {
  private chunks: Buffer[] = [];
  private have = 0;
  private frames: Frame[] = [];
  private waiter: { res: (f: Frame) => void; rej: (e: Error) => void } | undefined;
  private failure: KvmkitError | undefined;
  bytesSent = 0;
  bytesReceived = 0;

  constructor(readonly socket: Socket, private readonly onFrame?: (f: Frame) => void) {
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (e) => this.fail(migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration stream error: ${e.message}`, { errno: (e as NodeJS.ErrnoException).code }, e)));
    socket.on('close', () => this.fail(migErr('KVMKIT_ERR_MIGRATE_STREAM', 'migration stream closed by the peer')));
    socket.setNoDelay?.(true);
  }

  get closed(): boolean {
    return this.failure !== undefined;
  }

  private fail(e: KvmkitError): void {
    if (this.failure) return;
    this.failure = e;
    this.waiter?.rej(e);
    this.waiter = undefined;
    this.socket.destroy();
  }

  private onData(d: Buffer): void {
    this.bytesReceived += d.length;
    this.chunks.push(d);
    this.have += d.length;
    while (this.have >= FRAME_HEADER) {
      const head = this.peek(FRAME_HEADER);
      if (head.readUInt32LE(0) !== FRAME_MAGIC) return this.fail(migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', 'migration stream: bad frame magic'));
      const len = head.readUInt32LE(8);
      if (len > MAX_PAYLOAD) return this.fail(migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration stream: frame of ${len} bytes exceeds ${MAX_PAYLOAD}`));
      const total = FRAME_HEADER + len + 4;
      if (this.have < total) return;
      const all = this.take(total);
      const crc = all.readUInt32LE(FRAME_HEADER + len);
      if (crc32(all.subarray(0, FRAME_HEADER + len)) !== crc) {
        return this.fail(migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration stream: CRC mismatch in a ${FRAME_NAMES[head.readUInt32LE(4)] ?? '?'} frame`));
      }
      const f: Frame = { type: all.readUInt32LE(4), payload: all.subarray(FRAME_HEADER, FRAME_HEADER + len) };
      try {
        this.onFrame?.(f);
      } catch (e) {
        return this.fail(e instanceof KvmkitError ? e : migErr('KVMKIT_ERR_MIGRATE_STREAM', (e as Error).message, {}, e));
      }
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = undefined;
        w.res(f);
      } else this.frames.push(f);
    }
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!.subarray(0, n);
    return Buffer.concat(this.chunks).subarray(0, n);
  }

  private take(n: number): Buffer {
    if (this.chunks[0]!.length < n) this.chunks = [Buffer.concat(this.chunks)];
    const c = this.chunks[0]!;
    const out = c.subarray(0, n);
    if (c.length === n) this.chunks.shift();
    else this.chunks[0] = c.subarray(n);
    this.have -= n;
    return out;
  }

  /** The next frame; rejects on stream failure or after `timeoutMs`. A peer ERROR frame rejects with its code. */
  async recv(timeoutMs: number, what: string): Promise<Frame> {
    let f = this.frames.shift();
    if (!f) {
      if (this.failure) throw this.failure;
      f = await new Promise<Frame>((res, rej) => {
        const t = setTimeout(() => {
          this.waiter = undefined;
          const e = migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration: timed out after ${timeoutMs} ms waiting for ${what}`, { waitingFor: what });
          this.fail(e);
          rej(e);
        }, timeoutMs);
        this.waiter = { res: (x) => { clearTimeout(t); res(x); }, rej: (e) => { clearTimeout(t); rej(e); } };
      });
    }
    if (f.type === F.ERROR) {
      let o: { code?: string; message?: string } = {};
      try { o = JSON.parse(f.payload.toString('utf8')); } catch { /* keep empty */ }
      throw migErr('KVMKIT_ERR_MIGRATE_REFUSED', `migration peer: ${o.message ?? 'error'}`, { peerCode: o.code });
    }
    return f;
  }

  async expect(type: number, timeoutMs: number): Promise<Frame> {
    const f = await this.recv(timeoutMs, FRAME_NAMES[type]!);
    if (f.type !== type) throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration: expected ${FRAME_NAMES[type]}, got ${FRAME_NAMES[f.type] ?? f.type}`);
    return f;
  }

  /** Sends one frame; resolves when the socket accepted it (waits for 'drain' under backpressure). */
  send(type: number, payload?: Uint8Array): Promise<void> {
    return this.sendFrame(encodeFrame(type, payload));
  }

  /** Sends a sealed frame (allocFrame + sealFrame). */
  async sendFrame(b: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    this.bytesSent += b.length;
    // Keep up to QUEUE bytes queued in the socket: waiting for 'drain' after every frame leaves the socket
    // empty while the next frame is built (both ends then idle half the time).
    if (!this.socket.write(b) && this.socket.writableLength > QUEUE) {
      await new Promise<void>((res, rej) => {
        const onDrain = () => { this.socket.off('close', onClose); res(); };
        const onClose = () => { this.socket.off('drain', onDrain); rej(this.failure ?? migErr('KVMKIT_ERR_MIGRATE_STREAM', 'migration stream closed')); };
        this.socket.once('drain', onDrain);
        this.socket.once('close', onClose);
      });
    }
    if (this.failure) throw this.failure;
  }

  sendJson(type: number, o: unknown): Promise<void> {
    return this.send(type, Buffer.from(JSON.stringify(o), 'utf8'));
  }

  /** Best-effort ERROR frame then close. */
  abort(code: string, message: string): void {
    if (!this.failure) {
      try { this.socket.write(encodeFrame(F.ERROR, Buffer.from(JSON.stringify({ code, message })))); } catch { /* closing anyway */ }
    }
    this.socket.end();
    this.fail(migErr('KVMKIT_ERR_MIGRATE_STREAM', `migration aborted: ${message}`));
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}

export function json<T>(f: Frame): T {
  try {
    return JSON.parse(f.payload.toString('utf8')) as T;
  } catch (e) {
    throw migErr('KVMKIT_ERR_MIGRATE_PROTOCOL', `migration: ${FRAME_NAMES[f.type]} frame is not valid JSON`, {}, e);
  }
}

export type Address = string | { host?: string; port: number };

/** Checks an address: a unix socket path, or TCP on loopback (anything else needs allowRemote). */
export function checkAddress(a: unknown, allowRemote = false): Address {
  if (typeof a === 'string' && a.length > 0) {
    const m = /^(?:tcp:)?\/?\/?([^/:]+|\[[^\]]+\]):(\d+)$/.exec(a);
    if (m && !a.startsWith('/') && !a.startsWith('.')) return checkAddress({ host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) }, allowRemote);
    return a;
  }
  if (a && typeof a === 'object' && Number.isInteger((a as { port: unknown }).port)) {
    const { host = '127.0.0.1', port } = a as { host?: string; port: number };
    if (port < 0 || port > 65535) throw migErr('KVMKIT_ERR_MIGRATE_ADDRESS', `migration: port ${port} is out of range`);
    if (!allowRemote && !['127.0.0.1', 'localhost', '::1'].includes(host) && !host.startsWith('127.')) {
      throw migErr('KVMKIT_ERR_MIGRATE_ADDRESS', `migration: ${host} is not loopback (the stream is not encrypted; pass allowRemote to use it anyway)`, { host });
    }
    return { host, port };
  }
  throw migErr('KVMKIT_ERR_MIGRATE_ADDRESS', `migration: invalid address ${JSON.stringify(a)} (a unix socket path, "host:port" or { host, port })`);
}
