import { describe, it, expect } from 'vitest';
import { PioBus, MmioBus, type BusDevice } from './bus.js';
import { isKvmkitError } from './errors.js';

function recorder(): BusDevice & { log: string[] } {
  const log: string[] = [];
  return {
    log,
    read(off, data) { log.push(`r${off}:${data.length}`); data.fill(0xab); },
    write(off, data) { log.push(`w${off}:${Array.from(data).join(',')}`); },
  };
}
const codeOf = (f: () => unknown) => { try { f(); return 'none'; } catch (e) { return isKvmkitError(e) ? e.code : 'uncoded'; } };

describe('Bus', () => {
  it('dispatches by range with offsets relative to the base', () => {
    const bus = new PioBus();
    const a = recorder(); const b = recorder();
    bus.register(0x3f8, 8, a, 'serial');
    bus.register(0x60, 1, b, 'kbd');
    expect(bus.write(0x3fb, new Uint8Array([1]))).toBe(true);
    const d = new Uint8Array(2);
    expect(bus.read(0x60, d)).toBe(true);
    expect(a.log).toEqual(['w3:1']);
    expect(b.log).toEqual(['r0:2']);
    expect(Array.from(d)).toEqual([0xab, 0xab]);
  });

  it('answers unclaimed reads with all-ones and reports them', () => {
    const bus = new MmioBus();
    const d = new Uint8Array(4);
    expect(bus.read(0xd0000000, d)).toBe(false);
    expect(Array.from(d)).toEqual([0xff, 0xff, 0xff, 0xff]);
    expect(bus.write(0xd0000000, d)).toBe(false);
  });

  it('rejects zero length, negative, overflow and overlap with coded errors', () => {
    const bus = new PioBus();
    bus.register(0x100, 0x10, recorder(), 'a');
    expect(codeOf(() => bus.register(0x200, 0, recorder(), 'z'))).toBe('KVMKIT_ERR_BUS_RANGE');
    expect(codeOf(() => bus.register(-1, 1, recorder(), 'n'))).toBe('KVMKIT_ERR_BUS_RANGE');
    expect(codeOf(() => bus.register(0xfff0, 0x20, recorder(), 'o'))).toBe('KVMKIT_ERR_BUS_RANGE');
    expect(codeOf(() => bus.register(0x10f, 2, recorder(), 'x'))).toBe('KVMKIT_ERR_BUS_OVERLAP');
    expect(codeOf(() => bus.register(0xf0, 0x11, recorder(), 'y'))).toBe('KVMKIT_ERR_BUS_OVERLAP');
    expect(codeOf(() => bus.register(0x110, 1, recorder(), 'ok'))).toBe('none');
    const mm = new MmioBus();
    expect(codeOf(() => mm.register(Number.MAX_SAFE_INTEGER - 1, 4, recorder(), 'big'))).toBe('KVMKIT_ERR_BUS_RANGE');
  });

  it('finds entries among many ranges (binary search) and unregisters', () => {
    const bus = new MmioBus();
    for (let i = 0; i < 64; i++) bus.register(0xd0000000 + i * 0x1000, 0x200, recorder(), `d${i}`);
    expect(bus.find(0xd0005100)?.name).toBe('d5');
    expect(bus.find(0xd0005200)).toBeUndefined();
    expect(bus.unregister(0xd0005000)).toBe(true);
    expect(bus.find(0xd0005100)).toBeUndefined();
  });
});
