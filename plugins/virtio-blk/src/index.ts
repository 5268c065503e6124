import * as fs from 'node:fs';
import * as path from 'node:path';
import { KvmkitError, checkOptions, type Plugin } from '@kvmkit/kernel';
import { useVirtioMmio, type VirtioMmioRegistration } from '@kvmkit/virtio';
import { VirtioBlk, statImage } from './blk.js';

export { VirtioBlk, VIRTIO_BLK_F, VIRTIO_BLK_T, VIRTIO_BLK_S, BLK_CFG, BLK_CONFIG_SIZE, BLK_STATE_VERSION, SECTOR, VIRTIO_BLK_ID_BYTES, alignedBuffer, statImage, isMemoryBacked, DEFAULT_POLL_US, DEFAULT_IOTHREAD_POLL_US } from './blk.js';
export type { BlkDeviceOptions, BlkStats } from './blk.js';

const VERSION = '0.1.0';
const ID_RE = /^[a-z0-9][a-z0-9._-]{0,31}$/i;

export interface VirtioBlkOptions {
  /** Raw image file (size: a non-zero multiple of 512). */
  path: string;
  /** Distinguishes several disks: the plugin is then named `virtio-blk-<id>`. */
  id?: string;
  /** Expose the disk read-only (VIRTIO_BLK_F_RO; writes fail with VIRTIO_BLK_S_IOERR). */
  readOnly?: boolean;
  /** Open with O_DIRECT (bypass the host page cache); falls back with a warning where unsupported (tmpfs). */
  direct?: boolean;
  /**
   * Serve the disk's queue in a dedicated I/O thread (default true): the worker owns the queue's ioeventfd and
   * serves every request synchronously (a slow disk never stalls the event loop); one thread per disk. `false`:
   * requests are served on the main thread (`syncIo` decides how).
   */
  ioThread?: boolean;
  /**
   * Serve reads, writes and flushes synchronously on the main thread (a memory copy, no threadpool round
   * trip). Default: only when the image is on tmpfs/ramfs and not opened with O_DIRECT; `false` always uses
   * the threadpool; `true` forces it (only sensible where the image is known to stay in the page cache).
   */
  syncIo?: boolean;
  /**
   * After serving a notification keep polling the avail ring this many µs (0..1000; default 0 = off): in the
   * I/O thread, or on the main thread with the synchronous path (`ioThread: false`). Requests added meanwhile
   * are served without a notification, and the driver is told (VIRTQ_USED_F_NO_NOTIFY) that it need not notify.
   */
  pollUs?: number;
  /** GET_ID answer (up to 20 bytes; default: id, else the file name). */
  serial?: string;
  /** IRQ line (default: next free). */
  irq?: number;
  /** Queue size (power of 2, 2..32768; default 256). */
  queueSize?: number;
  /** Largest data segment in bytes (config size_max; default 1 MiB). */
  sizeMax?: number;
  /** Most data segments per request (config seg_max; default queueSize - 2). */
  segMax?: number;
}

/** What the plugin publishes with `machine.provide(<plugin name>, api)`. */
export interface VirtioBlkApi {
  readonly device: VirtioBlk | undefined;
  registration(): VirtioMmioRegistration | undefined;
}

export function pluginName(o: { id?: string }): string {
  return o.id === undefined ? 'virtio-blk' : `virtio-blk-${o.id}`;
}

function bad(key: string, msg: string): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `virtio-blk: ${msg}`, { details: { plugin: 'virtio-blk', key } });
}

/** Validates options and the image (exists, readable — writable unless readOnly —, size multiple of 512). */
export function validateBlkOptions(o: unknown): Required<Omit<VirtioBlkOptions, 'id' | 'irq' | 'syncIo' | 'pollUs'>> & Pick<VirtioBlkOptions, 'id' | 'irq' | 'syncIo' | 'pollUs'> {
  const opts = checkOptions('virtio-blk', o, {
    path: { type: 'string', required: true },
    id: { type: 'string' },
    readOnly: { type: 'boolean' },
    direct: { type: 'boolean' },
    syncIo: { type: 'boolean' },
    ioThread: { type: 'boolean' },
    pollUs: { type: 'integer' },
    serial: { type: 'string' },
    irq: { type: 'integer' },
    queueSize: { type: 'integer' },
    sizeMax: { type: 'integer' },
    segMax: { type: 'integer' },
  }) as unknown as VirtioBlkOptions;
  if (opts.id !== undefined && !ID_RE.test(opts.id)) throw bad('id', `id ${JSON.stringify(opts.id)} must be 1-32 of [A-Za-z0-9._-]`);
  const queueSize = opts.queueSize ?? 256;
  if (queueSize < 2 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) throw bad('queueSize', `queueSize ${queueSize} is not a power of 2 in 2..32768`);
  const sizeMax = opts.sizeMax ?? 1 << 20;
  if (sizeMax < 512 || sizeMax > 0xffff_ffff) throw bad('sizeMax', `sizeMax ${sizeMax} must be in 512..2^32-1`);
  const segMax = opts.segMax ?? Math.max(1, queueSize - 2);
  if (segMax < 1 || segMax > 0xffff_ffff) throw bad('segMax', `segMax ${segMax} must be >= 1`);
  if (opts.pollUs !== undefined && (opts.pollUs < 0 || opts.pollUs > 1000)) throw bad('pollUs', `pollUs ${opts.pollUs} must be in 0..1000`);
  statImage(opts.path);
  try {
    fs.accessSync(opts.path, opts.readOnly ? fs.constants.R_OK : fs.constants.R_OK | fs.constants.W_OK);
  } catch (e) {
    throw new KvmkitError('KVMKIT_ERR_VIRTIO_BLK_FILE', `virtio-blk: image ${opts.path} is not ${opts.readOnly ? 'readable' : 'readable and writable'}: ${(e as Error).message}`, {
      cause: e,
      details: { path: opts.path, code: (e as NodeJS.ErrnoException).code },
    });
  }
  return {
    path: opts.path,
    ...(opts.id !== undefined ? { id: opts.id } : {}),
    ...(opts.irq !== undefined ? { irq: opts.irq } : {}),
    ...(opts.syncIo !== undefined ? { syncIo: opts.syncIo } : {}),
    ...(opts.pollUs !== undefined ? { pollUs: opts.pollUs } : {}),
    readOnly: opts.readOnly ?? false,
    ioThread: opts.ioThread ?? true,
    direct: opts.direct ?? false,
    serial: opts.serial ?? opts.id ?? path.basename(opts.path),
    queueSize,
    sizeMax,
    segMax,
  };
}

/**
 * Plugin factory: `virtioBlk({ path, id?, readOnly?, direct? })`. Named `virtio-blk` (or `virtio-blk-<id>`
 * for further disks); provides `virtio-device+` and `block+`.
 */
export default function virtioBlk(options: VirtioBlkOptions): Plugin {
  const name = pluginName(options ?? {});
  return {
    name,
    version: VERSION,
    kernel: '^0.1.0',
    provides: ['virtio-device+', 'block+'],
    options,
    validateOptions: (o) => void validateBlkOptions(o),
    apply(machine, ctx) {
      const o = validateBlkOptions(options);
      let device: VirtioBlk | undefined;
      const reg = useVirtioMmio(
        machine,
        name,
        async () => {
          device = await VirtioBlk.open({ ...o, maxDiscardSectors: 1 << 22, log: ctx.log }, name);
          ctx.log.debug({ path: o.path, sectors: String(device.capacity), readOnly: o.readOnly, direct: device.direct, syncIo: device.syncIo, ioThread: o.ioThread }, 'virtio-blk ready');
          // ioThread: true → the transport hands the queue to the device's I/O thread (VirtioBlk.ioThread()).
          return device;
        },
        { ...(o.irq !== undefined ? { irq: o.irq } : {}), log: ctx.log },
      );
      const api: VirtioBlkApi = {
        get device() {
          return device;
        },
        registration: reg,
      };
      machine.provide(name, api);
    },
  };
}
