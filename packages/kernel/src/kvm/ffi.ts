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
const c_pthread_self = libc.func('unsigned long pthread_self()');
const c_pthread_kill = libc.func('int pthread_kill(unsigned long thread, int sig)');
const c_syscall0 = libc.func('long syscall(long nr)');
// SAFETY: mask is a Buffer of `size` bytes read during the call only.
const c_sched_setaffinity = libc.func('int sched_setaffinity(int pid, size_t size, void *mask)');
const c_sched_getaffinity = libc.func('int sched_getaffinity(int pid, size_t size, void *mask)');
const c_memfd_create = libc.func('int memfd_create(const char *name, unsigned int flags)');
const c_ftruncate = libc.func('int ftruncate(int fd, long len)');

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

export function ftruncate(fd: number, len: number): void {
  if ((c_ftruncate(fd, len) as number) < 0) throw sysFail('ftruncate', errno());
}

/** The address of a Buffer's bytes. SAFETY: valid only while the Buffer is alive and not moved (Node Buffers do not move). */
export function bufferAddress(b: Buffer | Uint8Array): bigint {
  return BigInt(koffi.address(b as unknown as Buffer) as unknown as bigint);
}
