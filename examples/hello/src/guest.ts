import { Asm } from './asm.js';

/** Address of the spinlock that keeps lines from different vCPUs apart. */
export const LOCK_ADDR = 0x8100;

/**
 * The hello guest, for boot-flat in ring 0 (RDI = vCPU index, RSI = vCPU count). Each vCPU takes a spinlock,
 * prints "Hello from vCPU <i> of <n>" on the 16550 at 0x3f8 (THR, no interrupts needed), releases the lock and
 * halts. With no in-kernel irqchip HLT exits to the VMM; when every vCPU has halted the VM stops (exit code 0).
 */
export function helloImage(greeting = 'Hello from vCPU'): Uint8Array {
  if (!/^[\x20-\x7e]{1,64}$/.test(greeting)) throw new Error('greeting must be 1-64 printable ASCII characters');
  const a = new Asm();
  a.label('lock')
    .db(0xf0, 0x48, 0x0f, 0xba, 0x2c, 0x25).d32(LOCK_ADDR).db(0x00) // lock bts qword [LOCK_ADDR], 0
    .jnc8('locked')
    .db(0xf3, 0x90) //                                                 pause
    .jmp8('lock')
    .label('locked')
    .db(0xba).d32(0x3f8) //                                            mov edx, 0x3f8
    .leaRbx('msg').call('puts')
    .db(0x89, 0xf8).call('putnum') //                                  mov eax, edi ; vCPU index
    .leaRbx('of').call('puts')
    .db(0x89, 0xf0).call('putnum') //                                  mov eax, esi ; vCPU count
    .db(0xb0, 0x0a, 0xee) //                                           mov al, '\n' ; out dx, al
    .db(0x48, 0xc7, 0x04, 0x25).d32(LOCK_ADDR).d32(0) //               mov qword [LOCK_ADDR], 0
    .label('halt')
    .db(0xf4) //                                                       hlt
    .jmp8('halt')
    // puts: print the NUL-terminated string at rbx.
    .label('puts')
    .db(0x8a, 0x03) //                                                 mov al, [rbx]
    .db(0x84, 0xc0) //                                                 test al, al
    .jz8('puts_end')
    .db(0xee) //                                                       out dx, al
    .db(0x48, 0xff, 0xc3) //                                           inc rbx
    .jmp8('puts')
    .label('puts_end')
    .db(0xc3) //                                                       ret
    // putnum: print eax (0..255) in decimal.
    .label('putnum')
    .db(0xb1, 0x64, 0xf6, 0xf1) //                                     mov cl, 100 ; div cl  (al = q, ah = r)
    .db(0x88, 0xe5) //                                                 mov ch, ah
    .db(0x84, 0xc0).jz8('tens') //                                     test al, al ; jz tens
    .db(0x04, 0x30, 0xee) //                                           add al, '0' ; out dx, al
    .db(0xb4, 0x01) //                                                 mov ah, 1   (printed a digit)
    .jmp8('tens2')
    .label('tens')
    .db(0xb4, 0x00) //                                                 mov ah, 0
    .label('tens2')
    .db(0x88, 0xe3) //                                                 mov bl, ah  (bl = leading digit printed)
    .db(0x0f, 0xb6, 0xc5) //                                           movzx eax, ch
    .db(0xb1, 0x0a, 0xf6, 0xf1) //                                     mov cl, 10 ; div cl
    .db(0x88, 0xe5) //                                                 mov ch, ah
    .db(0x08, 0xc3) //                                                 or bl, al
    .jz8('ones') //                                                    no tens digit and nothing before it
    .db(0x04, 0x30, 0xee) //                                           add al, '0' ; out dx, al
    .label('ones')
    .db(0x88, 0xe8, 0x04, 0x30, 0xee) //                               mov al, ch ; add al, '0' ; out dx, al
    .db(0xc3) //                                                       ret
    .label('msg').ascii(`${greeting} `).db(0)
    .label('of').ascii(' of ').db(0);
  return a.assemble();
}
