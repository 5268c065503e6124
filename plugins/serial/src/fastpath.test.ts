import { describe, it, expect } from 'vitest';
import serialFastPath, { MIRROR_INTS } from './fastpath.js';
import { Uart16550, LSR, IER } from './uart.js';

function setup() {
  const sab = new SharedArrayBuffer(MIRROR_INTS * 4);
  const uart = new Uart16550({ setIrq: () => {}, transmit: () => {}, lsrMirror: new Int32Array(sab) });
  const h = serialFastPath(sab);
  const fast = (off: number) => {
    const d = new Uint8Array(1);
    return h.read!(off, d) === false ? undefined : d[0];
  };
  const slow = (off: number) => {
    const d = new Uint8Array(1);
    uart.read(off, d);
    return d[0]!;
  };
  return { uart, fast, slow };
}

describe('serial vCPU-thread fast path', () => {
  it('answers LSR like the device does and passes every other register on', () => {
    const { uart, fast, slow } = setup();
    expect(fast(5)).toBe(slow(5));
    expect(fast(5)! & (LSR.THRE | LSR.TEMT)).toBe(LSR.THRE | LSR.TEMT);
    uart.write(2, Uint8Array.of(0x01));
    uart.enqueueInput(Uint8Array.of(1, 2));
    expect(fast(5)! & LSR.DR).toBe(LSR.DR);
    expect(fast(5)).toBe(slow(5));
    slow(0);
    slow(0);
    expect(fast(5)! & LSR.DR).toBe(0);
    for (const off of [0, 1, 2, 3, 4, 6, 7]) expect(fast(off)).toBeUndefined();
  });

  it('hands LSR to the main thread while error bits are set (reading clears them), then resumes', () => {
    const { uart, fast, slow } = setup();
    uart.write(1, Uint8Array.of(IER.RLS));
    uart.receive(Uint8Array.of(1, 2)); // FIFOs off: overrun
    expect(fast(5)).toBeUndefined();
    expect(slow(5) & LSR.OE).toBe(LSR.OE);
    expect(fast(5)).toBe(slow(5));
  });

  it('is kept current across save/restore', () => {
    const a = setup();
    a.uart.write(2, Uint8Array.of(0x01));
    a.uart.enqueueInput(Uint8Array.of(9));
    const b = setup();
    b.uart.restore(a.uart.save());
    expect(b.fast(5)! & LSR.DR).toBe(LSR.DR);
  });
});
