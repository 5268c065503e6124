/*
 * Probe guest: PVH entry, switch to long mode, interrupt stubs, ring-3 entry/exit,
 * AP trampoline and the static GDT / page tables.
 *
 * Boot contract (PVH): 32-bit protected mode, paging off, flat CS/DS, EBX = physical
 * address of struct hvm_start_info. The image is linked and loaded at 1 MiB.
 */
#include "probe.h"

/* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen" ---- */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                     /* namesz ("Xen\0") */
    .long 8                     /* descsz: 64-bit entry address, like Linux's vmlinux */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .quad pvh_start32

/* ---- 32-bit entry ---- */
    .section .text.entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cld
    movl %ebx, start_info_pa    /* remember hvm_start_info (high half stays 0) */
    xorl %esi, %esi             /* ESI = 0: bootstrap processor */

/* Shared by the BSP and the APs (ESI = 1 coming from the trampoline). */
common32:
    lgdt gdt_desc               /* 32-bit lgdt reads limit + low 4 bytes of the base */
    movl %cr4, %eax
    orl $0x20, %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* EFER.LME */
    wrmsr
    movl $0x80010033, %eax      /* PG | WP | NE | ET | MP | PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $start64

/* APs arrive here from the trampoline in flat 32-bit protected mode. */
ap_entry32:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %esi               /* ESI = 1: application processor */
    jmp common32

/* ---- 64-bit entry ---- */
    .code64
start64:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    testl %esi, %esi
    jnz 1f
    movq $bsp_stack_top, %rsp   /* BSP */
    call probe_main             /* does not return */
    jmp halt
1:  movq ap_stack_top(%rip), %rsp   /* AP: stack handed over by the BSP */
    lidt idt_desc(%rip)
    call ap_main
halt:
    cli
    hlt
    jmp halt

/* ---- ring 3 ----
 * u64 run_user(u64 (*fn)(u64), u64 arg, u64 user_stack_top)
 * Runs fn(arg) in ring 3 and returns its result. fn returns into user_ret_ud2, whose
 * #UD brings us back to ring 0 (INT n cannot be used on this host). The #UD stub
 * recognises that RIP and jumps to user_resume with RAX = fn's return value.
 */
    .text
    .globl run_user, user_abort, user_ret_ud2
run_user:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, kernel_saved_rsp(%rip)
    leaq -8(%rdx), %rax         /* user RSP: return address slot, 16-byte ABI alignment */
    movq $user_ret_ud2, %rcx
    movq %rcx, (%rax)           /* fn "returns" to the ud2 */
    pushq $SEL_UDATA            /* SS */
    pushq %rax                  /* RSP */
    pushq $USER_RFLAGS          /* RFLAGS */
    pushq $SEL_UCODE            /* CS */
    pushq %rdi                  /* RIP = fn */
    movq %rsi, %rdi             /* fn's argument */
    movw $SEL_UDATA, %cx
    movw %cx, %ds
    movw %cx, %es
    iretq

user_ret_ud2:
    ud2                         /* ring 3 -> ring 0 */

/* Back in ring 0 on the trap stack: discard it, restore run_user's frame. */
user_resume:
    movq kernel_saved_rsp(%rip), %rsp
    movw $SEL_KDATA, %cx
    movw %cx, %ss
    movw %cx, %ds
    movw %cx, %es
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* void user_abort(u64 value): called by trap() for an allowed ring-3 fault. */
user_abort:
    movq %rdi, %rax
    jmp user_resume

/* ---- interrupt stubs ----
 * Each stub is 32 bytes (isr_table + 32*i): vectors 0..31, then 0x20 (timer) as
 * index 32 and 0xff (spurious) as index 33. They push a dummy error code where the
 * CPU pushes none, then the vector, and jump to isr_common.
 */
    .macro STUB vec, has_err
    .balign 32
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
    .endm

    .balign 32
isr_table:
    .globl isr_table
    STUB 0,0;  STUB 1,0;  STUB 2,0;  STUB 3,0;  STUB 4,0;  STUB 5,0
    .balign 32                  /* vector 6 (#UD): fast path for the ring-3 return */
    cmpq $user_ret_ud2, (%rsp)
    je user_resume
    jmp ud_slow
    STUB 7,0;  STUB 8,1;  STUB 9,0;  STUB 10,1; STUB 11,1; STUB 12,1; STUB 13,1
    STUB 14,1; STUB 15,0; STUB 16,0; STUB 17,1; STUB 18,0; STUB 19,0; STUB 20,0
    STUB 21,1; STUB 22,0; STUB 23,0; STUB 24,0; STUB 25,0; STUB 26,0; STUB 27,0
    STUB 28,0; STUB 29,1; STUB 30,1; STUB 31,0
    STUB 0x20,0
    STUB 0xff,0

ud_slow:
    pushq $0
    pushq $6
isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi             /* struct frame * */
    call trap
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp              /* vector + error code */
    iretq

/* ---- AP trampoline, copied to TRAMPOLINE (0x8000) and started by SIPI vector 0x08 ----
 * Real mode, CS = 0x0800, IP = 0. Absolute addresses are computed for the copy.
 */
    .globl tramp_start, tramp_end
    .code16
tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl tramp_gdt_desc - tramp_start + TRAMPOLINE    /* our GDT, 32-bit base */
    movl %cr0, %eax
    orl $1, %eax                /* CR0.PE */
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $ap_entry32
    .balign 4
tramp_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:
    .code64

/* ---- data ---- */
    .data
    .globl start_info_pa, ap_stack_top, user_rsp0, gdt
    .balign 8
start_info_pa:    .quad 0
ap_stack_top:     .quad 0
kernel_saved_rsp: .quad 0
user_rsp0:        .quad 0

    .balign 16
gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00af9b000000ffff    /* 0x08 code64, DPL 0 */
    .quad 0x00cf93000000ffff    /* 0x10 data, DPL 0 */
    .quad 0x00cff3000000ffff    /* 0x18 data, DPL 3 */
    .quad 0x00affb000000ffff    /* 0x20 code64, DPL 3 */
    .quad 0, 0                  /* 0x28 64-bit TSS, filled in by probe.c */
    .quad 0x00cf9b000000ffff    /* 0x38 code32, DPL 0 (AP trampoline) */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl idt, idt_desc
    .balign 16
idt_desc:
    .word 256 * 16 - 1
    .quad idt

/* Page tables: identity map 0..4 GiB with 2 MiB pages, user-accessible (U/S) so ring 3
 * can touch its code, stack and the MMIO window. 3..4 GiB (MMIO, LAPIC) is uncached. */
    .section .data.pt, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7            /* P | RW | US */
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 1536
    .quad (i << 21) | 0x87      /* P | RW | US | PS (2 MiB) */
    .set i, i + 1
    .endr
    .rept 512
    .quad (i << 21) | 0x9f      /* ... | PWT | PCD */
    .set i, i + 1
    .endr

    .bss
    .balign 16
    .globl idt
idt:
    .skip 256 * 16
    .balign 16
    .skip 16384
bsp_stack_top:
