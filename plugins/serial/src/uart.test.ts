import { describe, it, expect } from 'vitest';
import { encodeState, decodeState } from '@kvmkit/kernel';
import { Uart16550, IIR, LSR, MSR, MCR, IER, FIFO_SIZE, type UartState } from './uart.js';

/** A UART wired to recorders: every setIrq level and every transmitted byte. */
function make(opts: { out2Gate?: boolean; backlogLimit?: number } = {}) {
  const irq: boolean[] = [];
  const tx: number[] = [];
  const uart = new Uart16550({ setIrq: (l) => irq.push(l), transmit: (b) => tx.push(b), ...opts });
  const w = (reg: number, v: number) => uart.write(reg, Uint8Array.of(v));
  const r = (reg: number) => {
    const d = new Uint8Array(1);
    uart.read(reg, d);
    return d[0]!;
  };
  return { uart, irq, tx, w, r };
}

describe('Uart16550: Linux 8250 probe sequence', () => {
  it('passes the scratch, IER, DLAB and FIFO detection tests and identifies as a 16550A', () => {
    const { w, r } = make();
    // serial8250 autoconfig: IER write/readback test
    const savedIer = r(1);
    w(1, 0);
    expect(r(1) & 0x0f).toBe(0);
    w(1, 0x0f);
    expect(r(1) & 0x0f).toBe(0x0f);
    w(1, savedIer);
    // scratch register
    w(7, 0xa5);
    expect(r(7)).toBe(0xa5);
    w(7, 0x5a);
    expect(r(7)).toBe(0x5a);
    // LCR_CONF_MODE_B + EFR write (lands in FCR on a 16550A), then FIFO enable and IIR>>6
    w(3, 0xbf);
    w(2, 0);
    w(3, 0);
    w(2, 0x01);
    expect(r(2) >> 6).toBe(3);
    // 16550A variant checks: EFR read in DLAB mode must not be 0 (else 16650), IIR bit 5 clear (else 16750)
    w(3, 0x80);
    expect(r(2)).not.toBe(0);
    w(3, 0xbf);
    expect(r(2)).not.toBe(0);
    w(3, 0);
    w(2, 0x01 | 0x20);
    expect(r(2) >> 5).toBe(6);
    // IER bit 6 (UUE on XScale) does not stick
    w(1, 0x40);
    expect(r(1)).toBe(0);
    // LSR never reads 0xff
    expect(r(5)).not.toBe(0xff);
  });

  it('latches the divisor behind DLAB and keeps RBR/IER separate', () => {
    const { w, r, tx } = make();
    w(1, 0x05); // IER
    w(3, 0x83); // DLAB, 8N1
    w(0, 0x01);
    w(1, 0x00);
    expect(r(0)).toBe(0x01);
    expect(r(1)).toBe(0x00);
    expect(tx).toEqual([]); // DLL write is not a transmit
    w(3, 0x03);
    expect(r(1)).toBe(0x05);
    expect(r(3)).toBe(0x03);
    w(3, 0x80);
    expect(r(0)).toBe(0x01);
  });

  it('passes the THRE re-assert test of serial8250_do_startup', () => {
    const { w, r, uart } = make();
    w(1, IER.THRE);
    const iir1 = r(2);
    w(1, 0);
    w(1, IER.THRE);
    const iir = r(2);
    w(1, 0);
    expect(iir1 & IIR.NO_INT).toBe(0);
    expect(iir & IIR.NO_INT).toBe(0);
    expect(uart.irq).toBe(false);
  });
});

describe('Uart16550: data path', () => {
  it('transmits THR writes at once with THRE and TEMT set', () => {
    const { w, r, tx } = make();
    for (const c of 'hi\n') w(0, c.charCodeAt(0));
    expect(Buffer.from(tx).toString()).toBe('hi\n');
    expect(r(5) & (LSR.THRE | LSR.TEMT)).toBe(LSR.THRE | LSR.TEMT);
  });

  it('receives into RBR with DR, in order, and reads 0 when empty', () => {
    const { w, r, uart } = make();
    w(2, 0x07);
    uart.receive(Uint8Array.of(1, 2, 3));
    expect(r(5) & LSR.DR).toBe(LSR.DR);
    expect([r(0), r(0), r(0)]).toEqual([1, 2, 3]);
    expect(r(5) & LSR.DR).toBe(0);
    expect(r(0)).toBe(0);
  });

  it('overruns a full FIFO: OE set once, reported as a line-status interrupt, cleared by reading LSR', () => {
    const { w, r, uart, irq } = make();
    w(2, 0x01);
    w(1, IER.RLS);
    const bytes = Uint8Array.from({ length: FIFO_SIZE + 3 }, (_, i) => i);
    expect(uart.receive(bytes)).toBe(FIFO_SIZE);
    expect(uart.overruns).toBe(3);
    expect(r(2) & 0x0f).toBe(IIR.RLS);
    expect(irq.at(-1)).toBe(true);
    const lsr = r(5);
    expect(lsr & LSR.OE).toBe(LSR.OE);
    expect(r(5) & LSR.OE).toBe(0);
    expect(irq.at(-1)).toBe(false);
    // the FIFO kept the first 16 bytes
    const got = Array.from({ length: FIFO_SIZE }, () => r(0));
    expect(got).toEqual(Array.from(bytes.subarray(0, FIFO_SIZE)));
  });

  it('holds one byte without FIFOs: a second one overruns', () => {
    const { r, uart } = make();
    expect(uart.receive(Uint8Array.of(7, 8))).toBe(1);
    expect(r(5) & (LSR.OE | LSR.DR)).toBe(LSR.OE | LSR.DR);
    expect(r(0)).toBe(7);
  });

  it('host input is flow-controlled through a backlog: no overrun, nothing lost', () => {
    const { w, r, uart } = make();
    w(2, 0x01);
    const data = Uint8Array.from({ length: 100 }, (_, i) => i);
    uart.enqueueInput(data);
    expect(uart.rxCount).toBe(FIFO_SIZE);
    const got: number[] = [];
    while (r(5) & LSR.DR) got.push(r(0));
    expect(got).toEqual(Array.from(data));
    expect(uart.overruns).toBe(0);
  });

  it('drops host input beyond the backlog limit and counts it', () => {
    const { uart } = make({ backlogLimit: 10 });
    uart.enqueueInput(new Uint8Array(20));
    expect(uart.rxCount + uart.backlogCount).toBe(11); // 1 in the holding register (FIFOs off) + 10
    expect(uart.droppedInput).toBe(9);
  });

  it('FCR clears the RX FIFO', () => {
    const { w, r, uart } = make();
    w(2, 0x01);
    uart.receive(Uint8Array.of(1, 2, 3));
    w(2, 0x03);
    expect(uart.rxCount).toBe(0);
    expect(r(5) & LSR.DR).toBe(0);
  });
});

describe('Uart16550: interrupts', () => {
  it('reports RDA at the trigger level and a character timeout below it', () => {
    const { w, r, uart, irq } = make();
    w(2, 0x41); // FIFO, trigger level 4
    w(1, IER.RDA);
    expect(irq).toEqual([]);
    uart.receive(Uint8Array.of(1, 2));
    expect(r(2)).toBe(IIR.FIFO | IIR.TIMEOUT);
    uart.receive(Uint8Array.of(3, 4));
    expect(r(2)).toBe(IIR.FIFO | IIR.RDA);
    expect(irq).toEqual([true]);
    for (let i = 0; i < 4; i++) r(0);
    expect(r(2)).toBe(IIR.FIFO | IIR.NO_INT);
    expect(irq).toEqual([true, false]);
  });

  it('orders sources RLS > RDA > THRE > MSI and drops the line when all are serviced', () => {
    const { w, r, uart, irq } = make();
    w(2, 0x01);
    // modem status change via loopback, then leave loopback (another change)
    w(4, MCR.LOOP | MCR.RTS);
    w(4, 0);
    w(1, 0x0f);
    uart.receive(new Uint8Array(FIFO_SIZE + 1)); // fills + overruns
    expect(irq.at(-1)).toBe(true);
    expect(r(2) & 0x0f).toBe(IIR.RLS);
    r(5); // clears OE
    expect(r(2) & 0x0f).toBe(IIR.RDA);
    for (let i = 0; i < FIFO_SIZE; i++) r(0);
    expect(r(2) & 0x0f).toBe(IIR.THRE); // reading it clears THRE
    expect(r(2) & 0x0f).toBe(IIR.MSI);
    expect(irq.at(-1)).toBe(true);
    const msr = r(6);
    expect(msr & 0x0f).not.toBe(0);
    expect(r(2)).toBe(IIR.FIFO | IIR.NO_INT);
    expect(irq.at(-1)).toBe(false);
    // only transitions are reported
    for (let i = 1; i < irq.length; i++) expect(irq[i]).not.toBe(irq[i - 1]);
  });

  it('re-raises THRE after each THR write (a fresh edge after the IIR read dropped it)', () => {
    const { w, r, irq } = make();
    w(1, IER.THRE);
    expect(irq).toEqual([true]);
    expect(r(2) & 0x0f).toBe(IIR.THRE);
    expect(irq).toEqual([true, false]);
    w(0, 0x41);
    expect(irq).toEqual([true, false, true]);
    w(1, 0);
    expect(irq).toEqual([true, false, true, false]);
  });

  it('gates the line with OUT2 when asked to, as PC boards do', () => {
    const { w, uart, irq } = make({ out2Gate: true });
    w(1, IER.THRE);
    expect(uart.irq).toBe(false);
    w(4, MCR.OUT2);
    expect(irq).toEqual([true]);
    w(4, 0);
    expect(irq).toEqual([true, false]);
  });
});

describe('Uart16550: loopback', () => {
  it('routes MCR to MSR inputs (Linux loopback test: 0x1a → 0x90) and TX back to RX', () => {
    const { w, r, tx } = make();
    w(4, MCR.LOOP | 0x0a);
    expect(r(6) & 0xf0).toBe(MSR.DCD | MSR.CTS);
    w(0, 0x55);
    expect(tx).toEqual([]);
    expect(r(5) & LSR.DR).toBe(LSR.DR);
    expect(r(0)).toBe(0x55);
    w(4, MCR.LOOP | MCR.DTR | MCR.OUT1);
    expect(r(6) & 0xf0).toBe(MSR.DSR | MSR.RI);
    w(4, MCR.LOOP);
    expect(r(6) & MSR.TERI).toBe(MSR.TERI); // RI trailing edge
    w(4, 0);
    expect(r(6) & 0xf0).toBe(MSR.DCD | MSR.DSR | MSR.CTS);
  });

  it('ignores line input while in loopback and delivers queued host input after', () => {
    const { w, r, uart } = make();
    w(2, 0x01);
    w(4, MCR.LOOP);
    expect(uart.receive(Uint8Array.of(9))).toBe(0);
    uart.enqueueInput(Uint8Array.of(1, 2));
    expect(r(5) & LSR.DR).toBe(0);
    w(4, 0);
    expect([r(0), r(0)]).toEqual([1, 2]);
  });
});

describe('Uart16550: save/restore', () => {
  it('round-trips registers, FIFO contents, backlog and the interrupt line through the state encoding', () => {
    const a = make();
    a.w(3, 0x80);
    a.w(0, 0x03);
    a.w(1, 0x00);
    a.w(3, 0x1b);
    a.w(2, 0x81); // FIFO, trigger 8
    a.w(1, IER.RDA | IER.RLS);
    a.w(4, MCR.OUT2 | MCR.DTR);
    a.w(7, 0x42);
    a.uart.enqueueInput(Uint8Array.from({ length: 20 }, (_, i) => 100 + i));
    const st = decodeState(encodeState(a.uart.save())) as UartState;

    const b = make();
    b.uart.restore(st);
    expect(b.irq).toEqual([true]); // line re-driven to the restored level
    for (const reg of [1, 2, 3, 4, 7]) expect(b.r(reg)).toBe(a.r(reg));
    b.w(3, 0x9b);
    expect([b.r(0), b.r(1)]).toEqual([0x03, 0x00]);
    b.w(3, 0x1b);
    const got: number[] = [];
    while (b.r(5) & LSR.DR) got.push(b.r(0));
    expect(got).toEqual(Array.from({ length: 20 }, (_, i) => 100 + i));
  });

  it('rejects corrupt state with KVMKIT_ERR_STATE_FORMAT', () => {
    const a = make();
    const good = a.uart.save();
    expect(() => a.uart.restore({ ...good, lcr: 300 })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    expect(() => a.uart.restore({ ...good, rx: new Uint8Array(17) })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    expect(() => a.uart.restore({ ...good, fcr: 0, rx: new Uint8Array(2) })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    expect(() => a.uart.restore(null as unknown as UartState)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
  });
});

describe('Uart16550: robustness', () => {
  it('handles any register offset and access width without throwing', () => {
    const { uart } = make();
    for (let off = 0; off < 16; off++) {
      for (const len of [0, 1, 2, 4]) {
        const d = new Uint8Array(len).fill(0xff);
        uart.write(off, d);
        uart.read(off, d);
        if (len > 1) expect(d.subarray(1).every((x) => x === 0)).toBe(true);
      }
    }
  });
});
