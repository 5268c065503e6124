/**
 * The only file that imports koffi. Thin, typed wrappers over libc calls; errors become KvmkitError with the
 * call name and errno. koffi 3 represents pointers as bigint addresses.
 */
import koffiMod from 'koffi';
import { KvmkitError, errnoName } from '../errors.js';

const koffi = (koffiMod as unknown as { default?: typeof koffiMod }).default ?? koffiMod;
const libc = koffi.load('libc.so.6');

const c_open = libc.func('int open(const char *path, int flags, int mode)');
const c_close = libc.func('int close(int fd)');
// SAFETY: `arg` is a Buffer the kernel reads and/or writes for the duration of the call only; the caller
// passes a Buffer at least the size encoded in `req`.
const c_ioctl_ptr = libc.func('int ioctl(int fd, unsigned long req, void *arg)');
// SAFETY: integer argument, no memory handed over.
const c_ioctl_int = libc.func('int ioctl(int fd, unsigned long req, unsigned long arg)');
const c_mmap = libc.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off)');
const c_munmap = libc.func('int munmap(void *addr, size_t len)');
const c_madvise = libc.func('int madvise(void *addr, size_t len, int advice)');
const c_eventfd = libc.func('int eventfd(unsigned int initval, int flags)');
// SAFETY: buf is a Buffer of at least `len` bytes, used during the call only.
const c_read = libc.func('long read(int fd, void *buf, size_t len)');
const c_write = libc.func('long write(int fd, const void *buf, size_t len)');
const c_poll = libc.func('int poll(void *fds, unsigned long nfds, int timeout)');
const c_preadv = libc.func('long preadv(int fd, void *iov, int iovcnt, long offset)');
const c_pwritev = libc.func('long pwritev(int fd, void *iov, int iovcnt, long offset)');
const c_readv = libc.func('long readv(int fd, void *iov, int iovcnt)');
const c_read_at = libc.func('long read(int fd, uintptr_t buf, size_t len)');
const c_write_at = libc.func('long write(int fd, uintptr_t buf, size_t len)');
const c_writev = libc.func('long writev(int fd, void *iov, int iovcnt)');
const c_pthread_self = libc.func('unsigned long pthread_self()');
const c_pthread_kill = libc.func('int pthread_kill(unsigned long thread, int sig)');
const c_syscall0 = libc.func('long syscall(long nr)');
// SAFETY: mask is a Buffer of `size` bytes read during the call only.
const c_sched_setaffinity = libc.func('int sched_setaffinity(int pid, size_t size, void *mask)');
const c_sched_getaffinity = libc.func('int sched_getaffinity(int pid, size_t size, void *mask)');
const c_memfd_create = libc.func('int memfd_create(const char *name, unsigned int flags)');
const c_ftruncate = libc.func('int ftruncate(int fd, long len)');
const c_fallocate = libc.func('int fallocate(int fd, int mode, long offset, long len)');

export const O_RDWR = 2;
export const O_CLOEXEC = 0o2000000;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_HUGETLB = 0x40000;
export const MAP_FAILED = 0xffff_ffff_ffff_ffffn;
export const MADV_DONTNEED = 4;
export const MADV_MERGEABLE = 12;
export const MADV_HUGEPAGE = 14;
export const MADV_NOHUGEPAGE = 15;
export const MADV_DONTDUMP = 16;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const SIGUSR2 = 12;
const SYS_gettid = 186;

export function errno(): number {
  return koffi.errno();
}

function sysFail(call: string, e: number, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_SYSCALL', `${call} failed: ${errnoName(e)}`, { details: { call, errno: e, errnoName: errnoName(e), ...details } });
}

export function openFile(path: string, flags: number): number {
  const fd = c_open(path, flags | O_CLOEXEC, 0) as number;
  if (fd < 0) throw sysFail(`open(${path})`, errno(), { path });
  return fd;
}

/** Like openFile but returns -errno instead of throwing. */
export function tryOpen(path: string, flags: number): number {
  const fd = c_open(path, flags | O_CLOEXEC, 0) as number;
  return fd < 0 ? -errno() : fd;
}

export function closeFd(fd: number): void {
  if (fd >= 0) c_close(fd);
}

/** ioctl with an integer argument; returns the result or -errno (never throws). */
export function ioctlInt(fd: number, req: number, arg: number | bigint = 0): number {
  const r = c_ioctl_int(fd, req, arg) as number;
  return r < 0 ? -errno() : r;
}

/** ioctl with a buffer argument; returns the result or -errno (never throws). */
export function ioctlBuf(fd: number, req: number, buf: Buffer | Uint8Array): number {
  const r = c_ioctl_ptr(fd, req, buf) as number;
  return r < 0 ? -errno() : r;
}

/** mmap; returns the address. Throws KVMKIT_ERR_SYSCALL on failure. */
export function mmap(len: number, prot: number, flags: number, fd = -1, offset = 0): bigint {
  // SAFETY: addr=NULL lets the kernel choose; the mapping lives until munmap(addr, len).
  const p = c_mmap(null, len, prot, flags, fd, offset) as bigint | null;
  if (p === null || BigInt(p) === MAP_FAILED) throw sysFail('mmap', errno(), { len, fd });
  return BigInt(p);
}

export function munmap(addr: bigint, len: number): void {
  // SAFETY: addr/len come from a successful mmap and no JS view of it is used afterwards.
  if (c_munmap(addr, len) !== 0) throw sysFail('munmap', errno());
}

/** madvise; returns 0 or -errno. */
export function madvise(addr: bigint, len: number, advice: number): number {
  // SAFETY: advisory only, on a mapping we own.
  const r = c_madvise(addr, len, advice) as number;
  return r < 0 ? -errno() : 0;
}

/**
 * An ArrayBuffer aliasing host memory at `addr`. SAFETY: the caller guarantees the mapping outlives every use
 * of the returned buffer (GuestMemory.close() and Vcpu.close() drop their views before munmap).
 */
export function viewOf(addr: bigint, len: number): ArrayBuffer {
  return koffi.view(addr, len) as ArrayBuffer;
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC | EFD_NONBLOCK): number {
  const fd = c_eventfd(initval, flags) as number;
  if (fd < 0) throw sysFail('eventfd', errno());
  return fd;
}

/** read(2) into buf; returns bytes read or -errno. */
export function readFd(fd: number, buf: Buffer | Uint8Array, len = buf.byteLength): number {
  const r = Number(c_read(fd, buf, len));
  return r < 0 ? -errno() : r;
}

export function writeFd(fd: number, buf: Buffer | Uint8Array, len = buf.byteLength): number {
  const r = Number(c_write(fd, buf, len));
  return r < 0 ? -errno() : r;
}

const POLLIN = 1;
const POLL_READY = POLLIN | 0x8 /* POLLERR */ | 0x10 /* POLLHUP */ | 0x20; /* POLLNVAL */
let pollBuf = Buffer.alloc(8 * 8);

/**
 * poll(2) for readability of up to 31 fds; blocks up to `timeoutMs` (-1: forever). Returns a bitmask of the
 * indexes in `fds` that are readable (or in error/hang-up), 0 on timeout, or -errno (e.g. -4 EINTR). Blocking:
 * for worker threads (device I/O threads), never the main thread.
 */
export function pollIn(fds: readonly number[], timeoutMs: number): number {
  if (fds.length > 31) throw new RangeError('pollIn: at most 31 fds');
  if (pollBuf.length < 8 * fds.length) pollBuf = Buffer.alloc(8 * fds.length);
  const b = pollBuf;
  for (let i = 0; i < fds.length; i++) {
    b.writeInt32LE(fds[i]!, 8 * i);
    b.writeInt16LE(POLLIN, 8 * i + 4);
    b.writeInt16LE(0, 8 * i + 6);
  }
  const r = c_poll(b, fds.length, timeoutMs) as number;
  if (r < 0) return -errno();
  let mask = 0;
  if (r > 0) for (let i = 0; i < fds.length; i++) if (b.readInt16LE(8 * i + 6) & POLL_READY) mask |= 1 << i;
  return mask;
}

/**
 * preadv(2)/pwritev(2) with a caller-built iovec array (`iov`: `count` pairs of u64 host address, u64 length, e.g.
 * from GuestMemory.hostAddress). Returns bytes transferred or -errno. SAFETY: every address/length must lie in
 * memory that stays mapped during the call (bounds-checked guest RAM); writes into guest RAM made this way must
 * be reported with GuestMemory.markWritten for dirty tracking.
 */
export function preadvRaw(fd: number, iov: BigUint64Array, count: number, offset: number): number {
  if (count < 0 || 2 * count > iov.length) throw new RangeError('preadvRaw: count exceeds the iovec array');
  const r = Number(c_preadv(fd, iov, count, offset));
  return r < 0 ? -errno() : r;
}

export function pwritevRaw(fd: number, iov: BigUint64Array, count: number, offset: number): number {
  if (count < 0 || 2 * count > iov.length) throw new RangeError('pwritevRaw: count exceeds the iovec array');
  const r = Number(c_pwritev(fd, iov, count, offset));
  return r < 0 ? -errno() : r;
}

/**
 * read(2)/write(2) on a host address given as a Number (e.g. GuestMemory.hostAddress): no view object per call, and
 * cheaper through koffi than a buffer argument (~330 vs ~420 ns per call here). Returns bytes or -errno. SAFETY: as
 * preadvRaw — the range must stay mapped during the call; writes into guest RAM must be reported with markWritten.
 */
export function readRaw(fd: number, addr: number, len: number): number {
  const r = Number(c_read_at(fd, addr, len));
  return r < 0 ? -errno() : r;
}

export function writeRaw(fd: number, addr: number, len: number): number {
  const r = Number(c_write_at(fd, addr, len));
  return r < 0 ? -errno() : r;
}

/** readv(2)/writev(2) (fds without a position: TAP, sockets, pipes) with a caller-built iovec array; see preadvRaw. */
export function readvRaw(fd: number, iov: BigUint64Array, count: number): number {
  if (count < 0 || 2 * count > iov.length) throw new RangeError('readvRaw: count exceeds the iovec array');
  const r = Number(c_readv(fd, iov, count));
  return r < 0 ? -errno() : r;
}

export function writevRaw(fd: number, iov: BigUint64Array, count: number): number {
  if (count < 0 || 2 * count > iov.length) throw new RangeError('writevRaw: count exceeds the iovec array');
  const r = Number(c_writev(fd, iov, count));
  return r < 0 ? -errno() : r;
}

export function pthreadSelf(): bigint {
  return BigInt(c_pthread_self() as number | bigint);
}

/** pthread_kill; returns 0 or an errno. */
export function pthreadKill(thread: bigint, sig: number): number {
  return c_pthread_kill(thread, sig) as number;
}

export function gettid(): number {
  return Number(c_syscall0(SYS_gettid));
}

/** Pins thread `tid` (0 = calling thread) to `cpus`. Returns 0 or -errno. */
export function setAffinity(tid: number, cpus: number[]): number {
  const mask = Buffer.alloc(128);
  for (const c of cpus) mask[c >> 3]! |= 1 << (c & 7);
  const r = c_sched_setaffinity(tid, mask.length, mask) as number;
  return r < 0 ? -errno() : 0;
}

export function getAffinity(tid: number): number[] {
  const mask = Buffer.alloc(128);
  const r = c_sched_getaffinity(tid, mask.length, mask) as number;
  if (r < 0) throw sysFail('sched_getaffinity', errno());
  const out: number[] = [];
  for (let i = 0; i < mask.length * 8; i++) if (mask[i >> 3]! & (1 << (i & 7))) out.push(i);
  return out;
}

export function memfdCreate(name: string, flags = 1 /* MFD_CLOEXEC */): number {
  const fd = c_memfd_create(name, flags) as number;
  if (fd < 0) throw sysFail('memfd_create', errno());
  return fd;
}

export const FALLOC_FL_KEEP_SIZE = 1;
export const FALLOC_FL_PUNCH_HOLE = 2;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** fallocate(2); returns 0 or -errno (EOPNOTSUPP where the filesystem cannot). */
export function fallocate(fd: number, mode: number, offset: number, len: number): number {
  const r = c_fallocate(fd, mode, offset, len) as number;
  return r < 0 ? -errno() : 0;
}

export function ftruncate(fd: number, len: number): void {
  if ((c_ftruncate(fd, len) as number) < 0) throw sysFail('ftruncate', errno());
}

/** The address of a Buffer's bytes. SAFETY: valid only while the Buffer is alive and not moved (Node Buffers do not move). */
export function bufferAddress(b: Buffer | Uint8Array): bigint {
  return BigInt(koffi.address(b as unknown as Buffer) as unknown as bigint);
}

// ---- fdwatch (uv_poll) ----
// Node exports its libuv; `koffi.load(null)` resolves symbols in the running process. Two shared trampolines
// (one poll callback, one close callback) dispatch by handle address, so watching N fds costs no koffi
// callback slot per fd and no trampoline is ever unregistered from inside itself. Used only by ../fdwatch.ts
// and only on the main thread (uv_default_loop() is the main thread's loop).
const uvlib = koffi.load(null);
const c_uv_default_loop = uvlib.func('void *uv_default_loop()');
const c_uv_handle_size = uvlib.func('size_t uv_handle_size(int type)');
const UvPollCb = koffi.proto('void', ['void *', 'int', 'int']);
const UvCloseCb = koffi.proto('void', ['void *']);
// SAFETY: `handle` is a uv_poll_t we allocated with koffi.alloc; libuv keeps it until its close callback ran.
const c_uv_poll_init = uvlib.func('uv_poll_init', 'int', ['void *', 'void *', 'int']);
const c_uv_poll_start = uvlib.func('uv_poll_start', 'int', ['void *', 'int', koffi.pointer(UvPollCb)]);
const c_uv_poll_stop = uvlib.func('int uv_poll_stop(void *handle)');
const c_uv_close = uvlib.func('uv_close', 'void', ['void *', koffi.pointer(UvCloseCb)]);
const c_uv_ref = uvlib.func('void uv_ref(void *handle)');
const c_uv_unref = uvlib.func('void uv_unref(void *handle)');
const c_uv_strerror = uvlib.func('const char *uv_strerror(int err)');

export const UV_POLL_HANDLE = 8;
export const UV_READABLE = 1;
export const UV_WRITABLE = 2;

let uvPollDispatch: ((handle: bigint, status: number, events: number) => void) | undefined;
let uvCloseDispatch: ((handle: bigint) => void) | undefined;
let uvPollTrampoline: bigint | undefined;
let uvCloseTrampoline: bigint | undefined;
let uvPollSize = 0;

function uvTrampolines(): { poll: bigint; close: bigint } {
  if (uvPollTrampoline === undefined || uvCloseTrampoline === undefined) {
    // SAFETY: both trampolines live for the life of the process (never unregistered); they only call into
    // the dispatch functions installed by fdwatch.ts, on the thread that runs the default loop.
    uvPollTrampoline = koffi.register((h: unknown, status: number, events: number) => uvPollDispatch?.(BigInt(h as bigint), status, events), koffi.pointer(UvPollCb));
    uvCloseTrampoline = koffi.register((h: unknown) => uvCloseDispatch?.(BigInt(h as bigint)), koffi.pointer(UvCloseCb));
  }
  return { poll: uvPollTrampoline, close: uvCloseTrampoline };
}

/** Installs the (single) JS dispatchers for poll events and close completions. */
export function uvSetDispatch(onPoll: (handle: bigint, status: number, events: number) => void, onClose: (handle: bigint) => void): void {
  uvPollDispatch = onPoll;
  uvCloseDispatch = onClose;
}

/** Allocates and initialises a uv_poll_t for `fd` on the default loop; returns its address or -errno-like uv error. */
export function uvPollOpen(fd: number): { handle: bigint } | { error: number } {
  if (uvPollSize === 0) uvPollSize = Number(c_uv_handle_size(UV_POLL_HANDLE));
  // SAFETY: zeroed native memory owned by us until uvPollFree() (called from the close callback).
  const mem = koffi.alloc('uint8_t', uvPollSize) as unknown;
  const handle = BigInt(mem as bigint);
  const r = c_uv_poll_init(c_uv_default_loop(), handle, fd) as number;
  if (r < 0) {
    koffi.free(handle);
    return { error: r };
  }
  return { handle };
}

export function uvPollStart(handle: bigint, events: number): number {
  return c_uv_poll_start(handle, events, uvTrampolines().poll) as number;
}

export function uvPollStop(handle: bigint): number {
  return c_uv_poll_stop(handle) as number;
}

/** uv_close; the close dispatcher is called later from the loop, after which the memory may be freed. */
export function uvCloseHandle(handle: bigint): void {
  c_uv_close(handle, uvTrampolines().close);
}

export function uvPollFree(handle: bigint): void {
  // SAFETY: only after libuv ran the close callback for this handle.
  koffi.free(handle);
}

export function uvRef(handle: bigint, ref: boolean): void {
  if (ref) c_uv_ref(handle);
  else c_uv_unref(handle);
}

export function uvStrerror(err: number): string {
  return String(c_uv_strerror(err));
}

// ---- tuning (pinning/hugepages/numa) ----
// Used by @kvmkit/plugin-hugepages and @kvmkit/plugin-numa. mbind/get_mempolicy have no glibc wrapper (they
// live in libnuma), so they go through syscall(2), declared variadic as glibc declares it.
const c_syscall_v = libc.func('long syscall(long nr, ...)');
const SYS_mbind = 237;
const SYS_get_mempolicy = 239;

/** mmap flag bits selecting the huge page size with MAP_HUGETLB: log2(size) << MAP_HUGE_SHIFT. */
export const MAP_HUGE_SHIFT = 26;
export const MAP_HUGE_2MB = 21 << MAP_HUGE_SHIFT;
export const MAP_HUGE_1GB = 30 << MAP_HUGE_SHIFT;
/** memfd_create flags. */
export const MFD_CLOEXEC = 1;
export const MFD_HUGETLB = 4;
export const MFD_HUGE_2MB = 21 << MAP_HUGE_SHIFT;
export const MFD_HUGE_1GB = 30 << MAP_HUGE_SHIFT;
/** NUMA memory policy modes (linux/mempolicy.h). */
export const MPOL_DEFAULT = 0;
export const MPOL_PREFERRED = 1;
export const MPOL_BIND = 2;
export const MPOL_INTERLEAVE = 3;
export const MPOL_LOCAL = 4;
export const MPOL_PREFERRED_MANY = 5;
/** mbind flags. */
export const MPOL_MF_STRICT = 1;
export const MPOL_MF_MOVE = 2;
/** get_mempolicy flags. */
export const MPOL_F_NODE = 1;
export const MPOL_F_ADDR = 2;
/** Bits in the node masks passed to mbind/get_mempolicy (1024 nodes, the kernel's MAX_NUMNODES ceiling). */
const NODEMASK_BITS = 1024;

/** mbind(2) on [addr, addr+len): 0 or -errno. `nodes` may be empty for MPOL_DEFAULT / MPOL_LOCAL. */
export function mbind(addr: bigint, len: number, mode: number, nodes: readonly number[], flags = 0): number {
  const mask = Buffer.alloc(NODEMASK_BITS / 8);
  for (const n of nodes) {
    if (!Number.isInteger(n) || n < 0 || n >= NODEMASK_BITS) return -22; // EINVAL
    mask[n >> 3]! |= 1 << (n & 7);
  }
  // SAFETY: `mask` is read by the kernel during the call only; addr/len name a mapping the caller owns.
  // maxnode is the number of bits + 1 (the kernel's historical off-by-one).
  const r = Number(c_syscall_v(SYS_mbind, 'uint64_t', addr, 'uint64_t', BigInt(len), 'int', mode,
    'void *', nodes.length > 0 ? mask : null, 'uint64_t', BigInt(nodes.length > 0 ? NODEMASK_BITS + 1 : 0), 'uint32_t', flags));
  return r < 0 ? -errno() : 0;
}

/** get_mempolicy(2) for the policy that covers `addr` (MPOL_F_ADDR): its mode and node set. */
export function getMempolicy(addr: bigint): { mode: number; nodes: number[] } {
  const mode = Buffer.alloc(4);
  const mask = Buffer.alloc(NODEMASK_BITS / 8);
  // SAFETY: both buffers are written by the kernel during the call only.
  const r = Number(c_syscall_v(SYS_get_mempolicy, 'void *', mode, 'void *', mask, 'uint64_t', BigInt(NODEMASK_BITS + 1), 'uint64_t', addr, 'uint64_t', BigInt(MPOL_F_ADDR)));
  if (r < 0) throw sysFail('get_mempolicy', errno());
  const nodes: number[] = [];
  for (let i = 0; i < NODEMASK_BITS; i++) if (mask[i >> 3]! & (1 << (i & 7))) nodes.push(i);
  return { mode: mode.readInt32LE(0), nodes };
}

/** mmap that returns -errno instead of throwing (huge page reservations fail with ENOMEM). */
export function tryMmap(len: number, prot: number, flags: number, fd = -1, offset = 0): bigint | number {
  // SAFETY: addr=NULL lets the kernel choose; the caller munmaps (addr, len).
  const p = c_mmap(null, len, prot, flags, fd, offset) as bigint | null;
  if (p === null || BigInt(p) === MAP_FAILED) return -errno();
  return BigInt(p);
}
