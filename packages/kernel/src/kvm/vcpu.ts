import * as ffi from './ffi.js';
import { KVM, OFF, SIZE } from './ioctls.js';
import { ioctlError } from './kvm.js';
import { decodeCpuid2, decodeMsrs, decodeRegs, decodeSregs, encodeCpuid2, encodeMsrs, encodeRegs, encodeSregs } from './marshal.js';
import type { CpuidEntry, MsrEntry, Regs, Sregs } from './types.js';

/**
 * A vCPU fd and its kvm_run mapping. Get/set calls run on the calling thread and must only be made while the
 * vCPU is not inside KVM_RUN (before start, or while paused): KVM serialises vCPU ioctls.
 */
export class Vcpu {
  readonly runAddr: bigint;
  private readonly run: Uint8Array;
  private closed = false;

  constructor(readonly fd: number, readonly index: number, readonly mmapSize: number) {
    // SAFETY: the kvm_run page stays mapped until close(); `run` is dropped there.
    this.runAddr = ffi.mmap(mmapSize, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_SHARED, fd, 0);
    this.run = new Uint8Array(ffi.viewOf(this.runAddr, mmapSize));
  }

  /** kvm_run.immediate_exit: when set, KVM_RUN returns EINTR at once. */
  setImmediateExit(on: boolean): void {
    if (!this.closed) this.run[OFF.kvm_run.immediate_exit] = on ? 1 : 0;
  }

  private get(name: keyof typeof KVM, size: number): Buffer {
    const b = Buffer.alloc(size);
    const r = ffi.ioctlBuf(this.fd, KVM[name], b);
    if (r < 0) throw ioctlError(name, r, { vcpu: this.index });
    return b;
  }

  private set(name: keyof typeof KVM, b: Buffer): void {
    const r = ffi.ioctlBuf(this.fd, KVM[name], b);
    if (r < 0) throw ioctlError(name, r, { vcpu: this.index });
  }

  getRegs(): Regs {
    return decodeRegs(this.get('GET_REGS', SIZE.kvm_regs));
  }
  setRegs(r: Regs): void {
    this.set('SET_REGS', encodeRegs(r));
  }
  getSregs(): Sregs {
    return decodeSregs(this.get('GET_SREGS', SIZE.kvm_sregs));
  }
  setSregs(s: Sregs): void {
    this.set('SET_SREGS', encodeSregs(s));
  }
  getFpu(): Uint8Array {
    return new Uint8Array(this.get('GET_FPU', SIZE.kvm_fpu));
  }
  setFpu(b: Uint8Array): void {
    this.set('SET_FPU', Buffer.from(b.subarray(0, SIZE.kvm_fpu)));
  }
  getXsave(): Uint8Array {
    return new Uint8Array(this.get('GET_XSAVE', SIZE.kvm_xsave));
  }
  setXsave(b: Uint8Array): void {
    this.set('SET_XSAVE', Buffer.from(b.subarray(0, SIZE.kvm_xsave)));
  }
  getXcrs(): Uint8Array {
    return new Uint8Array(this.get('GET_XCRS', SIZE.kvm_xcrs));
  }
  setXcrs(b: Uint8Array): void {
    this.set('SET_XCRS', Buffer.from(b.subarray(0, SIZE.kvm_xcrs)));
  }
  getLapic(): Uint8Array {
    return new Uint8Array(this.get('GET_LAPIC', SIZE.kvm_lapic_state));
  }
  setLapic(b: Uint8Array): void {
    this.set('SET_LAPIC', Buffer.from(b.subarray(0, SIZE.kvm_lapic_state)));
  }
  getVcpuEvents(): Uint8Array {
    return new Uint8Array(this.get('GET_VCPU_EVENTS', SIZE.kvm_vcpu_events));
  }
  setVcpuEvents(b: Uint8Array): void {
    this.set('SET_VCPU_EVENTS', Buffer.from(b.subarray(0, SIZE.kvm_vcpu_events)));
  }
  getDebugRegs(): Uint8Array {
    return new Uint8Array(this.get('GET_DEBUGREGS', SIZE.kvm_debugregs));
  }
  setDebugRegs(b: Uint8Array): void {
    this.set('SET_DEBUGREGS', Buffer.from(b.subarray(0, SIZE.kvm_debugregs)));
  }
  getMpState(): number {
    return this.get('GET_MP_STATE', SIZE.kvm_mp_state).readUInt32LE(0);
  }
  setMpState(state: number): void {
    const b = Buffer.alloc(SIZE.kvm_mp_state);
    b.writeUInt32LE(state, 0);
    this.set('SET_MP_STATE', b);
  }

  /** KVM_GET_MSRS for `indexes`; MSRs KVM does not know are left out of the result. */
  getMsrs(indexes: number[]): MsrEntry[] {
    const b = encodeMsrs(indexes.map((index) => ({ index, data: 0n })));
    const r = ffi.ioctlBuf(this.fd, KVM.GET_MSRS, b);
    if (r < 0) throw ioctlError('GET_MSRS', r, { vcpu: this.index });
    return decodeMsrs(b, r);
  }

  /** KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects). */
  setMsrs(entries: MsrEntry[]): number {
    const b = encodeMsrs(entries);
    const r = ffi.ioctlBuf(this.fd, KVM.SET_MSRS, b);
    if (r < 0) throw ioctlError('SET_MSRS', r, { vcpu: this.index });
    return r;
  }

  setCpuid(entries: CpuidEntry[]): void {
    this.set('SET_CPUID2', encodeCpuid2(entries));
  }

  /** KVM_GET_CPUID2: the CPUID table KVM holds for this vCPU. */
  getCpuid(): CpuidEntry[] {
    const b = Buffer.alloc(SIZE.kvm_cpuid2 + 256 * SIZE.kvm_cpuid_entry2);
    b.writeUInt32LE(256, 0);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_CPUID2, b);
    if (r < 0) throw ioctlError('GET_CPUID2', r, { vcpu: this.index });
    return decodeCpuid2(b);
  }

  /**
   * KVM_GET_NESTED_STATE: the vCPU's nested-virtualization state (struct kvm_nested_state, `size` bytes as KVM
   * reports them). `maxSize` is KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE); throws KVMKIT_ERR_IOCTL on failure.
   */
  getNestedState(maxSize: number): Uint8Array {
    const b = Buffer.alloc(Math.max(maxSize, SIZE.kvm_nested_state));
    b.writeUInt32LE(b.length, OFF.kvm_nested_state.size);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_NESTED_STATE, b);
    if (r < 0) throw ioctlError('GET_NESTED_STATE', r, { vcpu: this.index });
    const size = Math.min(b.readUInt32LE(OFF.kvm_nested_state.size), b.length);
    return new Uint8Array(b.subarray(0, Math.max(size, SIZE.kvm_nested_state)));
  }

  /** KVM_SET_NESTED_STATE with what getNestedState returned. */
  setNestedState(state: Uint8Array): void {
    this.set('SET_NESTED_STATE', Buffer.from(state));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    ffi.munmap(this.runAddr, this.mmapSize);
    ffi.closeFd(this.fd);
  }
}
