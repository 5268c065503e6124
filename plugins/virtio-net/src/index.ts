import { createHash } from 'node:crypto';
import { KvmkitError, checkOptions, type Plugin } from '@kvmkit/kernel';
import { useVirtioMmio, type VirtioMmioRegistration } from '@kvmkit/virtio';
import { Tap } from './tap.js';
import { VirtioNet } from './net.js';

export { Tap, TUN, VNET_HDR_SIZE } from './tap.js';
export { VirtioNet, VIRTIO_NET_F, VIRTIO_NET_S_LINK_UP, VIRTIO_NET_HDR_F_NEEDS_CSUM, NET_STATE_VERSION, MAX_FRAME, RXQ, TXQ, TURN_CHAINS } from './net.js';
export type { NetStats, VirtioNetDeviceOptions } from './net.js';

const VERSION = '0.1.0';
const ID_RE = /^[a-z0-9][a-z0-9._-]{0,31}$/i;
const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i;

export interface VirtioNetOptions {
  /** Distinguishes several NICs: the plugin is then named `virtio-net-<id>`. */
  id?: string;
  /** TAP interface name (attached if it exists, created otherwise); default: the kernel picks `tapN`. */
  tap?: string;
  /** MAC address `xx:xx:xx:xx:xx:xx` (unicast); default: derived from the VM name and plugin name. */
  mac?: string;
  /** Offer checksum and TSO offloads (default true). */
  offload?: boolean;
  irq?: number;
  /** Queue size per queue (power of 2, 2..32768; default 256). */
  queueSize?: number;
}

export interface VirtioNetApi {
  readonly device: VirtioNet | undefined;
  /** The TAP interface name (after the devices hook). */
  readonly tap: string | undefined;
  readonly mac: string;
  setLink(up: boolean): void;
  registration(): VirtioMmioRegistration | undefined;
}

/** A stable locally administered unicast MAC (52:54:00:xx:xx:xx) from `seed`. */
export function stableMac(seed: string): string {
  const h = createHash('sha256').update(seed).digest();
  return ['52', '54', '00', ...[h[0]!, h[1]!, h[2]!].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

export function parseMac(s: string): Uint8Array {
  return Uint8Array.from(s.split(':').map((x) => parseInt(x, 16)));
}

function bad(key: string, msg: string): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `virtio-net: ${msg}`, { details: { plugin: 'virtio-net', key } });
}

export function validateNetOptions(o: unknown): VirtioNetOptions & { queueSize: number; offload: boolean } {
  const opts = checkOptions('virtio-net', o, {
    id: { type: 'string' },
    tap: { type: 'string' },
    mac: { type: 'string' },
    offload: { type: 'boolean' },
    irq: { type: 'integer' },
    queueSize: { type: 'integer' },
  }) as VirtioNetOptions;
  if (opts.id !== undefined && !ID_RE.test(opts.id)) throw bad('id', `id ${JSON.stringify(opts.id)} must be 1-32 of [A-Za-z0-9._-]`);
  if (opts.tap !== undefined && (Buffer.byteLength(opts.tap) > 15 || /[\s/:]/.test(opts.tap))) throw bad('tap', `tap ${JSON.stringify(opts.tap)} is not a valid interface name`);
  if (opts.mac !== undefined) {
    if (!MAC_RE.test(opts.mac)) throw bad('mac', `mac ${JSON.stringify(opts.mac)} is not xx:xx:xx:xx:xx:xx`);
    if (parseInt(opts.mac.slice(0, 2), 16) & 1) throw bad('mac', `mac ${opts.mac} is a multicast address`);
  }
  const queueSize = opts.queueSize ?? 256;
  if (queueSize < 2 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) throw bad('queueSize', `queueSize ${queueSize} is not a power of 2 in 2..32768`);
  return { ...opts, queueSize, offload: opts.offload ?? true };
}

/** Plugin factory: `virtioNet({ tap?, mac?, id? })`. Provides `virtio-device+` and `net+`. */
export default function virtioNet(options: VirtioNetOptions = {}): Plugin {
  const name = options?.id === undefined ? 'virtio-net' : `virtio-net-${options.id}`;
  return {
    name,
    version: VERSION,
    kernel: '^0.1.0',
    provides: ['virtio-device+', 'net+'],
    options,
    validateOptions: (o) => void validateNetOptions(o),
    apply(machine, ctx) {
      const o = validateNetOptions(options);
      const mac = o.mac ?? stableMac(`${machine.name}/${name}`);
      let device: VirtioNet | undefined;
      const reg = useVirtioMmio(
        machine,
        name,
        () => {
          const tap = Tap.open(o.tap ?? '');
          device = new VirtioNet(tap, { mac: parseMac(mac), queueSize: o.queueSize, offload: o.offload, log: ctx.log });
          ctx.log.debug({ tap: tap.name, mac }, 'virtio-net ready');
          return device;
        },
        { ...(o.irq !== undefined ? { irq: o.irq } : {}), log: ctx.log },
      );
      const api: VirtioNetApi = {
        get device() {
          return device;
        },
        get tap() {
          return device?.tap.name;
        },
        /** The device's MAC: after a restore, the saved one. */
        get mac() {
          return device?.mac ?? mac;
        },
        setLink: (up) => device?.setLink(up),
        registration: reg,
      };
      machine.provide(name, api);
    },
  };
}
