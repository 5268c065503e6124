import { describe, it, expect } from 'vitest';
import { GuestMemory, PluginHost } from '@kvmkit/kernel';
import bootFlat, { FLAT, writeFlatTables, flatVcpuState } from './index.js';

describe('boot-flat layout', () => {
  it('writes GDT, TSS with an all-ports I/O bitmap, identity page tables and the image', () => {
    const mem = GuestMemory.anonymous(4 << 20);
    writeFlatTables(mem, new Uint8Array([0x90, 0xf4]));
    expect(mem.readU64(FLAT.gdt + 0x20)).toBe(0x00affb000000ffffn);
    expect(mem.readU16(FLAT.tss + 0x66)).toBe(0x68);
    expect(mem.readU8(FLAT.tss + 0x68 + 100)).toBe(0);
    expect(mem.readU8(FLAT.tss + FLAT.tssLimit)).toBe(0xff);
    expect(mem.readU64(FLAT.pml4) & ~0xfffn).toBe(BigInt(FLAT.pdpt));
    // PD for 3-4 GiB maps 0xd0000000 (the MMIO window) with a 2 MiB page.
    const pd3 = FLAT.pd + 3 * 0x1000;
    expect(mem.readU64(pd3 + ((0xd0000000 - 0xc0000000) >> 21) * 8)).toBe(0xd0000000n | 0x87n);
    expect(mem.readU8(FLAT.loadAddress + 1)).toBe(0xf4);
  });
  it('refuses an image that does not fit', () => {
    const mem = GuestMemory.anonymous(1 << 20);
    expect(() => writeFlatTables(mem, new Uint8Array(16))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_IMAGE' }));
  });
  it('gives each vCPU its own stack and index, ring 3 with IOPL 3', () => {
    const s = flatVcpuState(2, 4, 3, 7n);
    expect(s.regs).toMatchObject({ rip: 0x100000n, rsp: 0x80000n - 0x2000n, rdi: 2n, rsi: 4n, rdx: 7n, rflags: 0x3002n });
    expect(s.sregs?.cs?.dpl).toBe(3);
    expect(s.sregs?.tr?.limit).toBe(FLAT.tssLimit);
  });
  it('accepts a file path or bytes as image', () => {
    const h = new PluginHost('0.1.0');
    expect(() => h.register(bootFlat({ image: './guest.bin', ring: 3, arg: 5n }))).not.toThrow();
  });
  it('validates options', () => {
    const h = new PluginHost('0.1.0');
    expect(() => h.register(bootFlat({ image: 42 } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => h.register(bootFlat({ image: new Uint8Array(1), ring: 2 } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => h.register(bootFlat({ image: new Uint8Array(1), arg: 'x' } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    expect(() => h.register(bootFlat({ image: new Uint8Array(1), bogus: 1 } as never))).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
  });
});
