/* Flat guest for the cfloor self-test: RDX port writes to 0xe0, then exits through port 0xf4
 * with the low byte of the counter read back from port 0xe0, so `--arg 42` must exit 42. */
    .code64
    .globl _start
_start:
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 2f
1:  out %al, $0xe0
    dec %rcx
    jnz 1b
2:  in $0xe0, %eax
    out %al, $0xf4
