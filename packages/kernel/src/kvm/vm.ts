import * as ffi from './ffi.js';
import { KVM, KVM_IOEVENTFD_FLAG, KVM_IRQFD_FLAG, KVM_MEM, KVM_PIT_SPEAKER_DUMMY, OFF, SIZE } from './ioctls.js';
import { ioctlError, type Kvm } from './kvm.js';
import { Vcpu } from './vcpu.js';

export interface SlotInfo {
  slot: number;
  gpa: bigint;
  size: number;
  hva: bigint;
  flags: number;
}

/** The VM fd: memory slots, irqchip, PIT, IRQ lines, ioeventfd/irqfd, dirty log, clock, vCPU creation. */
export class Vm {
  readonly fd: number;
  readonly kvm: Kvm;
  private closed = false;
  private irqchip = false;
  private pit = false;
  readonly slots = new Map<number, SlotInfo>();
  private readonly irqLevel = Buffer.alloc(SIZE.kvm_irq_level);

  constructor(kvm: Kvm) {
    this.kvm = kvm;
    this.fd = kvm.createVmFd();
  }

  get hasIrqchip(): boolean {
    return this.irqchip;
  }
  get hasPit(): boolean {
    return this.pit;
  }

  /** KVM_SET_USER_MEMORY_REGION. `size` 0 deletes the slot. */
  setMemoryRegion(slot: number, gpa: bigint, size: number, hva: bigint, flags = 0): void {
    const b = Buffer.alloc(SIZE.kvm_userspace_memory_region);
    const o = OFF.kvm_userspace_memory_region;
    b.writeUInt32LE(slot, o.slot);
    b.writeUInt32LE(flags, o.flags);
    b.writeBigUInt64LE(gpa, o.guest_phys_addr);
    b.writeBigUInt64LE(BigInt(size), o.memory_size);
    b.writeBigUInt64LE(hva, o.userspace_addr);
    // SAFETY: the kernel copies the struct; the host range [hva, hva+size) must stay mapped until the slot is
    // deleted or the VM fd closed (Machine.stop closes the VM before munmap).
    const r = ffi.ioctlBuf(this.fd, KVM.SET_USER_MEMORY_REGION, b);
    if (r < 0) throw ioctlError('SET_USER_MEMORY_REGION', r, { slot, gpa: `0x${gpa.toString(16)}`, size });
    if (size === 0) this.slots.delete(slot);
    else this.slots.set(slot, { slot, gpa, size, hva, flags });
  }

  /**
   * Where pages written by the VMM itself are recorded (set by the Machine to its GuestMemory): KVM's dirty log
   * only sees guest writes, so getDirtyLog merges these in.
   */
  hostDirty: { setHostTracking(slot: number, on: boolean): void; takeHostDirty(slot: number): Uint8Array | undefined } | undefined;

  /** Turns dirty-page logging on/off for a slot (re-registers it with KVM_MEM_LOG_DIRTY_PAGES). */
  setDirtyLogging(slot: number, on: boolean): void {
    const s = this.slots.get(slot);
    if (!s) throw ioctlError('SET_USER_MEMORY_REGION', -22, { slot, reason: 'no such slot' });
    const flags = on ? s.flags | KVM_MEM.LOG_DIRTY_PAGES : s.flags & ~KVM_MEM.LOG_DIRTY_PAGES;
    this.setMemoryRegion(slot, s.gpa, s.size, s.hva, flags);
    this.hostDirty?.setHostTracking(slot, on);
  }

  /**
   * KVM_GET_DIRTY_LOG: a bitmap (1 bit per 4 KiB page) of pages dirtied since the last call, by the guest (KVM)
   * or by the VMM (`hostDirty`); clears both.
   */
  getDirtyLog(slot: number): Uint8Array {
    const s = this.slots.get(slot);
    if (!s) throw ioctlError('GET_DIRTY_LOG', -22, { slot, reason: 'no such slot' });
    const pages = Math.ceil(s.size / 4096);
    const bitmap = Buffer.alloc(Math.ceil(pages / 64) * 8);
    const arg = Buffer.alloc(SIZE.kvm_dirty_log);
    arg.writeUInt32LE(slot, OFF.kvm_dirty_log.slot);
    // SAFETY: the kernel writes the bitmap during the call; `bitmap` is held by this frame until it returns.
    const addr = ffi.bufferAddress(bitmap);
    arg.writeBigUInt64LE(addr, OFF.kvm_dirty_log.dirty_bitmap);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_DIRTY_LOG, arg);
    if (r < 0) throw ioctlError('GET_DIRTY_LOG', r, { slot });
    const out = new Uint8Array(bitmap.buffer, bitmap.byteOffset, bitmap.byteLength);
    const host = this.hostDirty?.takeHostDirty(slot);
    if (host) for (let i = 0; i < out.length && i < host.length; i++) out[i]! |= host[i]!;
    return out;
  }

  setTssAddr(addr: number): void {
    const r = ffi.ioctlInt(this.fd, KVM.SET_TSS_ADDR, addr);
    if (r < 0) throw ioctlError('SET_TSS_ADDR', r);
  }

  setIdentityMapAddr(addr: bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(addr);
    const r = ffi.ioctlBuf(this.fd, KVM.SET_IDENTITY_MAP_ADDR, b);
    if (r < 0) throw ioctlError('SET_IDENTITY_MAP_ADDR', r);
  }

  /** KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs. Must precede vCPU creation. */
  createIrqchip(): void {
    if (this.irqchip) return;
    const r = ffi.ioctlInt(this.fd, KVM.CREATE_IRQCHIP);
    if (r < 0) throw ioctlError('CREATE_IRQCHIP', r);
    this.irqchip = true;
  }

  /** KVM_CREATE_PIT2 (in-kernel i8254). */
  createPit2(speakerDummy = true): void {
    if (this.pit) return;
    const b = Buffer.alloc(SIZE.kvm_pit_config);
    b.writeUInt32LE(speakerDummy ? KVM_PIT_SPEAKER_DUMMY : 0, OFF.kvm_pit_config.flags);
    const r = ffi.ioctlBuf(this.fd, KVM.CREATE_PIT2, b);
    if (r < 0) throw ioctlError('CREATE_PIT2', r);
    this.pit = true;
  }

  /** KVM_IRQ_LINE: set a GSI's level. */
  irqLine(gsi: number, level: boolean): void {
    const b = this.irqLevel;
    b.writeUInt32LE(gsi, OFF.kvm_irq_level.irq);
    b.writeUInt32LE(level ? 1 : 0, OFF.kvm_irq_level.level);
    const r = ffi.ioctlBuf(this.fd, KVM.IRQ_LINE, b);
    if (r < 0) throw ioctlError('IRQ_LINE', r, { gsi });
  }

  /**
   * KVM_IOEVENTFD: a guest write of `len` bytes to `addr` (PIO when `pio`) signals `fd` without a userspace exit.
   * With `datamatch` only writes of that value do.
   */
  ioeventfd(opts: { fd: number; addr: bigint | number; len: number; pio?: boolean; datamatch?: bigint | number; deassign?: boolean }): void {
    const b = Buffer.alloc(SIZE.kvm_ioeventfd);
    const o = OFF.kvm_ioeventfd;
    let flags = 0;
    if (opts.pio) flags |= KVM_IOEVENTFD_FLAG.PIO;
    if (opts.datamatch !== undefined) flags |= KVM_IOEVENTFD_FLAG.DATAMATCH;
    if (opts.deassign) flags |= KVM_IOEVENTFD_FLAG.DEASSIGN;
    b.writeBigUInt64LE(BigInt(opts.datamatch ?? 0), o.datamatch);
    b.writeBigUInt64LE(BigInt(opts.addr), o.addr);
    b.writeUInt32LE(opts.len, o.len);
    b.writeInt32LE(opts.fd, o.fd);
    b.writeUInt32LE(flags, o.flags);
    const r = ffi.ioctlBuf(this.fd, KVM.IOEVENTFD, b);
    if (r < 0) throw ioctlError('IOEVENTFD', r, { addr: String(opts.addr) });
  }

  /** KVM_IRQFD: signalling `fd` raises GSI `gsi` (edge) without a userspace exit. */
  irqfd(opts: { fd: number; gsi: number; resamplefd?: number; deassign?: boolean }): void {
    const b = Buffer.alloc(SIZE.kvm_irqfd);
    const o = OFF.kvm_irqfd;
    let flags = 0;
    if (opts.deassign) flags |= KVM_IRQFD_FLAG.DEASSIGN;
    if (opts.resamplefd !== undefined) flags |= KVM_IRQFD_FLAG.RESAMPLE;
    b.writeUInt32LE(opts.fd, o.fd);
    b.writeUInt32LE(opts.gsi, o.gsi);
    b.writeUInt32LE(flags, o.flags);
    b.writeUInt32LE(opts.resamplefd ?? 0, o.resamplefd);
    const r = ffi.ioctlBuf(this.fd, KVM.IRQFD, b);
    if (r < 0) throw ioctlError('IRQFD', r, { gsi: opts.gsi });
  }

  /** KVM_GET_IRQCHIP: chip 0 = PIC master, 1 = PIC slave, 2 = IOAPIC. Raw 512-byte state. */
  getIrqchip(chipId: number): Uint8Array {
    const b = Buffer.alloc(SIZE.kvm_irqchip);
    b.writeUInt32LE(chipId, OFF.kvm_irqchip.chip_id);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_IRQCHIP, b);
    if (r < 0) throw ioctlError('GET_IRQCHIP', r, { chipId });
    return new Uint8Array(b.subarray(OFF.kvm_irqchip.chip));
  }

  setIrqchip(chipId: number, state: Uint8Array): void {
    const b = Buffer.alloc(SIZE.kvm_irqchip);
    b.writeUInt32LE(chipId, OFF.kvm_irqchip.chip_id);
    b.set(state.subarray(0, SIZE.kvm_irqchip - OFF.kvm_irqchip.chip), OFF.kvm_irqchip.chip);
    const r = ffi.ioctlBuf(this.fd, KVM.SET_IRQCHIP, b);
    if (r < 0) throw ioctlError('SET_IRQCHIP', r, { chipId });
  }

  getPit2(): Uint8Array {
    const b = Buffer.alloc(SIZE.kvm_pit_state2);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_PIT2, b);
    if (r < 0) throw ioctlError('GET_PIT2', r);
    return new Uint8Array(b);
  }

  setPit2(state: Uint8Array): void {
    const b = Buffer.from(state.subarray(0, SIZE.kvm_pit_state2));
    const r = ffi.ioctlBuf(this.fd, KVM.SET_PIT2, b);
    if (r < 0) throw ioctlError('SET_PIT2', r);
  }

  /** KVM_GET_CLOCK: kvmclock nanoseconds and flags. */
  getClock(): { clock: bigint; flags: number } {
    const b = Buffer.alloc(SIZE.kvm_clock_data);
    const r = ffi.ioctlBuf(this.fd, KVM.GET_CLOCK, b);
    if (r < 0) throw ioctlError('GET_CLOCK', r);
    return { clock: b.readBigUInt64LE(OFF.kvm_clock_data.clock), flags: b.readUInt32LE(OFF.kvm_clock_data.flags) };
  }

  setClock(clock: bigint): void {
    const b = Buffer.alloc(SIZE.kvm_clock_data);
    b.writeBigUInt64LE(clock, OFF.kvm_clock_data.clock);
    const r = ffi.ioctlBuf(this.fd, KVM.SET_CLOCK, b);
    if (r < 0) throw ioctlError('SET_CLOCK', r);
  }

  /** KVM_CHECK_EXTENSION on the VM fd. */
  checkExtension(cap: number): number {
    const r = ffi.ioctlInt(this.fd, 0xae03, cap);
    return r < 0 ? 0 : r;
  }

  /** KVM_ENABLE_CAP on the VM fd. */
  enableCap(cap: number, args: bigint[] = [], flags = 0): void {
    const b = Buffer.alloc(SIZE.kvm_enable_cap);
    b.writeUInt32LE(cap, OFF.kvm_enable_cap.cap);
    b.writeUInt32LE(flags, OFF.kvm_enable_cap.flags);
    args.slice(0, 4).forEach((a, i) => b.writeBigUInt64LE(a, OFF.kvm_enable_cap.args + i * 8));
    const r = ffi.ioctlBuf(this.fd, KVM.ENABLE_CAP, b);
    if (r < 0) throw ioctlError('ENABLE_CAP', r, { cap });
  }

  /** KVM_CREATE_VCPU + mmap of its kvm_run page. */
  createVcpu(index: number): Vcpu {
    const r = ffi.ioctlInt(this.fd, KVM.CREATE_VCPU, index);
    if (r < 0) throw ioctlError('CREATE_VCPU', r, { index });
    return new Vcpu(r, index, this.kvm.vcpuMmapSize());
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    ffi.closeFd(this.fd);
  }
}
