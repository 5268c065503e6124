/* Flat guest (boot-flat / cfloor flat): every vCPU writes port 0xe0 RDX times; vCPU 0 then
 * reads the counter (in 0xe0) until it equals cpus*RDX and exits through port 0xf4 with 0
 * (1 if the counter overshoots). Other vCPUs halt (ring 0) or spin (ring 3). */
    .code64
    .globl _start
_start:
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 2f
1:  out %al, $0xe0              /* one exit per iteration */
    dec %rcx
    jnz 1b
2:  test %rdi, %rdi
    jnz 5f
    mov %rsi, %rbx
    imul %rdx, %rbx             /* expected = cpus * iterations (low 32 bits compared) */
3:  in $0xe0, %eax
    cmp %ebx, %eax
    jb 3b
    jne 4f
    xor %eax, %eax
    out %al, $0xf4              /* pass */
4:  mov $1, %al
    out %al, $0xf4              /* fail */
5:  mov %cs, %ax
    test $3, %al
    jnz 6f
    hlt
6:  pause
    jmp 6b
