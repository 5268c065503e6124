import { readFileSync } from 'node:fs';
import { KvmkitError, checkOptions, type Plugin } from '@kvmkit/kernel';
import { writeFlatTables, flatVcpuState, FLAT } from './layout.js';

export { FLAT, GDT_ENTRIES, writeFlatTables, flatVcpuState } from './layout.js';

export interface BootFlatOptions {
  /** The guest code: a file path or the bytes. Loaded at 0x100000 and entered there by every vCPU. */
  image: string | Uint8Array;
  /** Privilege level the vCPUs start in (3 = user mode with IOPL 3). Default 0. */
  ring?: 0 | 3;
  /** Value for RDX at entry. */
  arg?: number | bigint;
}

/** Boots a flat 64-bit binary on every vCPU (long mode, identity-mapped 4 GiB). Provides 'firmware'. */
export default function bootFlat(options: BootFlatOptions): Plugin {
  return {
    name: 'boot-flat',
    version: '0.1.0',
    kernel: '^0.1.0',
    provides: ['firmware'],
    options,
    validateOptions(o) {
      const { image, arg, ...rest } = (o ?? {}) as Record<string, unknown>;
      checkOptions('boot-flat', rest, { ring: { type: [0, 3] } });
      const x = { image, arg };
      if (typeof x.image !== 'string' && !(x.image instanceof Uint8Array)) {
        throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'boot-flat: option image must be a file path or a Uint8Array', { details: { key: 'image' } });
      }
      if (x.arg !== undefined && typeof x.arg !== 'number' && typeof x.arg !== 'bigint') {
        throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'boot-flat: option arg must be a number or bigint', { details: { key: 'arg' } });
      }
    },
    apply(machine, { log }) {
      machine.hooks.boot.tapPromise('boot-flat', async (ctx) => {
        let image: Uint8Array;
        if (typeof options.image === 'string') {
          try {
            image = readFileSync(options.image);
          } catch (e) {
            throw new KvmkitError('KVMKIT_ERR_IMAGE', `boot-flat: cannot read ${options.image}: ${(e as Error).message}`, { cause: e, details: { path: options.image } });
          }
        } else image = options.image;
        writeFlatTables(ctx.memory, image);
        const ring = options.ring ?? 0;
        log.debug({ bytes: image.byteLength, ring, entry: `0x${FLAT.loadAddress.toString(16)}` }, 'flat image loaded');
        const vcpus = Array.from({ length: ctx.cpus }, (_, i) => flatVcpuState(i, ctx.cpus, ring, BigInt(options.arg ?? 0)));
        return { loader: 'flat', vcpus };
      });
    },
  };
}
