import { KvmkitError, errnoName } from '../errors.js';
import * as ffi from './ffi.js';
import { KVM, KVM_API_VERSION, KVM_CAP, SIZE } from './ioctls.js';
import { decodeCpuid2 } from './marshal.js';
import type { CpuidEntry } from './types.js';

export function ioctlError(name: string, r: number, details: Record<string, unknown> = {}): KvmkitError {
  const e = -r;
  return new KvmkitError('KVMKIT_ERR_IOCTL', `KVM_${name} failed: ${errnoName(e)}`, {
    details: { ioctl: `KVM_${name}`, errno: e, errnoName: errnoName(e), ...details },
  });
}

/** The /dev/kvm system fd: API version, capabilities, supported CPUID, MSR index list. */
export class Kvm {
  readonly fd: number;
  private closed = false;
  private cpuidCache: CpuidEntry[] | undefined;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** Opens /dev/kvm (or `path`) and checks the API version. */
  static open(path = process.env.KVMKIT_KVM_DEVICE ?? '/dev/kvm'): Kvm {
    const fd = ffi.tryOpen(path, ffi.O_RDWR);
    if (fd < 0) {
      const e = -fd;
      const hint = e === 2 ? 'KVM is not available (no /dev/kvm): load kvm_intel/kvm_amd or enable virtualization'
        : e === 13 || e === 1 ? 'permission denied: run as root or add the user to the kvm group'
        : 'cannot open it';
      throw new KvmkitError('KVMKIT_ERR_KVM_UNAVAILABLE', `${path}: ${errnoName(e)}: ${hint}`, { details: { path, errno: e } });
    }
    const k = new Kvm(fd);
    const v = ffi.ioctlInt(fd, KVM.GET_API_VERSION);
    if (v !== KVM_API_VERSION) {
      k.close();
      throw new KvmkitError('KVMKIT_ERR_KVM_API_VERSION', `KVM API version is ${v}, kvmkit needs ${KVM_API_VERSION}`, { details: { version: v } });
    }
    return k;
  }

  /** KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific positive value. */
  checkExtension(cap: number): number {
    const r = ffi.ioctlInt(this.fd, KVM.CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
  }

  /** Throws KVMKIT_ERR_KVM_CAPABILITY naming every missing capability. */
  requireCapabilities(caps: Array<keyof typeof KVM_CAP>): void {
    const missing = caps.filter((c) => this.checkExtension(KVM_CAP[c]) <= 0);
    if (missing.length > 0) {
      throw new KvmkitError('KVMKIT_ERR_KVM_CAPABILITY', `KVM lacks required capabilities: ${missing.map((c) => `KVM_CAP_${c}`).join(', ')}`, {
        details: { missing },
      });
    }
  }

  vcpuMmapSize(): number {
    const r = ffi.ioctlInt(this.fd, KVM.GET_VCPU_MMAP_SIZE);
    if (r < 0) throw ioctlError('GET_VCPU_MMAP_SIZE', r);
    return r;
  }

  /** KVM_GET_SUPPORTED_CPUID (cached). */
  supportedCpuid(): CpuidEntry[] {
    if (this.cpuidCache) return this.cpuidCache.map((e) => ({ ...e }));
    for (let n = 128; n <= 4096; n *= 2) {
      const b = Buffer.alloc(SIZE.kvm_cpuid2 + n * SIZE.kvm_cpuid_entry2);
      b.writeUInt32LE(n, 0);
      const r = ffi.ioctlBuf(this.fd, KVM.GET_SUPPORTED_CPUID, b);
      if (r === -7 /* E2BIG */) continue;
      if (r < 0) throw ioctlError('GET_SUPPORTED_CPUID', r);
      this.cpuidCache = decodeCpuid2(b);
      return this.cpuidCache.map((e) => ({ ...e }));
    }
    throw new KvmkitError('KVMKIT_ERR_IOCTL', 'KVM_GET_SUPPORTED_CPUID: too many entries');
  }

  /** KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores for a vCPU. */
  msrIndexList(): number[] {
    const probe = Buffer.alloc(4);
    ffi.ioctlBuf(this.fd, KVM.GET_MSR_INDEX_LIST, probe); // E2BIG, fills the count
    const n = probe.readUInt32LE(0);
    const b = Buffer.alloc(4 + n * 4);
    b.writeUInt32LE(n, 0);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_MSR_INDEX_LIST, b);
    if (r < 0) throw ioctlError('GET_MSR_INDEX_LIST', r);
    const count = b.readUInt32LE(0);
    const out: number[] = [];
    for (let i = 0; i < count; i++) out.push(b.readUInt32LE(4 + i * 4));
    return out;
  }

  /** KVM_CREATE_VM: returns the raw VM fd (wrap it with `Vm`). */
  createVmFd(): number {
    const r = ffi.ioctlInt(this.fd, KVM.CREATE_VM, 0);
    if (r < 0) throw ioctlError('CREATE_VM', r);
    return r;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    ffi.closeFd(this.fd);
  }
}
