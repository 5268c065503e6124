/* Flat guest: like pio-loop.S with 4-byte MMIO writes to 0xd0000000 (reads return the counter). */
    .code64
    .globl _start
_start:
    mov $0xd0000000, %r8d       /* zero-extended to 64 bits */
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 2f
1:  movl %ecx, (%r8)            /* one exit per iteration */
    dec %rcx
    jnz 1b
2:  test %rdi, %rdi
    jnz 5f
    mov %rsi, %rbx
    imul %rdx, %rbx
3:  movl (%r8), %eax
    cmp %ebx, %eax
    jb 3b
    jne 4f
    xor %eax, %eax
    out %al, $0xf4
4:  mov $1, %al
    out %al, $0xf4
5:  mov %cs, %ax
    test $3, %al
    jnz 6f
    hlt
6:  pause
    jmp 6b
