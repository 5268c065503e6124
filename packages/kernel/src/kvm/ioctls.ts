/**
 * The one table of KVM ioctl numbers and struct layouts (x86_64). Every number and offset here is checked
 * by `ioctls.test.ts` against a C program compiled with <linux/kvm.h>, so nothing is guessed.
 */
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;
const KVMIO = 0xae;

function ioc(dir: number, nr: number, size: number): number {
  return ((dir << 30) | (KVMIO << 8) | nr | (size << 16)) >>> 0;
}
const IO = (nr: number) => ioc(IOC_NONE, nr, 0);
const IOR = (nr: number, size: number) => ioc(IOC_READ, nr, size);
const IOW = (nr: number, size: number) => ioc(IOC_WRITE, nr, size);
const IOWR = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, nr, size);

/** Struct sizes (bytes). */
export const SIZE = {
  kvm_regs: 144,
  kvm_sregs: 312,
  kvm_segment: 24,
  kvm_dtable: 16,
  kvm_fpu: 416,
  kvm_lapic_state: 1024,
  kvm_vcpu_events: 64,
  kvm_mp_state: 4,
  kvm_irq_level: 8,
  kvm_ioeventfd: 64,
  kvm_irqfd: 32,
  kvm_dirty_log: 16,
  kvm_userspace_memory_region: 32,
  kvm_pit_config: 64,
  kvm_irqchip: 520,
  kvm_pit_state2: 112,
  kvm_clock_data: 48,
  kvm_xsave: 4096,
  kvm_xcrs: 392,
  kvm_debugregs: 128,
  kvm_msrs: 8,
  kvm_msr_entry: 16,
  kvm_cpuid2: 8,
  kvm_cpuid_entry2: 40,
  kvm_msr_list: 4,
  kvm_enable_cap: 104,
  kvm_run_io: 16,
  kvm_run_mmio: 24,
  /** Header of struct kvm_nested_state (flags, format, size, hdr union); the data follows up to `size`. */
  kvm_nested_state: 128,
} as const;

/** Field offsets (bytes) of the structs we read and write by hand. */
export const OFF = {
  kvm_run: {
    request_interrupt_window: 0,
    immediate_exit: 1,
    exit_reason: 8,
    ready_for_interrupt_injection: 12,
    if_flag: 13,
    flags: 14,
    cr8: 16,
    apic_base: 24,
    /** union start */
    io_direction: 32,
    io_size: 33,
    io_port: 34,
    io_count: 36,
    io_data_offset: 40,
    mmio_phys_addr: 32,
    mmio_data: 40,
    mmio_len: 48,
    mmio_is_write: 52,
    fail_entry_hardware_entry_failure_reason: 32,
    fail_entry_cpu: 40,
    internal_suberror: 32,
    internal_ndata: 36,
    internal_data: 40,
    system_event_type: 32,
    system_event_ndata: 36,
    system_event_data: 40,
  },
  kvm_segment: { base: 0, limit: 8, selector: 12, type: 14, present: 15, dpl: 16, db: 17, s: 18, l: 19, g: 20, avl: 21, unusable: 22 },
  kvm_sregs: {
    cs: 0, ds: 24, es: 48, fs: 72, gs: 96, ss: 120, tr: 144, ldt: 168, gdt: 192, idt: 208,
    cr0: 224, cr2: 232, cr3: 240, cr4: 248, cr8: 256, efer: 264, apic_base: 272, interrupt_bitmap: 280,
  },
  kvm_userspace_memory_region: { slot: 0, flags: 4, guest_phys_addr: 8, memory_size: 16, userspace_addr: 24 },
  kvm_irq_level: { irq: 0, level: 4 },
  kvm_ioeventfd: { datamatch: 0, addr: 8, len: 16, fd: 20, flags: 24 },
  kvm_irqfd: { fd: 0, gsi: 4, flags: 8, resamplefd: 12 },
  kvm_dirty_log: { slot: 0, dirty_bitmap: 8 },
  kvm_pit_config: { flags: 0 },
  kvm_irqchip: { chip_id: 0, chip: 8 },
  kvm_clock_data: { clock: 0, flags: 8 },
  kvm_msrs: { nmsrs: 0, entries: 8 },
  kvm_msr_entry: { index: 0, data: 8 },
  kvm_cpuid2: { nent: 0, entries: 8 },
  kvm_cpuid_entry2: { function: 0, index: 4, flags: 8, eax: 12, ebx: 16, ecx: 20, edx: 24 },
  kvm_mp_state: { mp_state: 0 },
  kvm_enable_cap: { cap: 0, flags: 4, args: 8 },
  kvm_vcpu_events: { exception: 0, interrupt: 8, nmi: 12, sipi_vector: 16, flags: 20, smi: 24 },
  kvm_nested_state: { flags: 0, format: 2, size: 4, hdr: 8 },
} as const;

export const KVM = {
  // system ioctls
  GET_API_VERSION: IO(0x00),
  CREATE_VM: IO(0x01),
  GET_MSR_INDEX_LIST: IOWR(0x02, SIZE.kvm_msr_list),
  CHECK_EXTENSION: IO(0x03),
  GET_VCPU_MMAP_SIZE: IO(0x04),
  GET_SUPPORTED_CPUID: IOWR(0x05, SIZE.kvm_cpuid2),
  // vm ioctls
  CREATE_VCPU: IO(0x41),
  GET_DIRTY_LOG: IOW(0x42, SIZE.kvm_dirty_log),
  SET_USER_MEMORY_REGION: IOW(0x46, SIZE.kvm_userspace_memory_region),
  SET_TSS_ADDR: IO(0x47),
  SET_IDENTITY_MAP_ADDR: IOW(0x48, 8),
  CREATE_IRQCHIP: IO(0x60),
  IRQ_LINE: IOW(0x61, SIZE.kvm_irq_level),
  GET_IRQCHIP: IOWR(0x62, SIZE.kvm_irqchip),
  SET_IRQCHIP: IOR(0x63, SIZE.kvm_irqchip),
  IRQFD: IOW(0x76, SIZE.kvm_irqfd),
  CREATE_PIT2: IOW(0x77, SIZE.kvm_pit_config),
  IOEVENTFD: IOW(0x79, SIZE.kvm_ioeventfd),
  SET_CLOCK: IOW(0x7b, SIZE.kvm_clock_data),
  GET_CLOCK: IOR(0x7c, SIZE.kvm_clock_data),
  GET_PIT2: IOR(0x9f, SIZE.kvm_pit_state2),
  SET_PIT2: IOW(0xa0, SIZE.kvm_pit_state2),
  ENABLE_CAP: IOW(0xa3, SIZE.kvm_enable_cap),
  // vcpu ioctls
  RUN: IO(0x80),
  GET_REGS: IOR(0x81, SIZE.kvm_regs),
  SET_REGS: IOW(0x82, SIZE.kvm_regs),
  GET_SREGS: IOR(0x83, SIZE.kvm_sregs),
  SET_SREGS: IOW(0x84, SIZE.kvm_sregs),
  GET_MSRS: IOWR(0x88, SIZE.kvm_msrs),
  SET_MSRS: IOW(0x89, SIZE.kvm_msrs),
  GET_FPU: IOR(0x8c, SIZE.kvm_fpu),
  SET_FPU: IOW(0x8d, SIZE.kvm_fpu),
  GET_LAPIC: IOR(0x8e, SIZE.kvm_lapic_state),
  SET_LAPIC: IOW(0x8f, SIZE.kvm_lapic_state),
  SET_CPUID2: IOW(0x90, SIZE.kvm_cpuid2),
  GET_CPUID2: IOWR(0x91, SIZE.kvm_cpuid2),
  GET_MP_STATE: IOR(0x98, SIZE.kvm_mp_state),
  SET_MP_STATE: IOW(0x99, SIZE.kvm_mp_state),
  GET_VCPU_EVENTS: IOR(0x9f, SIZE.kvm_vcpu_events),
  SET_VCPU_EVENTS: IOW(0xa0, SIZE.kvm_vcpu_events),
  GET_DEBUGREGS: IOR(0xa1, SIZE.kvm_debugregs),
  SET_DEBUGREGS: IOW(0xa2, SIZE.kvm_debugregs),
  GET_XSAVE: IOR(0xa4, SIZE.kvm_xsave),
  SET_XSAVE: IOW(0xa5, SIZE.kvm_xsave),
  GET_XCRS: IOR(0xa6, SIZE.kvm_xcrs),
  SET_XCRS: IOW(0xa7, SIZE.kvm_xcrs),
  GET_NESTED_STATE: IOWR(0xbe, SIZE.kvm_nested_state),
  SET_NESTED_STATE: IOW(0xbf, SIZE.kvm_nested_state),
} as const;

export const KVM_CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  PIT: 11,
  MP_STATE: 14,
  SYNC_MMU: 16,
  IOMMU: 18,
  IRQ_ROUTING: 25,
  SET_IDENTITY_MAP_ADDR: 37,
  IRQFD: 32,
  PIT2: 33,
  SET_BOOT_CPU_ID: 34,
  PIT_STATE2: 35,
  IOEVENTFD: 36,
  ADJUST_CLOCK: 39,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  XSAVE: 55,
  XCRS: 56,
  TSC_CONTROL: 60,
  MAX_VCPUS: 66,
  IMMEDIATE_EXIT: 136,
  NESTED_STATE: 157,
  X86_DISABLE_EXITS: 143,
} as const;

/** Memory region flags. */
export const KVM_MEM = { LOG_DIRTY_PAGES: 1, READONLY: 2 } as const;
export const KVM_IOEVENTFD_FLAG = { DATAMATCH: 1, PIO: 2, DEASSIGN: 4 } as const;
export const KVM_IRQFD_FLAG = { DEASSIGN: 1, RESAMPLE: 2 } as const;
export const KVM_PIT_SPEAKER_DUMMY = 1;
export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;
export const KVM_API_VERSION = 12;
