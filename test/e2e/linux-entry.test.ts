/**
 * Fast KVM checks of boot-linux's hand-over to a kernel: tiny synthetic "kernels" (a bzImage whose 64-bit
 * entry and a PVH ELF whose 32-bit entry are our own few instructions, assembled here with gcc) check the
 * state the boot protocols promise — registers, segments, paging, zero page / hvm_start_info, cmdline,
 * initrd, e820 — and report through the debug-exit port 0xf4. A real Linux boot is linux-boot.test.ts (slow).
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { syntheticBzImage } from '@kvmkit/testkit';
import { hasKvm, assembleText, runSyntheticKernel } from './helpers.js';

let gcc = true;
try {
  execFileSync('gcc', ['--version'], { stdio: 'ignore' });
  execFileSync('objcopy', ['--version'], { stdio: 'ignore' });
} catch {
  gcc = false;
  console.warn('[kvmkit e2e] linux-entry: gcc/objcopy missing, synthetic kernel tests skipped');
}

const OK = 0x55;
const CMDLINE = 'kvmkit-ok console=none';

// 64-bit entry (bzImage): RSI = zero page. Each failed check exits with its own code.
const ENTRY64 = `
  .code64
  .globl _start
_start:
.Lentry:
  mov $1, %al;  cmpl $0x53726448, 0x202(%rsi); jne fail      # "HdrS" copied into the zero page
  mov $2, %al;  cmpb $0xff, 0x210(%rsi); jne fail             # type_of_loader
  mov $3, %al;  testb $0x01, 0x211(%rsi); jz fail              # LOADED_HIGH
  mov $4, %al;  mov %cs, %bx; cmp $0x10, %bx; jne fail        # __BOOT_CS
  mov $5, %al;  mov %ds, %bx; cmp $0x18, %bx; jne fail        # __BOOT_DS
  mov $6, %al;  mov %ss, %bx; cmp $0x18, %bx; jne fail
  mov $7, %al;  movl 0x228(%rsi), %edi; cmpl $0x6b6d766b, (%rdi); jne fail   # cmdline "kvmk"
  mov $8, %al;  movl 0x218(%rsi), %edi; test %edi, %edi; jz fail
  mov $9, %al;  cmpl $0x37303730, (%rdi); jne fail            # initrd starts with "0707" (cpio newc)
  mov $10, %al; cmpb $3, 0x1e8(%rsi); jb fail                 # at least 3 e820 entries
  mov $11, %al; cmpl $1, 0x2d0+16(%rsi); jne fail              # e820[0] usable
  mov $12, %al; mov %cr0, %rbx; bt $31, %rbx; jnc fail         # paging on
  mov $13, %al; movabs $0xfffff000, %rbx; mov (%rbx), %rbx     # identity map reaches 4 GiB - 4 KiB (no fault = ok)
  mov $14, %al; lea .Lentry(%rip), %rbx; movl 0x214(%rsi), %ecx; add $0x200, %rcx; cmp %rcx, %rbx; jne fail  # RIP = load + 0x200
  mov $${OK}, %al
fail:
  out %al, $0xf4
1: hlt
  jmp 1b
`;

// 32-bit PVH entry: EBX = hvm_start_info, paging off.
const ENTRY32 = `
  .code32
  .globl _start
_start:
  mov $1, %al;  cmpl $0x336ec578, (%ebx); jne fail           # magic
  mov $2, %al;  cmpl $1, 4(%ebx); jb fail                     # version >= 1
  mov $3, %al;  movl 24(%ebx), %edi; cmpl $0x6b6d766b, (%edi); jne fail   # cmdline "kvmk"
  mov $4, %al;  cmpl $1, 12(%ebx); jne fail                   # one module
  mov $5, %al;  movl 16(%ebx), %edi; movl (%edi), %edi; cmpl $0x37303730, (%edi); jne fail  # initrd
  mov $6, %al;  cmpl $3, 48(%ebx); jb fail                     # memmap entries
  mov $7, %al;  movl 40(%ebx), %edi; cmpl $1, 16(%edi); jne fail  # memmap[0] RAM
  mov $8, %al;  mov %cr0, %ecx; bt $31, %ecx; jc fail          # paging off
  mov $9, %al;  bt $0, %ecx; jnc fail                          # protected mode
  mov $10, %al; mov %cs, %cx; cmp $0x10, %cx; jne fail
  mov $11, %al; mov %ds, %cx; cmp $0x18, %cx; jne fail
  mov $12, %al; str %cx; test %cx, %cx; jz fail                # a TSS is loaded
  mov $13, %al; cmpl $0x5f504d5f, 0xf0000; jne fail            # MP floating pointer "_MP_"
  mov $${OK}, %al
fail:
  out %al, $0xf4
1: hlt
  jmp 1b
`;

let tmp: string;
const assemble = (name: string, src: string) => assembleText(tmp, name, src);

/** A minimal bzImage: one setup sector, protocol 2.15, XLF_KERNEL_64, `code` at payload + 0x200. */
const makeBzImage = (code: Uint8Array) => syntheticBzImage({ startup64: code, initSize: 0x100000 });

/** A minimal ELF64 with one PT_LOAD at 1 MiB and a Xen PHYS32_ENTRY note pointing at it. */
function makePvhElf(code: Uint8Array): Uint8Array {
  const load = 0x100000;
  const phoff = 64, codeOff = 0x1000, noteOff = 0x100;
  const note = new Uint8Array(12 + 4 + 8);
  const ndv = new DataView(note.buffer);
  ndv.setUint32(0, 4, true); ndv.setUint32(4, 8, true); ndv.setUint32(8, 18, true);
  note.set([0x58, 0x65, 0x6e, 0], 12);
  ndv.setBigUint64(16, BigInt(load), true);
  const img = new Uint8Array(codeOff + code.length);
  const dv = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
  dv.setUint16(16, 2, true); dv.setUint16(18, 62, true); dv.setUint32(20, 1, true);
  dv.setBigUint64(24, BigInt(load), true); dv.setBigUint64(32, BigInt(phoff), true);
  dv.setUint16(52, 64, true); dv.setUint16(54, 56, true); dv.setUint16(56, 2, true);
  const ph = (i: number, type: number, off: number, paddr: number, size: number, memsz: number) => {
    const p = phoff + i * 56;
    dv.setUint32(p, type, true); dv.setUint32(p + 4, 5, true);
    dv.setBigUint64(p + 8, BigInt(off), true); dv.setBigUint64(p + 16, BigInt(paddr), true); dv.setBigUint64(p + 24, BigInt(paddr), true);
    dv.setBigUint64(p + 32, BigInt(size), true); dv.setBigUint64(p + 40, BigInt(memsz), true); dv.setBigUint64(p + 48, 4n, true);
  };
  ph(0, 1, codeOff, load, code.length, code.length + 0x1000); // with a .bss page
  ph(1, 4, noteOff, 0, note.length, note.length);
  img.set(note, noteOff);
  img.set(code, codeOff);
  return img;
}

const run = (kernel: string, initrd: string, cpus: number) => runSyntheticKernel({ name: 'entry', cpus, cmdline: CMDLINE, boot: { kernel, initrd } });

describe.skipIf(!hasKvm || !gcc)('boot-linux hand-over on /dev/kvm (synthetic kernels)', () => {
  let initrd: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'kvmkit-linux-entry-'));
    initrd = join(tmp, 'initrd.cpio');
    writeFileSync(initrd, Buffer.concat([Buffer.from('070701'), Buffer.alloc(4090)]));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('bzImage: 64-bit entry sees the state of the 64-bit boot protocol', async () => {
    const k = join(tmp, 'bzImage');
    writeFileSync(k, makeBzImage(assemble('entry64', ENTRY64)));
    expect(await run(k, initrd, 2)).toMatchObject({ reason: 'guest-exit', exitCode: OK });
  });

  it('PVH: 32-bit entry sees hvm_start_info, cmdline, initrd, memmap and the MP table', async () => {
    const k = join(tmp, 'vmlinux');
    writeFileSync(k, makePvhElf(assemble('entry32', ENTRY32)));
    expect(await run(k, initrd, 2)).toMatchObject({ reason: 'guest-exit', exitCode: OK });
  });
});
