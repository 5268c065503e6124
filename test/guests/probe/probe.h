/* Constants shared by entry.S and probe.c. */
#ifndef PROBE_H
#define PROBE_H

#define SEL_KCODE   0x08    /* 64-bit code, DPL 0 */
#define SEL_KDATA   0x10    /* data, DPL 0 */
#define SEL_UDATA   0x1b    /* data, DPL 3 (0x18 | RPL 3) */
#define SEL_UCODE   0x23    /* 64-bit code, DPL 3 (0x20 | RPL 3) */
#define SEL_TSS     0x28    /* 64-bit TSS (16-byte descriptor) */
#define SEL_CODE32  0x38    /* 32-bit code, DPL 0 (AP trampoline) */

#define TRAMPOLINE  0x8000  /* AP real-mode trampoline copy; SIPI vector 0x08 */
#define USER_RFLAGS 0x3002  /* IOPL 3, IF 0 (the nested-PVM host ignores IOPL in ring 3; the TSS I/O bitmap is what lets ring 3 do port I/O) */

#ifndef __ASSEMBLER__
#include <stdint.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;

/* Register frame built by the interrupt stubs in entry.S (lowest address first). */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;   /* pushed by the CPU */
};

/* entry.S */
extern u64 start_info_pa;
extern u64 ap_stack_top;
extern u64 user_rsp0;
extern u64 gdt[];
extern char tramp_start[], tramp_end[];
extern char isr_table[];            /* 34 stubs, see entry.S */
u64 run_user(u64 (*fn)(u64), u64 arg, u64 user_stack_top);
__attribute__((noreturn)) void user_abort(u64 value);

/* probe.c */
void trap(struct frame *f);
void probe_main(void);
void ap_main(void);
#endif
#endif
