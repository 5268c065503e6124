import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestMemory, createHooks, tapOnly, defaultMemoryLayout, silentLogger, isKvmkitError, type BootContext, type MachineApi, type Vm, type BootResult } from '@kvmkit/kernel';
import { findGuestKernel, guestKernelHelp } from '@kvmkit/testkit';
import bootLinux, { prepareLinuxBoot, type BootLinuxOptions } from './index.js';
import { buildE820, writeMpTable, checksum, ADDR } from './tables.js';

const MiB = 1024 * 1024;
const gk = findGuestKernel();
const haveKernels = !!(gk?.bzImage && gk?.vmlinux && gk?.initrd);
if (!haveKernels) console.warn(`boot-linux image tests skipped: ${guestKernelHelp()}`);

function ctxFor(memMiB: number, cpus: number, cmdline: string): BootContext {
  return {
    config: { name: 't', memory: memMiB, cpus, cmdline },
    memory: GuestMemory.anonymous(memMiB * MiB),
    layout: defaultMemoryLayout(memMiB),
    vm: {} as Vm,
    cpus,
    cmdline,
    log: silentLogger(),
  };
}

/** Runs the plugin the way the kernel would: apply() on a machine with real hooks, then the boot hook. */
async function boot(options: BootLinuxOptions, ctx: BootContext): Promise<BootResult | undefined> {
  const hooks = createHooks();
  const plugin = bootLinux(options);
  plugin.validateOptions!(plugin.options);
  const machine = { name: 't', hooks: tapOnly(hooks), log: silentLogger(), config: ctx.config } as unknown as MachineApi;
  await plugin.apply(machine, { log: silentLogger(), options: plugin.options });
  return hooks.boot.promise(ctx);
}

async function codeOf(p: Promise<unknown>): Promise<{ code: string; reason?: unknown; details: Record<string, unknown> }> {
  try {
    await p;
  } catch (e) {
    if (isKvmkitError(e)) return { code: e.code, reason: e.details.reason, details: e.details };
    throw e;
  }
  throw new Error('expected a KvmkitError, got success');
}

/** Translates a virtual address through the guest's 4-level page tables; fails on 1 GiB pages. */
function translate(mem: GuestMemory, cr3: bigint, va: bigint): bigint {
  const idx = (shift: bigint) => Number((va >> shift) & 0x1ffn);
  const pml4e = mem.readU64(cr3 + BigInt(idx(39n) * 8));
  expect(pml4e & 1n).toBe(1n);
  const pdpte = mem.readU64((pml4e & ~0xfffn) + BigInt(idx(30n) * 8));
  expect(pdpte & 1n).toBe(1n);
  expect(pdpte & 0x80n).toBe(0n); // no 1 GiB pages
  const pde = mem.readU64((pdpte & ~0xfffn) + BigInt(idx(21n) * 8));
  expect(pde & 0x81n).toBe(0x81n); // present, 2 MiB page
  return (pde & ~0x1fffffn & ((1n << 52n) - 1n)) | (va & 0x1fffffn);
}

/** Scans 0xf0000-0xfffff for the MP floating pointer and checks both checksums; returns the parsed table. */
function readMpTable(mem: GuestMemory) {
  let fp = -1;
  for (let a = 0xf0000; a < 0x100000; a += 16) {
    if (new TextDecoder().decode(mem.read(a, 4)) === '_MP_') { fp = a; break; }
  }
  expect(fp).toBeGreaterThan(0);
  expect(mem.readU8(fp + 8)).toBe(1);
  expect(mem.read(fp, 16).reduce((s, x) => (s + x) & 0xff, 0)).toBe(0);
  const cfg = mem.readU32(fp + 4);
  expect(new TextDecoder().decode(mem.read(cfg, 4))).toBe('PCMP');
  const len = mem.readU16(cfg + 4);
  expect(mem.read(cfg, len).reduce((s, x) => (s + x) & 0xff, 0)).toBe(0);
  expect(mem.readU32(cfg + 36)).toBe(0xfee00000);
  const count = mem.readU16(cfg + 34);
  const cpus: Array<{ apic: number; flags: number }> = [];
  const ioapics: Array<{ id: number; addr: number }> = [];
  const ints: Array<{ type: number; irq: number; pin: number; apic: number }> = [];
  const lints: Array<{ type: number; dest: number; lint: number }> = [];
  let p = cfg + 44;
  for (let i = 0; i < count; i++) {
    const t = mem.readU8(p);
    if (t === 0) { cpus.push({ apic: mem.readU8(p + 1), flags: mem.readU8(p + 3) }); p += 20; continue; }
    if (t === 2) ioapics.push({ id: mem.readU8(p + 1), addr: mem.readU32(p + 4) });
    if (t === 3) ints.push({ type: mem.readU8(p + 1), irq: mem.readU8(p + 5), apic: mem.readU8(p + 6), pin: mem.readU8(p + 7) });
    if (t === 4) lints.push({ type: mem.readU8(p + 1), dest: mem.readU8(p + 6), lint: mem.readU8(p + 7) });
    expect(t).toBeLessThanOrEqual(4);
    p += 8;
  }
  expect(p - cfg).toBe(len);
  return { fp, cpus, ioapics, ints, lints };
}

function readE820(mem: GuestMemory, at: number, n: number, stride: number) {
  return Array.from({ length: n }, (_, i) => ({ addr: mem.readU64(at + i * stride), size: mem.readU64(at + i * stride + 8), type: mem.readU32(at + i * stride + 16) }));
}

const expectedE820 = (memMiB: number) => [
  { addr: 0n, size: 0x9fc00n, type: 1 },
  { addr: 0x9fc00n, size: 0x100000n - 0x9fc00n, type: 2 },
  { addr: 0x100000n, size: BigInt(memMiB * MiB) - 0x100000n, type: 1 },
  { addr: 0xc0000000n, size: 0x40000000n, type: 2 },
];

describe('tables (no images)', () => {
  it('e820 splits low RAM around the EBDA/BIOS area and keeps RAM above 4 GiB', () => {
    expect(buildE820(defaultMemoryLayout(128))).toEqual(expectedE820(128));
    const big = buildE820(defaultMemoryLayout(4096));
    expect(big[big.length - 1]).toEqual({ addr: 1n << 32n, size: 1n << 30n, type: 1 });
    expect(big[3]).toEqual({ addr: 0xc0000000n, size: 0x40000000n, type: 2 });
  });

  it('MP table: one processor per vCPU, BSP flag on 0, IOAPIC id = cpus, ISA IRQs, LINT0/1, valid checksums', () => {
    for (const n of [1, 2, 8, 254]) {
      const mem = GuestMemory.anonymous(2 * MiB);
      writeMpTable(mem, n);
      const t = readMpTable(mem);
      expect(t.cpus.map((c) => c.apic)).toEqual(Array.from({ length: n }, (_, i) => i));
      expect(t.cpus.map((c) => c.flags)).toEqual(Array.from({ length: n }, (_, i) => (i === 0 ? 3 : 1)));
      expect(t.ioapics).toEqual([{ id: n, addr: 0xfec00000 }]);
      expect(t.ints.filter((x) => x.irq < 16).map((x) => [x.irq, x.pin, x.apic])).toEqual(Array.from({ length: 16 }, (_, i) => [i, i, n]));
      expect(t.lints).toEqual([{ type: 3, dest: 0xff, lint: 0 }, { type: 1, dest: 0xff, lint: 1 }]);
    }
    expect(checksum(new Uint8Array([1, 2, 3]))).toBe(250);
  });
});

describe.skipIf(!haveKernels)('boot-linux with the guest kernels', () => {
  let tmp: string;
  let bz: Uint8Array;
  let elf: Uint8Array;
  let cpio: Uint8Array;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'kvmkit-boot-linux-'));
    bz = readFileSync(gk!.bzImage!);
    elf = readFileSync(gk!.vmlinux!);
    cpio = readFileSync(gk!.initrd!);
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const bad = (name: string, bytes: Uint8Array): string => {
    const p = join(tmp, name);
    writeFileSync(p, bytes);
    return p;
  };
  const patched = (src: Uint8Array, f: (dv: DataView, b: Uint8Array) => void): Uint8Array => {
    const b = new Uint8Array(src);
    f(new DataView(b.buffer), b);
    return b;
  };

  it('bzImage (guest decompression): zero page, e820, initrd, cmdline, page tables, long-mode registers, MP table', async () => {
    const cmdline = 'console=ttyS0 panic=-1 foo=bar';
    const ctx = ctxFor(128, 2, cmdline);
    const r = await boot({ kernel: gk!.bzImage!, initrd: gk!.initrd!, decompress: 'guest' }, ctx);
    expect(r?.loader).toBe('linux-bzimage');
    expect(r?.vcpus).toHaveLength(1);
    const mem = ctx.memory;
    const zp = 0x7000;
    const hv = new DataView(bz.buffer, bz.byteOffset);
    // header copied from the file
    expect(mem.readU32(zp + 0x202)).toBe(0x53726448);
    expect(mem.readU16(zp + 0x206)).toBe(hv.getUint16(0x206, true));
    expect(mem.readU32(zp + 0x260)).toBe(hv.getUint32(0x260, true));
    expect(mem.readU8(zp + 0x1ef)).toBe(0); // sentinel
    expect(mem.readU8(zp + 0x210)).toBe(0xff); // type_of_loader
    expect(mem.readU8(zp + 0x211) & 0x81).toBe(0x81); // LOADED_HIGH | CAN_USE_HEAP
    // cmdline
    const cmdPtr = mem.readU32(zp + 0x228);
    expect(new TextDecoder().decode(mem.read(cmdPtr, cmdline.length + 1))).toBe(cmdline + '\0');
    // protected-mode kernel at pref_address
    const setup = (bz[0x1f1] || 4) + 1;
    const pref = hv.getBigUint64(0x258, true);
    const ksize = hv.getUint32(0x1f4, true) * 16;
    expect(Buffer.compare(mem.read(pref, ksize), bz.subarray(setup * 512, setup * 512 + ksize))).toBe(0);
    // initrd: page aligned, above the kernel's init_size, below RAM top and initrd_addr_max, bytes intact
    const rd = mem.readU32(zp + 0x218);
    const rdSize = mem.readU32(zp + 0x21c);
    expect(rdSize).toBe(cpio.byteLength);
    expect(rd % 4096).toBe(0);
    expect(BigInt(rd)).toBeGreaterThanOrEqual(pref + BigInt(hv.getUint32(0x260, true)));
    expect(rd + rdSize).toBeLessThanOrEqual(Math.min(128 * MiB, hv.getUint32(0x22c, true) + 1));
    expect(rd + rdSize).toBeGreaterThan(128 * MiB - 8192); // "high"
    expect(Buffer.compare(mem.read(rd, rdSize), cpio)).toBe(0);
    // e820 in the zero page
    expect(mem.readU8(zp + 0x1e8)).toBe(4);
    expect(readE820(mem, zp + 0x2d0, 4, 20)).toEqual(expectedE820(128));
    // registers
    const s = r!.vcpus[0]!;
    expect(s.regs!.rip).toBe(pref + 0x200n);
    expect(s.regs!.rsi).toBe(BigInt(zp));
    expect(s.regs!.rflags).toBe(2n);
    expect(s.sregs!.cs).toMatchObject({ selector: 0x10, l: 1, db: 0, present: 1, s: 1, type: 0xb, base: 0n });
    for (const k of ['ds', 'es', 'ss'] as const) expect(s.sregs![k]).toMatchObject({ selector: 0x18, type: 3, present: 1, limit: 0xffffffff, base: 0n });
    expect(s.sregs!.tr).toMatchObject({ type: 11, present: 1, s: 0 });
    expect(s.sregs!.cr0! & 0x80000001n).toBe(0x80000001n);
    expect(s.sregs!.cr4! & 0x20n).toBe(0x20n);
    expect(s.sregs!.efer).toBe(0x500n);
    // GDT in memory matches the segment handed to KVM
    const gdt = s.sregs!.gdt!;
    const code = mem.readU64(gdt.base + 0x10n);
    expect((code >> 53n) & 1n).toBe(1n); // L
    expect((code >> 47n) & 1n).toBe(1n); // P
    expect(gdt.limit).toBeGreaterThanOrEqual(0x1f);
    // identity map with 2 MiB pages over 4 GiB
    const cr3 = s.sregs!.cr3!;
    for (const va of [0n, 0x7000n, pref + 0x200n, BigInt(rd), 0xc0000000n, 0xfee00000n, 0xffffffffn]) expect(translate(mem, cr3, va)).toBe(va);
    // MP table
    const mp = readMpTable(mem);
    expect(mp.cpus.length).toBe(2);
    expect(mp.fp).toBeGreaterThanOrEqual(0xf0000);
  });

  it('PVH: segments at p_paddr, bss zeroed, hvm_start_info, modlist, memmap, 32-bit registers, MP table', async () => {
    const cmdline = 'console=ttyS0 quiet';
    const ctx = ctxFor(128, 4, cmdline);
    ctx.memory.fill(0x100000, 120 * MiB, 0xaa); // dirty RAM: bss must be zeroed by the loader
    const r = await boot({ kernel: gk!.vmlinux!, initrd: gk!.initrd!, format: 'pvh' }, ctx);
    expect(r?.loader).toBe('pvh');
    const mem = ctx.memory;
    // independent ELF reading: program headers
    const dv = new DataView(elf.buffer, elf.byteOffset, elf.byteLength);
    const phoff = Number(dv.getBigUint64(32, true));
    const phnum = dv.getUint16(56, true);
    let entry: bigint | undefined;
    for (let i = 0; i < phnum; i++) {
      const p = phoff + i * 56;
      const type = dv.getUint32(p, true);
      const off = Number(dv.getBigUint64(p + 8, true));
      const paddr = dv.getBigUint64(p + 24, true);
      const filesz = Number(dv.getBigUint64(p + 32, true));
      const memsz = Number(dv.getBigUint64(p + 40, true));
      if (type === 1) {
        expect(Buffer.compare(mem.read(paddr, filesz), elf.subarray(off, off + filesz))).toBe(0);
        if (memsz > filesz) expect(mem.read(paddr + BigInt(filesz), memsz - filesz).every((x) => x === 0)).toBe(true);
      }
      if (type === 4) {
        // walk notes for "Xen" type 18
        let q = off;
        while (q < off + filesz) {
          const nsz = dv.getUint32(q, true), dsz = dv.getUint32(q + 4, true), t = dv.getUint32(q + 8, true);
          const name = Buffer.from(elf.subarray(q + 12, q + 12 + nsz)).toString('latin1');
          const d = q + 12 + ((nsz + 3) & ~3);
          if (name === 'Xen\0' && t === 18) entry = dsz === 8 ? dv.getBigUint64(d, true) : BigInt(dv.getUint32(d, true));
          q = d + ((dsz + 3) & ~3);
        }
      }
    }
    expect(entry).toBeDefined();
    const s = r!.vcpus[0]!;
    expect(s.regs!.rip).toBe(entry);
    const si = Number(s.regs!.rbx);
    expect(mem.readU32(si)).toBe(0x336ec578);
    expect(mem.readU32(si + 4)).toBe(1);
    expect(mem.readU32(si + 12)).toBe(1);
    const cmdPaddr = mem.readU64(si + 24);
    expect(new TextDecoder().decode(mem.read(cmdPaddr, cmdline.length + 1))).toBe(cmdline + '\0');
    const mod = mem.readU64(si + 16);
    const rd = mem.readU64(mod);
    expect(mem.readU64(mod + 8n)).toBe(BigInt(cpio.byteLength));
    expect(rd % 4096n).toBe(0n);
    expect(Buffer.compare(mem.read(rd, cpio.byteLength), cpio)).toBe(0);
    expect(readE820(mem, Number(mem.readU64(si + 40)), mem.readU32(si + 48), 24)).toEqual(expectedE820(128));
    expect(s.sregs!.cs).toMatchObject({ selector: 0x10, l: 0, db: 1, g: 1, type: 0xb, limit: 0xffffffff, base: 0n });
    expect(s.sregs!.ds).toMatchObject({ selector: 0x18, db: 1, type: 3, limit: 0xffffffff });
    expect(s.sregs!.cr0! & 0x80000001n).toBe(1n); // PE, no PG
    expect(s.sregs!.efer).toBe(0n);
    expect(s.sregs!.tr).toMatchObject({ type: 11, limit: 0x67, present: 1 });
    const mp = readMpTable(mem);
    expect(mp.cpus.map((c) => c.apic)).toEqual([0, 1, 2, 3]);
    expect(mp.ioapics[0]!.id).toBe(4);
  });

  it('auto-detects both formats and appends the plugin cmdline before the config cmdline', async () => {
    expect((await boot({ kernel: gk!.vmlinux! }, ctxFor(64, 1, 'x')))?.loader).toBe('pvh');
    expect((await boot({ kernel: gk!.bzImage! }, ctxFor(64, 1, 'x')))?.loader).toBe('linux-bzimage');
    const hooks = createHooks();
    const plugin = bootLinux({ kernel: gk!.vmlinux!, cmdline: ' from-plugin=1 ' });
    await plugin.apply({ hooks: tapOnly(hooks) } as unknown as MachineApi, { log: silentLogger(), options: plugin.options });
    hooks.cmdline.tap({ name: 'late-device', stage: 10 }, (p) => [...p, 'late-device=1']);
    hooks.cmdline.tap('serial', (p) => [...p, 'console=ttyS0']);
    expect(hooks.cmdline.call(['virtio_mmio.device=4K@0xd0000000:5'])).toEqual(['virtio_mmio.device=4K@0xd0000000:5', 'console=ttyS0', 'late-device=1', 'from-plugin=1']);
  });

  it('prepareLinuxBoot exposes where everything went', async () => {
    const ctx = ctxFor(64, 1, 'a=b');
    const r = await prepareLinuxBoot(ctx, { kernel: gk!.vmlinux!, initrd: gk!.initrd! });
    expect(r.details.initrd!.addr + BigInt(r.details.initrd!.size)).toBeLessThanOrEqual(64n * BigInt(MiB));
    expect(r.details.initrd!.addr).toBeGreaterThanOrEqual(r.details.kernel.end);
    expect(r.details.cmdline).toEqual({ addr: ADDR.cmdline, length: 3 });
  });

  describe('coded errors before any vCPU runs', () => {
    it('truncated images', async () => {
      expect(await codeOf(boot({ kernel: bad('bz-trunc', bz.subarray(0, 300_000)) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
      expect(await codeOf(boot({ kernel: bad('bz-tiny', bz.subarray(0, 0x220)) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
      expect(await codeOf(boot({ kernel: bad('elf-trunc', elf.subarray(0, 3 * MiB)) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
      expect(await codeOf(boot({ kernel: bad('elf-hdr', elf.subarray(0, 40)) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
      expect(await codeOf(boot({ kernel: bad('empty', new Uint8Array(0)) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'truncated' });
    });

    it('neither a bzImage nor a PVH ELF', async () => {
      const junk = new Uint8Array(64 * 1024).map((_, i) => (i * 7) & 0xff);
      expect(await codeOf(boot({ kernel: bad('junk', junk) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'unknown-format' });
      expect(await codeOf(boot({ kernel: gk!.vmlinux!, format: 'bzimage' }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'not-bzimage' });
      expect(await codeOf(boot({ kernel: gk!.bzImage!, format: 'pvh' }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'unknown-format' });
      // ELF whose Xen PHYS32_ENTRY note type was changed
      const idx = Buffer.from(elf).indexOf(Buffer.from([4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, 0x58, 0x65, 0x6e, 0]));
      expect(idx).toBeGreaterThan(0);
      const noNote = patched(elf, (dv) => dv.setUint32(idx + 8, 17, true));
      expect(await codeOf(boot({ kernel: bad('no-note', noNote) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'no-pvh-note' });
    });

    it('old protocol and 32-bit-only bzImages', async () => {
      const old = patched(bz, (dv) => dv.setUint16(0x206, 0x0206, true));
      expect(await codeOf(boot({ kernel: bad('old', old) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'old-protocol' });
      const k32 = patched(bz, (dv) => dv.setUint16(0x236, dv.getUint16(0x236, true) & ~1, true));
      expect(await codeOf(boot({ kernel: bad('k32', k32) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'not-64bit' });
      const longHdr = patched(bz, (_dv, b) => { b[0x201] = 0xff; }); // header would run into the e820 table
      expect(await codeOf(boot({ kernel: bad('longhdr', longHdr) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'bad-header' });
    });

    it('wrong ELF machine or class', async () => {
      const arm = patched(elf, (dv) => dv.setUint16(18, 183, true)); // EM_AARCH64
      expect(await codeOf(boot({ kernel: bad('arm', arm) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'elf-machine' });
      const cls = patched(elf, (_dv, b) => { b[4] = 1; }); // ELF32 header claiming x86-64
      expect(await codeOf(boot({ kernel: bad('cls', cls) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'elf-class' });
      const cls9 = patched(elf, (_dv, b) => { b[4] = 9; });
      expect(await codeOf(boot({ kernel: bad('cls9', cls9) }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_IMAGE', reason: 'elf-class' });
    });

    it('initrd that does not fit, memory too small; nothing is written', async () => {
      const big = bad('big.cpio', new Uint8Array(12 * MiB));
      for (const kernel of [gk!.bzImage!, gk!.vmlinux!]) {
        const ctx = ctxFor(40, 1, '');
        expect(await codeOf(boot({ kernel, initrd: big }, ctx))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_INITRD' });
        expect(ctx.memory.read(0, 40 * MiB).every((x) => x === 0)).toBe(true);
        const small = ctxFor(24, 1, '');
        expect(await codeOf(boot({ kernel }, small))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_MEMORY' });
        expect(small.memory.read(0, 24 * MiB).every((x) => x === 0)).toBe(true);
      }
      expect(await codeOf(boot({ kernel: gk!.vmlinux! }, ctxFor(1, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_MEMORY' });
    });

    it('cmdline too long', async () => {
      const long = 'x'.repeat(3000);
      for (const kernel of [gk!.bzImage!, gk!.vmlinux!]) {
        expect(await codeOf(boot({ kernel }, ctxFor(128, 1, long)))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_CMDLINE', details: { length: 3000, max: 2047 } });
      }
    });

    it('missing or unreadable files', async () => {
      expect(await codeOf(boot({ kernel: join(tmp, 'nope') }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_FILE', details: { role: 'kernel', errno: 'ENOENT' } });
      expect(await codeOf(boot({ kernel: gk!.vmlinux!, initrd: join(tmp, 'nope.cpio') }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_FILE', details: { role: 'initrd' } });
      expect(await codeOf(boot({ kernel: tmp }, ctxFor(128, 1, '')))).toMatchObject({ code: 'KVMKIT_ERR_BOOT_LINUX_FILE', details: { errno: 'EISDIR' } });
    });
  });
});

describe('options', () => {
  it('validateOptions rejects missing kernel, unknown format and unknown keys', () => {
    const v = (o: unknown) => () => bootLinux(o as BootLinuxOptions).validateOptions!(o);
    expect(v({})).toThrow(/kernel is required/);
    expect(v({ kernel: '' })).toThrow(/must not be empty/);
    expect(v({ kernel: 'k', format: 'uimage' })).toThrow(/format/);
    expect(v({ kernel: 'k', initrd: 3 })).toThrow(/initrd/);
    expect(v({ kernel: 'k', bogus: 1 })).toThrow(/unknown option bogus/);
    expect(v({ kernel: 'k', decompress: 'gpu' })).toThrow(/decompress/);
    expect(v({ kernel: 'k', initrd: 'i', cmdline: 'c', format: 'auto', decompress: 'host' })).not.toThrow();
    expect(v({ kernel: 'k', decompress: 'guest' })).not.toThrow();
    const p = bootLinux({ kernel: 'k' });
    expect(p).toMatchObject({ name: 'boot-linux', provides: ['firmware'] });
  });
});
