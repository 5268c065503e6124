/* Flat guest for the cfloor self-test: writes port 0x80, which cfloor does not handle (exit 0x7e). */
    .code64
    .globl _start
_start:
    out %al, $0x80
    out %al, $0xf4
