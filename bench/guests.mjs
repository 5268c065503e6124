// Guest programs for the benchmarks, as machine code bytes (flat 64-bit, loaded at 0x100000 by boot-flat and
// by bench/cfloor in flat mode). Entry state: RDI = vCPU index, RSI = vCPU count, RDX = iterations.
// Each vCPU runs its loop, then atomically increments a done-counter at 0x8000; the last one writes 0 to the
// debug-exit port 0xf4. Others spin (the VMM stops them).
const tail = [
  0xb8, 0x01, 0x00, 0x00, 0x00, //        mov eax, 1
  0xf0, 0x0f, 0xc1, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, // lock xadd [0x8000], eax
  0xff, 0xc0, //                          inc eax
  0x39, 0xf0, //                          cmp eax, esi
  0x75, 0x04, //                          jne spin
  0x31, 0xc0, //                          xor eax, eax
  0xe6, 0xf4, //                          out 0xf4, al
  0xeb, 0xfe, //                    spin: jmp spin
];

/** N × `out 0xe0, al` from the entry privilege level (ring 3 with IOPL 3 / TSS bitmap in the benches). */
export function pioLoop() {
  return new Uint8Array([
    0x48, 0x89, 0xd1, //       mov rcx, rdx
    0xe6, 0xe0, //          L: out 0xe0, al
    0x48, 0xff, 0xc9, //       dec rcx
    0x75, 0xf9, //             jnz L
    ...tail,
  ]);
}

/** N × 4-byte MMIO writes to `addr` (default 0xd0000000). */
export function mmioLoop(addr = 0xd0000000) {
  return new Uint8Array([
    0x48, 0x89, 0xd1, //       mov rcx, rdx
    0xbb, addr & 0xff, (addr >>> 8) & 0xff, (addr >>> 16) & 0xff, (addr >>> 24) & 0xff, // mov ebx, addr
    0x89, 0x03, //          L: mov [rbx], eax
    0x48, 0xff, 0xc9, //       dec rcx
    0x75, 0xf9, //             jnz L
    ...tail,
  ]);
}

/** An endless loop (pause/resume and stop tests). */
export function spin() {
  return new Uint8Array([0xeb, 0xfe]);
}
