import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { GuestMemory, defaultMemoryLayout, silentLogger, isKvmkitError, type BootContext, type Vm } from '@kvmkit/kernel';
import { findExecutable, syntheticBzImage, syntheticKernelElf, xzKernelPayload, type SyntheticBzImageOptions, type SyntheticSegment, findGuestKernel } from '@kvmkit/testkit';
import { prepareLinuxBoot, payloadFormat, parseVmlinux, type BootLinuxOptions } from './index.js';

const MiB = 1024 * 1024;
const allZero = (b: Uint8Array) => Buffer.compare(b, Buffer.alloc(b.length)) === 0;
const ZP = 0x7000;
const LOAD = 0x1000000;

const haveXz = findExecutable('xz') !== undefined;
if (!haveXz) console.warn('host-decompress xz cases skipped: install xz-utils');

interface LogRecord { obj: Record<string, unknown>; msg: string }
function ctxFor(memMiB: number, cmdline = 'a=b', logs: LogRecord[] = []): BootContext {
  const log = { ...silentLogger(), info: (obj: Record<string, unknown>, msg: string) => logs.push({ obj, msg }) };
  return {
    config: { name: 't', memory: memMiB, cpus: 1, cmdline },
    memory: GuestMemory.anonymous(memMiB * MiB),
    layout: defaultMemoryLayout(memMiB),
    vm: {} as Vm,
    cpus: 1,
    cmdline,
    log: log as unknown as BootContext['log'],
  };
}

type Seg = SyntheticSegment;
const makeKernelElf = syntheticKernelElf;
const xzPayload = (elf: Uint8Array, dir: string) => xzKernelPayload(elf, dir);
/** A bzImage whose protected-mode part is 0x400 bytes of hlt ("decompressor") + the payload. */
const makeBzImage = (payload: Uint8Array, o: Omit<SyntheticBzImageOptions, 'payload'> = {}) => syntheticBzImage({ ...o, payload });

async function codeOf(p: Promise<unknown>): Promise<{ code: string; reason?: unknown; details: Record<string, unknown>; message: string }> {
  try {
    await p;
  } catch (e) {
    if (isKvmkitError(e)) return { code: e.code, reason: e.details.reason, details: e.details, message: e.message };
    throw e;
  }
  throw new Error('expected a KvmkitError, got success');
}

describe('payload format detection', () => {
  it('recognizes the formats the kernel build can use', () => {
    expect(payloadFormat(Uint8Array.of(0x1f, 0x8b, 8))).toBe('gzip');
    expect(payloadFormat(Uint8Array.of(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0))).toBe('xz');
    expect(payloadFormat(new TextEncoder().encode('BZh9'))).toBe('bzip2');
    expect(payloadFormat(Uint8Array.of(0x5d, 0, 0, 0x80))).toBe('lzma');
    expect(payloadFormat(Uint8Array.of(0x89, 0x4c, 0x5a, 0x4f))).toBe('lzo');
    expect(payloadFormat(Uint8Array.of(0x02, 0x21, 0x4c, 0x18))).toBe('lz4');
    expect(payloadFormat(Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd))).toBe('zstd');
    expect(payloadFormat(Uint8Array.of(1, 2, 3))).toBe('unknown');
  });
});

describe('host decompression of synthetic bzImages', () => {
  let tmp: string;
  const text = new Uint8Array(0x3000).map((_, i) => (i * 31 + (i >> 8)) & 0xff);
  text.set([0xe8, 0x10, 0, 0, 0, 0xe9, 0xf0, 0xff, 0xff, 0xff], 0x100); // CALL/JMP for the BCJ filter
  const data = new TextEncoder().encode('kernel data segment '.repeat(100));
  const segs: Seg[] = [
    { paddr: LOAD, data: text },
    { paddr: LOAD + 0x200000, data, memsz: data.length + 0x5000 }, // with .bss
  ];
  const elf = makeKernelElf(segs, LOAD + 0x40);
  const write = (name: string, b: Uint8Array) => { const p = join(tmp, name); writeFileSync(p, b); return p; };
  let initrd: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'kvmkit-hostdec-'));
    initrd = write('initrd', new Uint8Array(8192).fill(0x37));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const checkLoaded = (ctx: BootContext, r: Awaited<ReturnType<typeof prepareLinuxBoot>>, cmdline: string) => {
    const mem = ctx.memory;
    expect(r.loader).toBe('linux-bzimage');
    const s = r.vcpus[0]!;
    expect(s.regs!.rip).toBe(BigInt(LOAD + 0x40));
    expect(s.regs!.rsi).toBe(BigInt(ZP));
    expect(s.sregs!.cs).toMatchObject({ selector: 0x10, l: 1 });
    expect(s.sregs!.efer).toBe(0x500n);
    expect(s.sregs!.cr0! & 0x80000001n).toBe(0x80000001n);
    expect(Buffer.compare(mem.read(LOAD, text.length), text)).toBe(0);
    expect(Buffer.compare(mem.read(LOAD + 0x200000, data.length), data)).toBe(0);
    expect(mem.read(LOAD + 0x200000 + data.length, 0x5000).every((x) => x === 0)).toBe(true); // bss zeroed
    // nothing of the bzImage's protected-mode code at pref_address beyond the segments: it is not loaded
    expect(mem.readU32(ZP + 0x202)).toBe(0x53726448);
    expect(mem.readU8(ZP + 0x210)).toBe(0xff);
    expect(mem.readU8(ZP + 0x211) & 0x83).toBe(0x81); // LOADED_HIGH | CAN_USE_HEAP, KASLR_FLAG clear
    expect(new TextDecoder().decode(mem.read(mem.readU32(ZP + 0x228), cmdline.length + 1))).toBe(cmdline + '\0');
    const rd = mem.readU32(ZP + 0x218);
    expect(mem.readU32(ZP + 0x21c)).toBe(8192);
    expect(BigInt(rd)).toBeGreaterThanOrEqual(BigInt(LOAD + 0x200000 + data.length + 0x5000));
    expect(mem.read(rd, 8192).every((x) => x === 0x37)).toBe(true);
    expect(mem.readU8(ZP + 0x1e8)).toBeGreaterThanOrEqual(3);
    expect(r.details.kernel).toEqual({ start: BigInt(LOAD), end: BigInt(LOAD + 0x200000 + data.length + 0x5000), entry: BigInt(LOAD + 0x40) });
  };

  it.skipIf(!haveXz)('xz (BCJ x86 + LZMA2): segments at p_paddr, bss zeroed, entry at e_entry with RSI = zero page', async () => {
    const k = write('bz-xz', makeBzImage(xzPayload(elf, tmp), { loadflags: 0x01 | 0x02 }));
    const logs: LogRecord[] = [];
    const ctx = ctxFor(64, 'console=ttyS0 x=1', logs);
    ctx.memory.fill(0x100000, 60 * MiB, 0xaa);
    const r = await prepareLinuxBoot(ctx, { kernel: k, initrd });
    checkLoaded(ctx, r, 'console=ttyS0 x=1');
    expect(r.details.decompress).toMatchObject({ mode: 'host', format: 'xz', decompressedBytes: elf.length });
    expect(logs.find((l) => l.msg === 'bzImage payload decompressed on the host')?.obj).toMatchObject({ format: 'xz', decompressed: elf.length });
  });

  it('gzip: the same hand-over; decompress: host and auto agree', async () => {
    const k = write('bz-gz', makeBzImage(new Uint8Array(gzipSync(elf))));
    for (const decompress of ['auto', 'host'] as const) {
      const ctx = ctxFor(64, 'g=1');
      const r = await prepareLinuxBoot(ctx, { kernel: k, initrd, decompress });
      checkLoaded(ctx, r, 'g=1');
      expect(r.details.decompress).toMatchObject({ mode: 'host', format: 'gzip' });
    }
  });

  it("decompress: 'guest' keeps the 64-bit boot protocol entry (pref_address + 0x200)", async () => {
    const k = write('bz-gz-guest', makeBzImage(new Uint8Array(gzipSync(elf))));
    const ctx = ctxFor(64);
    const r = await prepareLinuxBoot(ctx, { kernel: k, decompress: 'guest' });
    expect(r.vcpus[0]!.regs!.rip).toBe(BigInt(LOAD + 0x200));
    expect(ctx.memory.readU8(LOAD)).toBe(0xf4);
    expect(r.details.decompress).toMatchObject({ mode: 'guest', format: 'gzip' });
  });

  it("zstd/lz4/lzo/bzip2/lzma payloads: 'auto' falls back to the guest with an info line, 'host' names the format", async () => {
    const magics: Record<string, number[]> = { zstd: [0x28, 0xb5, 0x2f, 0xfd], lz4: [0x02, 0x21, 0x4c, 0x18], lzo: [0x89, 0x4c, 0x5a, 0x4f], bzip2: [0x42, 0x5a, 0x68, 0x39], lzma: [0x5d, 0, 0, 0x80] };
    for (const [fmt, m] of Object.entries(magics)) {
      const k = write(`bz-${fmt}`, makeBzImage(new Uint8Array([...m, ...new Uint8Array(100)])));
      const logs: LogRecord[] = [];
      const ctx = ctxFor(64, 'a=b', logs);
      const r = await prepareLinuxBoot(ctx, { kernel: k });
      expect(r.vcpus[0]!.regs!.rip).toBe(BigInt(LOAD + 0x200));
      expect(r.details.decompress).toMatchObject({ mode: 'guest', format: fmt });
      const line = logs.find((l) => l.msg === 'bzImage payload left to the guest decompressor');
      expect(line?.obj).toMatchObject({ format: fmt });
      expect(String(line?.obj.reason)).toContain(fmt);
      const hctx = ctxFor(64);
      const e = await codeOf(prepareLinuxBoot(hctx, { kernel: k, decompress: 'host' }));
      expect(e).toMatchObject({ code: 'KVMKIT_ERR_BOOT_DECOMPRESS', details: { format: fmt, reason: 'unsupported-format' } });
      expect(e.message).toContain(fmt);
      expect(allZero(hctx.memory.read(0, 64 * MiB))).toBe(true);
    }
  });

  it.skipIf(!haveXz)('corrupt or truncated payloads are KVMKIT_ERR_BOOT_DECOMPRESS and write nothing', async () => {
    const p = xzPayload(elf, tmp);
    const flipped = new Uint8Array(p);
    flipped[Math.floor(p.length / 2)]! ^= 0x10;
    const gz = new Uint8Array(gzipSync(elf));
    const gzBad = new Uint8Array(gz);
    gzBad[gz.length - 6]! ^= 0xff; // CRC32 in the gzip trailer
    for (const [name, payload] of [['flip', flipped], ['trunc', p.subarray(0, p.length - 40)], ['gzbad', gzBad], ['gztrunc', gz.subarray(0, gz.length >> 1)]] as const) {
      const k = write(`bz-${name}`, makeBzImage(payload));
      for (const decompress of ['auto', 'host'] as const) {
        const ctx = ctxFor(64);
        expect(await codeOf(prepareLinuxBoot(ctx, { kernel: k, decompress })), `${name} ${decompress}`).toMatchObject({ code: 'KVMKIT_ERR_BOOT_DECOMPRESS' });
        expect(allZero(ctx.memory.read(0, 64 * MiB))).toBe(true);
      }
    }
  });

  it('output larger than RAM is refused while decompressing', async () => {
    const big = makeKernelElf([{ paddr: LOAD, data: new Uint8Array(40 * MiB) }], LOAD);
    const k = write('bz-bomb', makeBzImage(new Uint8Array(gzipSync(big))));
    expect(await codeOf(prepareLinuxBoot(ctxFor(32), { kernel: k }))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_DECOMPRESS', details: { reason: 'too-large' } });
  });

  it('decompressed kernels that cannot be placed as the decompressor would: coded errors', async () => {
    const gzk = (name: string, e: Uint8Array, o?: Parameters<typeof makeBzImage>[1]) => write(name, makeBzImage(new Uint8Array(gzipSync(e)), o));
    const run = (k: string, mem = 64, opts: Partial<BootLinuxOptions> = {}) => codeOf(prepareLinuxBoot(ctxFor(mem), { kernel: k, ...opts }));
    // relocatable kernel linked elsewhere than pref_address: would need relocation → refused
    expect(await run(gzk('reloc-off', elf, { relocatable: true, pref: 0x2000000 }))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-segment' });
    // ... non-relocatable likewise (the decompressor would stop with "Wrong destination address")
    expect(await run(gzk('fixed-off', elf, { pref: 0x2000000 }))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-segment' });
    // relocatable at its link address is fine
    const ok = await prepareLinuxBoot(ctxFor(64), { kernel: gzk('reloc-ok', elf, { relocatable: true }) });
    expect(ok.vcpus[0]!.regs!.rip).toBe(BigInt(LOAD + 0x40));
    // segment beyond RAM
    expect(await run(gzk('beyond', makeKernelElf([{ paddr: LOAD, data: text }, { paddr: 200 * MiB, data }], LOAD)))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_MEMORY' });
    // segment below 1 MiB (would overwrite the zero page / cmdline)
    expect(await run(gzk('low', makeKernelElf([{ paddr: 0, data: text }], 0x10), { pref: 0 }))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-segment' });
    // p_align not a multiple of 2 MiB, entry outside the segments, not an ELF, ELF32
    expect(await run(gzk('align', makeKernelElf([{ paddr: LOAD, data: text, align: 0x1000 }], LOAD)))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-segment' });
    expect(await run(gzk('entry', makeKernelElf([{ paddr: LOAD, data: text }], 0x5000000)))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-segment' });
    expect(await run(gzk('notelf', new Uint8Array(10000).fill(3)))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'unknown-format' });
    const e32 = new Uint8Array(elf);
    e32[4] = 1;
    expect(await run(gzk('elf32', e32))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'elf-class' });
    const trunc = elf.subarray(0, 0x1800); // segment data cut off
    expect(await run(gzk('elftrunc', trunc))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
    // payload_length pointing past the protected-mode kernel: 'host' refuses, 'auto' falls back to the guest
    const badLen = makeBzImage(new Uint8Array(gzipSync(elf)));
    new DataView(badLen.buffer).setUint32(0x24c, 0x10000000, true);
    const kb = write('badlen', badLen);
    expect(await run(kb, 64, { decompress: 'host' })).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-header' });
    expect((await prepareLinuxBoot(ctxFor(64), { kernel: kb })).details.decompress).toMatchObject({ mode: 'guest' });
  });

  it('parseVmlinux reads entry and PT_LOAD segments only', () => {
    const v = parseVmlinux(elf, 'x');
    expect(v.entry).toBe(BigInt(LOAD + 0x40));
    expect(v.segments.map((s) => s.paddr)).toEqual([BigInt(LOAD), BigInt(LOAD + 0x200000)]);
  });
});

// The fixture kernel, found by the one helper (KVMKIT_GUEST_DIR, ../shared/guest, the project's build); '' = none.
const fixture = findGuestKernel();
const FIXTURE_BZ = fixture?.bzImage ?? '';
const FIXTURE_ELF = fixture?.vmlinux ?? '';
const FIXTURE_RD = fixture?.initrd ?? '';
describe.skipIf(!existsSync(FIXTURE_BZ) || !existsSync(FIXTURE_ELF) || !existsSync(FIXTURE_RD))('the fixture bzImage, decompressed on the host', () => {
  it('loads by default (auto → host): the PT_LOAD bytes of the fixture vmlinux at their addresses, entry = its e_entry', async () => {
    const logs: LogRecord[] = [];
    const ctx = ctxFor(256, 'console=ttyS0', logs);
    const t0 = performance.now();
    const r = await prepareLinuxBoot(ctx, { kernel: FIXTURE_BZ, initrd: FIXTURE_RD });
    const total = performance.now() - t0;
    const d = r.details.decompress!;
    expect(d).toMatchObject({ mode: 'host', format: 'xz' });
    console.log(`[boot-linux] fixture bzImage: ${d.compressedBytes} → ${d.decompressedBytes} bytes decompressed in ${d.ms!.toFixed(0)} ms; whole boot hook ${total.toFixed(0)} ms`);
    const elf = new Uint8Array(readFileSync(FIXTURE_ELF));
    const v = parseVmlinux(elf, FIXTURE_ELF);
    expect(r.vcpus[0]!.regs!.rip).toBe(v.entry);
    expect(r.vcpus[0]!.regs!.rsi).toBe(BigInt(ZP));
    for (const s of v.segments) {
      expect(Buffer.compare(ctx.memory.read(s.paddr, s.filesz), elf.subarray(s.offset, s.offset + s.filesz))).toBe(0);
    }
    const bz = readFileSync(FIXTURE_BZ);
    expect(ctx.memory.readU16(ZP + 0x206)).toBe(bz.readUInt16LE(0x206));
    expect(ctx.memory.readU32(ZP + 0x218)).toBeGreaterThan(Number(v.high));
  });
});
