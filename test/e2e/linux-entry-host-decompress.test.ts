/**
 * KVM check of boot-linux's host decompression hand-over: a tiny synthetic "kernel" ELF (our own few
 * instructions at its e_entry plus a data segment with .bss) is compressed (xz with the BCJ x86 filter, as the
 * kernel build does, or gzip) into a synthetic bzImage. boot-linux decompresses it on the host, loads the
 * PT_LOAD segments at p_paddr and enters at e_entry in long mode with RSI = zero page — what the bzImage's
 * own decompressor would hand over. The entry checks that state and reports through the debug-exit port.
 * With decompress: 'guest' the bzImage's pretend decompressor (startup_64 at +0x200) runs instead and exits 0xEE.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootLinux, { parseVmlinux } from '@kvmkit/plugin-boot-linux';
import { syntheticBzImage, syntheticKernelElf, xzKernelPayload, findGuestKernel } from '@kvmkit/testkit';
import { hasKvm, exitPort, assembleText, irqchipPlugin, runSyntheticKernel } from './helpers.js';

let tools = true;
try {
  for (const t of ['gcc', 'objcopy', 'xz']) execFileSync(t, ['--version'], { stdio: 'ignore' });
} catch {
  tools = false;
  console.warn('[kvmkit e2e] linux-entry-host-decompress: gcc/objcopy/xz missing, skipped');
}

const OK = 0x55;
const GUEST_DECOMPRESSOR = 0xee;
const CMDLINE = 'kvmkit-ok console=none';
const LOAD = 0x1000000;
const DATA = 0x1200000;
const DATA_MAGIC = 'KVMKIT-DATA-SEG!';
const BSS = 0x3000;

// The kernel's startup_64: RSI = boot_params, long mode, identity map. Each failed check exits with its own code.
const ENTRY = `
  .code64
  .globl _start
_start:
.Lentry:
  mov $1, %al;  cmpl $0x53726448, 0x202(%rsi); jne fail       # "HdrS" in the zero page
  mov $2, %al;  cmpb $0xff, 0x210(%rsi); jne fail              # type_of_loader
  mov $3, %al;  testb $0x01, 0x211(%rsi); jz fail               # LOADED_HIGH
  mov $4, %al;  testb $0x02, 0x211(%rsi); jnz fail              # KASLR_FLAG clear (not randomized)
  mov $5, %al;  mov %cs, %bx; cmp $0x10, %bx; jne fail
  mov $6, %al;  mov %ds, %bx; cmp $0x18, %bx; jne fail
  mov $7, %al;  mov %ss, %bx; cmp $0x18, %bx; jne fail
  mov $8, %al;  movl 0x228(%rsi), %edi; cmpl $0x6b6d766b, (%rdi); jne fail   # cmdline "kvmk"
  mov $9, %al;  movl 0x218(%rsi), %edi; test %edi, %edi; jz fail
  mov $10, %al; cmpl $0x37303730, (%rdi); jne fail             # initrd "0707"
  mov $11, %al; cmpl $${DATA + DATA_MAGIC.length + BSS}, %edi; jb fail        # initrd above the kernel's .bss
  mov $12, %al; cmpb $3, 0x1e8(%rsi); jb fail                  # e820 entries
  mov $13, %al; cmpl $1, 0x2d0+16(%rsi); jne fail
  mov $14, %al; mov %cr0, %rbx; bt $31, %rbx; jnc fail          # paging
  mov $15, %al; mov %cr4, %rbx; bt $5, %rbx; jnc fail           # PAE
  mov $16, %al; movabs $0x123456789, %rbx; shr $32, %rbx; cmp $1, %rbx; jne fail   # 64-bit operands: long mode
  mov $17, %al; movabs $0xfffff000, %rbx; mov (%rbx), %rbx      # identity map up to 4 GiB (no fault)
  mov $18, %al; lea .Lentry(%rip), %rbx; cmp $${LOAD}, %rbx; jne fail            # entered at e_entry
  mov $19, %al; mov $${DATA}, %ebx; cmpl $0x4b4d564b, (%rbx); jne fail          # data segment starts "KVMK"
  mov $20, %al; cmpq $0, ${DATA_MAGIC.length}(%rbx); jne fail                   # .bss after it is zero
  mov $21, %al; xor %ebx, %ebx; call sub1; cmp $0x77, %bl; jne fail             # CALL rel32 survived BCJ
  mov $22, %al; jmp.d32 2f; jmp fail
2:
  mov $${OK}, %al
fail:
  out %al, $0xf4
1: hlt
  jmp 1b
sub1:
  mov $0x77, %bl
  ret
`;

let tmp: string;
const assemble = (name: string, src: string) => assembleText(tmp, name, src);

/** vmlinux.bin stand-in: ELF64 x86-64, text at LOAD (entry), data + .bss at DATA, 2 MiB p_align. */
const makeKernelElf = (code: Uint8Array) =>
  syntheticKernelElf([{ paddr: LOAD, data: code }, { paddr: DATA, data: new TextEncoder().encode(DATA_MAGIC), memsz: DATA_MAGIC.length + BSS }], LOAD);

/** A bzImage whose protected-mode code is a pretend decompressor (startup_64 at +0x200 exits 0xEE) + the payload. */
const makeBzImage = (payload: Uint8Array) =>
  syntheticBzImage({
    payload,
    startup64: Uint8Array.of(0xb0, GUEST_DECOMPRESSOR, 0xe6, 0xf4, 0xf4), // mov $0xee,%al; out %al,$0xf4; hlt
    loadflags: 0x01 | 0x02, // LOADED_HIGH, and a stale KASLR_FLAG the loader must clear
    pref: LOAD,
  });

const run = (kernel: string, initrd: string, decompress?: 'auto' | 'host' | 'guest') =>
  runSyntheticKernel({ name: 'entry-hd', cpus: 1, cmdline: CMDLINE, boot: { kernel, initrd, ...(decompress ? { decompress } : {}) } });

describe.skipIf(!hasKvm || !tools)('boot-linux host decompression hand-over on /dev/kvm (synthetic kernel)', () => {
  let initrd: string;
  let elf: Uint8Array;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'kvmkit-linux-entry-hd-'));
    initrd = join(tmp, 'initrd.cpio');
    writeFileSync(initrd, Buffer.concat([Buffer.from('070701'), Buffer.alloc(4090)]));
    elf = makeKernelElf(assemble('entry', ENTRY));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const xzBzImage = (): string => {
    const k = join(tmp, 'bzImage-xz');
    writeFileSync(k, makeBzImage(xzKernelPayload(elf, tmp, 9)));
    return k;
  };

  it('xz payload (BCJ x86 + LZMA2): the kernel entry sees what the decompressor hands over', async () => {
    expect(await run(xzBzImage(), initrd)).toMatchObject({ reason: 'guest-exit', exitCode: OK });
  });

  it('gzip payload, decompress: host', async () => {
    const k = join(tmp, 'bzImage-gz');
    writeFileSync(k, makeBzImage(new Uint8Array(gzipSync(elf))));
    expect(await run(k, initrd, 'host')).toMatchObject({ reason: 'guest-exit', exitCode: OK });
  });

  it("decompress: 'guest' runs the bzImage's own startup_64 instead", async () => {
    expect(await run(xzBzImage(), initrd, 'guest')).toMatchObject({ reason: 'guest-exit', exitCode: GUEST_DECOMPRESSOR });
  });
});

// The fixture kernel, found by the one helper (KVMKIT_GUEST_DIR, ../shared/guest, the project's build); '' = none.
const fixture = findGuestKernel();
const FIXTURE_BZ = fixture?.bzImage ?? '';
const FIXTURE_ELF = fixture?.vmlinux ?? '';
const FIXTURE_RD = fixture?.initrd ?? '';
const haveFixture = existsSync(FIXTURE_BZ) && existsSync(FIXTURE_ELF) && existsSync(FIXTURE_RD);

// The real kernel is never run here (Linux boots belong to linux-boot.test.ts on a quiet host): a beforeRun tap
// checks the prepared machine and aborts the start before any vCPU executes.
describe.skipIf(!hasKvm || !haveFixture)('the fixture bzImage on a real Machine (configure + boot hook, no vCPU run)', () => {
  it('decompresses on the host and prepares vCPU 0 at the vmlinux entry with the segments in guest RAM', async () => {
    const ABORT = 'abort-before-run';
    let seen: { rip: bigint; rsi: bigint; efer: bigint; segmentsEqual: boolean } | undefined;
    const elf = new Uint8Array(readFileSync(FIXTURE_ELF));
    const v = parseVmlinux(elf, FIXTURE_ELF);
    const probe: Plugin = {
      name: 'test-before-run', version: '0.1.0',
      apply(m) {
        m.hooks.beforeRun.tapPromise('test-before-run', async (api) => {
          const regs = api.vcpus[0]!.getRegs();
          const sregs = api.vcpus[0]!.getSregs();
          const mem = api.memory!;
          const segmentsEqual = v.segments.every((s) => Buffer.compare(mem.read(s.paddr, s.filesz), elf.subarray(s.offset, s.offset + s.filesz)) === 0);
          seen = { rip: regs.rip, rsi: regs.rsi, efer: sregs.efer, segmentsEqual };
          throw new Error(ABORT);
        });
      },
    };
    const m = new Machine({
      config: { name: 'fixture-bz', memory: 256, cpus: 2, cmdline: 'console=ttyS0' },
      plugins: [irqchipPlugin(), exitPort(), bootLinux({ kernel: FIXTURE_BZ, initrd: FIXTURE_RD }), probe],
      log: silentLogger(),
    });
    const t0 = performance.now();
    let err: unknown;
    try {
      await m.start();
    } catch (e) {
      err = e;
    } finally {
      await m.stop();
    }
    console.log(`[linux-entry-host-decompress] fixture bzImage: Machine.start up to beforeRun in ${(performance.now() - t0).toFixed(0)} ms (includes host decompression)`);
    expect(String((err as Error)?.message ?? err) + String((err as { cause?: Error })?.cause?.message ?? '')).toContain(ABORT);
    expect(seen).toEqual({ rip: v.entry, rsi: 0x7000n, efer: 0x500n, segmentsEqual: true });
  });
});
