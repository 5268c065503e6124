import { KvmkitError, ffi } from '@kvmkit/kernel';

/** <linux/if_tun.h> */
export const TUN = {
  TUNSETIFF: 0x400454ca,
  TUNGETFEATURES: 0x800454cf,
  TUNSETOFFLOAD: 0x400454d0,
  TUNSETVNETHDRSZ: 0x400454d8,
  TUNSETQUEUE: 0x400454d9,
  IFF_TAP: 0x0002,
  IFF_MULTI_QUEUE: 0x0100,
  IFF_ATTACH_QUEUE: 0x0200,
  IFF_DETACH_QUEUE: 0x0400,
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
 *
 * The TAP is multi-queue (IFF_MULTI_QUEUE) whenever possible: a new TAP is created so, an existing one is
 * attached as one more queue if it was created `multi_queue`, else as its single queue. Several processes
 * can then hold the same TAP (a migration source and its destination); each fd is one queue that can be
 * detached (`detachQueue`: the kernel sends it nothing and drops what it held) and attached again.
 */
export class Tap {
  private queueAttached = true;

  private constructor(
    readonly fd: number,
    readonly name: string,
    /** Opened with IFF_MULTI_QUEUE: this fd is one queue, which can be detached and attached. */
    readonly multiQueue: boolean,
  ) {}

  static open(name = ''): Tap {
    if (Buffer.byteLength(name) >= IFNAMSIZ) throw tapError(`TAP name ${JSON.stringify(name)} is longer than 15 bytes`, 22, { name });
    const fd = ffi.tryOpen('/dev/net/tun', ffi.O_RDWR | O_NONBLOCK);
    if (fd < 0) throw tapError(`cannot open /dev/net/tun: errno ${-fd}`, -fd);
    const ifr = Buffer.alloc(40);
    const setiff = (flags: number): number => {
      ifr.fill(0);
      ifr.write(name, 0, 'utf8');
      ifr.writeUInt16LE(flags, 16);
      // SAFETY: ifr is a 40-byte struct ifreq read and written by the kernel during the call.
      return ffi.ioctlBuf(fd, TUN.TUNSETIFF, ifr);
    };
    const base = TUN.IFF_TAP | TUN.IFF_NO_PI | TUN.IFF_VNET_HDR;
    let multiQueue = true;
    let r = setiff(base | TUN.IFF_MULTI_QUEUE);
    // EINVAL: an existing TAP created without multi_queue (it takes one fd only).
    if (r === -22 && name !== '') {
      multiQueue = false;
      r = setiff(base);
    }
    if (r < 0) {
      ffi.closeFd(fd);
      const hint = r === -16 ? ' (EBUSY: another process holds this single-queue TAP; create it with `multi_queue` to share it, e.g. for a migration on one host)' : '';
      throw tapError(`TUNSETIFF(${name || 'tap%d'}) failed: errno ${-r}${hint}`, -r, { name });
    }
    const actual = ifr.subarray(0, IFNAMSIZ).toString('utf8').replace(/\0.*$/s, '');
    const sz = Buffer.alloc(4);
    sz.writeInt32LE(VNET_HDR_SIZE);
    r = ffi.ioctlBuf(fd, TUN.TUNSETVNETHDRSZ, sz);
    if (r < 0) {
      ffi.closeFd(fd);
      throw tapError(`TUNSETVNETHDRSZ failed: errno ${-r}`, -r, { name: actual });
    }
    const tap = new Tap(fd, actual, multiQueue);
    // TUNSETOFFLOAD is a setting of the whole TAP: a second queue (a migration destination) must not change
    // what the kernel hands the queue still in use. A multi-queue fd is detached until the device runs and sets
    // the offloads its driver accepted; a single-queue TAP takes frames at once, so it starts with none.
    if (!multiQueue) tap.setOffload(0);
    return tap;
  }

  /** Whether this fd's queue receives frames (always true for a single-queue TAP). */
  get attached(): boolean {
    return this.queueAttached;
  }

  private setQueue(flag: number): number {
    const ifr = Buffer.alloc(40);
    ifr.writeUInt16LE(flag, 16);
    // SAFETY: ifr is a 40-byte struct ifreq only read by the kernel.
    return ffi.ioctlBuf(this.fd, TUN.TUNSETQUEUE, ifr);
  }

  /**
   * Multi-queue only: stop this queue (TUNSETQUEUE IFF_DETACH_QUEUE). The kernel no longer sends it frames and
   * drops those it held. Returns 0 or -errno; a no-op for a single-queue TAP or a detached queue.
   */
  detachQueue(): number {
    if (!this.multiQueue || !this.queueAttached) return 0;
    const r = this.setQueue(TUN.IFF_DETACH_QUEUE);
    if (r === 0) this.queueAttached = false;
    return r;
  }

  /** Multi-queue only: (re)start this queue (IFF_ATTACH_QUEUE). Returns 0 or -errno. */
  attachQueue(): number {
    if (this.queueAttached) return 0;
    const r = this.setQueue(TUN.IFF_ATTACH_QUEUE);
    if (r === 0) this.queueAttached = true;
    return r;
  }

  /** TUNSETOFFLOAD: what the TAP may hand us (partial checksums, GSO). Returns 0 or -errno. */
  setOffload(flags: number): number {
    return ffi.ioctlInt(this.fd, TUN.TUNSETOFFLOAD, flags);
  }

  /** One frame (with its vnet header) into buf; bytes read, or -errno (-11 = EAGAIN: nothing pending). */
  read(buf: Uint8Array): number {
    return ffi.readFd(this.fd, buf, buf.length);
  }

  write(buf: Uint8Array): number {
    return ffi.writeFd(this.fd, buf, buf.byteLength);
  }

  /** read(2)/write(2) on a host address (guest RAM, bounds-checked by the caller): no view per frame. */
  readAt(addr: number, len: number): number {
    return ffi.readRaw(this.fd, addr, len);
  }

  writeAt(addr: number, len: number): number {
    return ffi.writeRaw(this.fd, addr, len);
  }

  /**
   * readv(2): one frame (with its vnet header) scattered over the first `count` [address, length] pairs of `iov`
   * (host addresses). Returns the bytes read (never more than the iovecs hold: a longer frame is truncated, so a
   * caller that must see truncation ends the list with a spill buffer that holds any frame) or -errno.
   * SAFETY: every iovec must describe memory that stays mapped during the call (guest RAM, a live Buffer).
   */
  readv(iov: BigUint64Array, count: number): number {
    return ffi.readvRaw(this.fd, iov, count);
  }

  /** writev(2): one frame (vnet header + frame) gathered from `count` iovecs of host memory; see readv. */
  writev(iov: BigUint64Array, count: number): number {
    return ffi.writevRaw(this.fd, iov, count);
  }

  close(): void {
    ffi.closeFd(this.fd);
  }
}
