/** General-purpose registers (struct kvm_regs). All values are 64-bit unsigned as bigint. */
export interface Regs {
  rax: bigint; rbx: bigint; rcx: bigint; rdx: bigint; rsi: bigint; rdi: bigint; rsp: bigint; rbp: bigint;
  r8: bigint; r9: bigint; r10: bigint; r11: bigint; r12: bigint; r13: bigint; r14: bigint; r15: bigint;
  rip: bigint; rflags: bigint;
}
export const REG_NAMES = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'] as const;

/** struct kvm_segment */
export interface Segment {
  base: bigint; limit: number; selector: number; type: number;
  present: number; dpl: number; db: number; s: number; l: number; g: number; avl: number; unusable: number;
}
/** struct kvm_dtable */
export interface DTable { base: bigint; limit: number; }

/** struct kvm_sregs */
export interface Sregs {
  cs: Segment; ds: Segment; es: Segment; fs: Segment; gs: Segment; ss: Segment; tr: Segment; ldt: Segment;
  gdt: DTable; idt: DTable;
  cr0: bigint; cr2: bigint; cr3: bigint; cr4: bigint; cr8: bigint; efer: bigint; apicBase: bigint;
  /** interrupt_bitmap[4] */
  interruptBitmap: bigint[];
}
export const SEGMENT_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;

/** struct kvm_cpuid_entry2 */
export interface CpuidEntry {
  function: number; index: number; flags: number; eax: number; ebx: number; ecx: number; edx: number;
}

export interface MsrEntry { index: number; data: bigint; }

/** KVM_MP_STATE_* */
export const MpState = {
  RUNNABLE: 0, UNINITIALIZED: 1, INIT_RECEIVED: 2, HALTED: 3, SIPI_RECEIVED: 4, STOPPED: 5, CHECK_STOP: 6, OPERATING: 7, LOAD: 8,
} as const;

/** What a boot/firmware plugin wants a vCPU to start with. Unset fields keep KVM's reset values. */
export interface VcpuBootState {
  regs?: Partial<Regs>;
  /** Merged over the vCPU's current sregs (each segment/table replaced whole). */
  sregs?: Partial<Sregs>;
  msrs?: MsrEntry[];
  /** Force an MP state (e.g. RUNNABLE for a VMM-started AP). */
  mpState?: number;
}
