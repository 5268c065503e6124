import { KvmkitError } from './errors.js';

/**
 * Saved state is a map of named sections; each section is a versioned plain object (JSON-safe, with
 * bigint and Uint8Array encoded by the writer). Plugins write their section in `saveState` and read it in
 * `restoreState`.
 */
export interface StateSection {
  version: number;
  data: unknown;
}

export class StateWriter {
  readonly sections = new Map<string, StateSection>();
  write(name: string, version: number, data: unknown): void {
    if (this.sections.has(name)) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `state section ${name} written twice`);
    this.sections.set(name, { version, data });
  }
}

export class StateReader {
  constructor(readonly sections: ReadonlyMap<string, StateSection>) {}
  has(name: string): boolean {
    return this.sections.has(name);
  }
  /** The section's data; throws KVMKIT_ERR_STATE_FORMAT when missing or of an unsupported version. */
  read<T = unknown>(name: string, supportedVersions: number[] | number): T {
    const s = this.sections.get(name);
    const vs = Array.isArray(supportedVersions) ? supportedVersions : [supportedVersions];
    if (!s) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `state section ${name} is missing`, { details: { section: name } });
    if (!vs.includes(s.version)) {
      throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `state section ${name} has version ${s.version}; supported: ${vs.join(', ')}`, {
        details: { section: name, version: s.version },
      });
    }
    return s.data as T;
  }
}

/** JSON encoding that keeps bigint and Uint8Array (as {$big} / {$b64}). */
export function encodeState(v: unknown): string {
  return JSON.stringify(v, (_k, x) => {
    if (typeof x === 'bigint') return { $big: x.toString() };
    if (x instanceof Uint8Array) return { $b64: Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString('base64') };
    return x;
  });
}

export function decodeState(s: string): unknown {
  return JSON.parse(s, (_k, x) => {
    if (x && typeof x === 'object' && !Array.isArray(x)) {
      const keys = Object.keys(x);
      if (keys.length === 1 && keys[0] === '$big' && typeof x.$big === 'string') return BigInt(x.$big);
      if (keys.length === 1 && keys[0] === '$b64' && typeof x.$b64 === 'string') return new Uint8Array(Buffer.from(x.$b64, 'base64'));
    }
    return x;
  });
}
