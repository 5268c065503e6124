import { KvmkitError, ffi } from '@kvmkit/kernel';

/** <linux/if_tun.h> */
export const TUN = {
  TUNSETIFF: 0x400454ca,
  TUNGETFEATURES: 0x800454cf,
  TUNSETOFFLOAD: 0x400454d0,
  TUNSETVNETHDRSZ: 0x400454d8,
  IFF_TAP: 0x0002,
  IFF_NO_PI: 0x1000,
  IFF_VNET_HDR: 0x4000,
  TUN_F_CSUM: 0x01,
  TUN_F_TSO4: 0x02,
  TUN_F_TSO6: 0x04,
  TUN_F_TSO_ECN: 0x08,
  TUN_F_UFO: 0x10,
} as const;

const O_NONBLOCK = 0o4000;
const IFNAMSIZ = 16;
/** virtio_net_hdr_mrg_rxbuf: the header size with VIRTIO_F_VERSION_1 (also what the TAP is told to use). */
export const VNET_HDR_SIZE = 12;

function tapError(msg: string, errno: number, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_VIRTIO_NET_TAP', msg, { details: { errno, ...details } });
}

/**
 * A TAP interface opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (12-byte virtio-net header in front of
 * every frame, both ways), non-blocking. An existing persistent TAP of that name is attached; otherwise
 * the kernel creates one that disappears when the fd is closed.
 */
export class Tap {
  private constructor(
    readonly fd: number,
    readonly name: string,
  ) {}

  static open(name = ''): Tap {
    if (Buffer.byteLength(name) >= IFNAMSIZ) throw tapError(`TAP name ${JSON.stringify(name)} is longer than 15 bytes`, 22, { name });
    const fd = ffi.tryOpen('/dev/net/tun', ffi.O_RDWR | O_NONBLOCK);
    if (fd < 0) throw tapError(`cannot open /dev/net/tun: errno ${-fd}`, -fd);
    const ifr = Buffer.alloc(40);
    ifr.write(name, 0, 'utf8');
    ifr.writeUInt16LE(TUN.IFF_TAP | TUN.IFF_NO_PI | TUN.IFF_VNET_HDR, 16);
    // SAFETY: ifr is a 40-byte struct ifreq read and written by the kernel during the call.
    let r = ffi.ioctlBuf(fd, TUN.TUNSETIFF, ifr);
    if (r < 0) {
      ffi.closeFd(fd);
      throw tapError(`TUNSETIFF(${name || 'tap%d'}) failed: errno ${-r}`, -r, { name });
    }
    const actual = ifr.subarray(0, IFNAMSIZ).toString('utf8').replace(/\0.*$/s, '');
    const sz = Buffer.alloc(4);
    sz.writeInt32LE(VNET_HDR_SIZE);
    r = ffi.ioctlBuf(fd, TUN.TUNSETVNETHDRSZ, sz);
    if (r < 0) {
      ffi.closeFd(fd);
      throw tapError(`TUNSETVNETHDRSZ failed: errno ${-r}`, -r, { name: actual });
    }
    const tap = new Tap(fd, actual);
    tap.setOffload(0);
    return tap;
  }

  /** TUNSETOFFLOAD: what the TAP may hand us (partial checksums, GSO). Returns 0 or -errno. */
  setOffload(flags: number): number {
    return ffi.ioctlInt(this.fd, TUN.TUNSETOFFLOAD, flags);
  }

  /** One frame (with its vnet header) into buf; bytes read, or -errno (-11 = EAGAIN: nothing pending). */
  read(buf: Buffer): number {
    return ffi.readFd(this.fd, buf, buf.length);
  }

  write(buf: Uint8Array): number {
    return ffi.writeFd(this.fd, buf, buf.byteLength);
  }

  close(): void {
    ffi.closeFd(this.fd);
  }
}
