import { describe, it, expect } from 'vitest';
import { GuestMemory } from './memory.js';
import { isKvmkitError } from './errors.js';

const code = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return isKvmkitError(e) ? e.code : `not coded: ${String(e)}`;
  }
  return 'no error';
};

describe('GuestMemory', () => {
  const two = () =>
    new GuestMemory([
      { gpa: 0x10000n, size: 0x1000, bytes: new Uint8Array(0x1000), hva: 0n, slot: 1, name: 'b' },
      { gpa: 0n, size: 0x2000, bytes: new Uint8Array(0x2000), hva: 0n, slot: 0, name: 'a' },
    ]);

  it('reads and writes little-endian values inside a region', () => {
    const m = two();
    m.writeU64(0x10, 0x1122334455667788n);
    expect(m.readU32(0x10)).toBe(0x55667788);
    expect(m.readU16(0x14)).toBe(0x3344);
    expect(m.readU8(0x17)).toBe(0x11);
    m.writeU32(0x10ffcn, 0xdeadbeef);
    expect(m.readU32(0x10ffc)).toBe(0xdeadbeef);
    expect(m.size).toBe(0x3000);
    expect(m.end).toBe(0x11000n);
  });

  it('rejects every access outside RAM with KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS', () => {
    const m = two();
    expect(code(() => m.readU32(0x1ffe))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS'); // straddles end of region a
    expect(code(() => m.read(0x2000, 1))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS'); // the hole
    expect(code(() => m.range(0x10000, 0x1001))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(code(() => m.range(-1, 1))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(code(() => m.range(0xffff_ffff_ffff_ffffn, 2))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(code(() => m.range(0, -1))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(code(() => m.range(0, 1.5))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(code(() => m.range(0, Number.NaN))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    expect(m.contains(0x1fff, 1)).toBe(true);
    expect(m.contains(0x1fff, 2)).toBe(false);
  });

  it('range() aliases guest memory', () => {
    const m = GuestMemory.anonymous(0x1000);
    m.range(0x100, 4).set([1, 2, 3, 4]);
    expect(m.readU32(0x100)).toBe(0x04030201);
    const copy = m.read(0x100, 4);
    copy[0] = 9;
    expect(m.readU8(0x100)).toBe(1);
  });

  it('rejects overlapping regions and mismatched views', () => {
    expect(code(() => new GuestMemory([
      { gpa: 0n, size: 0x2000, bytes: new Uint8Array(0x2000), hva: 0n, slot: 0, name: 'a' },
      { gpa: 0x1000n, size: 0x1000, bytes: new Uint8Array(0x1000), hva: 0n, slot: 1, name: 'b' },
    ]))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
    expect(code(() => new GuestMemory([{ gpa: 0n, size: 0x2000, bytes: new Uint8Array(0x1000), hva: 0n, slot: 0, name: 'a' }]))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
  });

  it('refuses access once closed', () => {
    const m = GuestMemory.anonymous(0x1000);
    m.close();
    expect(code(() => m.readU8(0))).toBe('KVMKIT_ERR_MEMORY_CLOSED');
    expect(m.contains(0, 1)).toBe(false);
  });
});

describe('GuestMemory host write tracking', () => {
  it('records pages written by the VMM while tracking is on, in the dirty-log bitmap format', () => {
    const m = new GuestMemory([{ gpa: 0x100000n, size: 0x10000, bytes: new Uint8Array(0x10000), hva: 0n, slot: 3, name: 'r' }]);
    m.writeU32(0x100000, 1); // not tracked yet
    expect(m.takeHostDirty(3)).toBeUndefined();
    m.setHostTracking(3, true);
    m.writeU8(0x101000, 1); // page 1
    m.range(0x102ffe, 4).set([1, 2, 3, 4]); // pages 2 and 3
    m.read(0x105000, 16); // reads are not writes
    m.view(0x106000, 16);
    m.markWritten(0x10f000, 1); // page 15
    m.markWritten(0x200000, 1); // outside RAM: ignored
    const bm = m.takeHostDirty(3)!;
    expect(bm.length).toBe(8);
    expect(Array.from(bm.subarray(0, 2))).toEqual([0b1110, 0b10000000]);
    expect(Array.from(m.takeHostDirty(3)!.subarray(0, 2))).toEqual([0, 0]); // taking clears
    m.setHostTracking(3, false);
    m.writeU8(0x101000, 2);
    expect(m.takeHostDirty(3)).toBeUndefined();
  });
});

describe('GuestMemory shared with another thread (share / fromShared)', () => {
  it('opens the same bytes, shares the dirty bitmaps and the closed flag', () => {
    const m = GuestMemory.anonymous(0x10000, 0x100000n, true);
    const w = GuestMemory.fromShared(structuredClone(m.share()));
    w.writeU32(0x100010, 0xdeadbeef);
    expect(m.readU32(0x100010)).toBe(0xdeadbeef);
    expect(code(() => w.range(0x10fff0, 32))).toBe('KVMKIT_ERR_MEMORY_OUT_OF_BOUNDS');
    // Tracking is switched on the owner; writes through the worker's copy land in the owner's log.
    expect(w.takeHostDirty(-1)).toBeUndefined();
    m.setHostTracking(-1, true);
    w.writeU8(0x103000, 1); // page 3
    w.markWritten(0x10e000, 0x2000); // pages 14, 15
    m.writeU8(0x100000, 1); // page 0
    expect(Array.from(m.takeHostDirty(-1)!.subarray(0, 2))).toEqual([0b1001, 0b11000000]);
    m.setHostTracking(-1, false);
    w.writeU8(0x103000, 2);
    expect(m.takeHostDirty(-1)).toBeUndefined();
    // Closing the owner closes the copy.
    m.close();
    expect(w.isClosed).toBe(true);
    expect(code(() => w.readU8(0x100000))).toBe('KVMKIT_ERR_MEMORY_CLOSED');
  });

  it('refuses memory that cannot be shared and malformed descriptors', () => {
    expect(code(() => GuestMemory.anonymous(0x1000).share())).toBe('KVMKIT_ERR_UNSUPPORTED');
    const d = GuestMemory.anonymous(0x1000, 0n, true).share();
    expect(code(() => GuestMemory.fromShared({ ...d, dirty: [] }))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
    expect(code(() => GuestMemory.fromShared({ ...d, regions: [{ ...d.regions[0]!, buffer: undefined }] }))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
    expect(code(() => GuestMemory.fromShared({ ...d, regions: [{ ...d.regions[0]!, size: 0x100000 }] }))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
    expect(code(() => GuestMemory.fromShared(null as never))).toBe('KVMKIT_ERR_MEMORY_LAYOUT');
  });

  it('gives host addresses of mmap-backed memory only', () => {
    expect(code(() => GuestMemory.anonymous(0x1000).hostAddress(0, 16))).toBe('KVMKIT_ERR_UNSUPPORTED');
  });
});
