import { describe, it, expect } from 'vitest';
import { encodeState, decodeState } from '@kvmkit/kernel';
import { Cmos, RTC, REG_B, REG_C } from './cmos.js';
import { I8042, STATUS, CTR, CMD } from './i8042.js';
import { DebugExit, BootTimer, PostCode, PortB, leValue } from './ports.js';

const bcd = (v: number) => ((Math.floor(v / 10) % 10) << 4) | v % 10;
const unbcd = (v: number) => (v >> 4) * 10 + (v & 15);

function cmosAt(ms: number, opts: { memoryMiB?: number; cpus?: number } = {}) {
  const clock = { now: ms };
  const c = new Cmos({ now: () => clock.now, ...opts });
  const rd = (i: number) => {
    c.write(0, Uint8Array.of(i));
    const d = new Uint8Array(1);
    c.read(1, d);
    return d[0]!;
  };
  const wr = (i: number, v: number) => {
    c.write(0, Uint8Array.of(i));
    c.write(1, Uint8Array.of(v));
  };
  return { c, clock, rd, wr };
}

/** Linux's mc146818_get_time, reduced: VRT check, UIP poll, fields, BCD decode. */
function linuxReadTime(rd: (i: number) => number) {
  expect(rd(RTC.REG_D) & 0x40).toBe(0);
  for (let tries = 0; tries < 10; tries++) {
    const sec0 = rd(RTC.SECONDS);
    if (rd(RTC.REG_A) & 0x80) continue;
    const t = { sec: sec0, min: rd(RTC.MINUTES), hour: rd(RTC.HOURS), mday: rd(RTC.DAY_OF_MONTH), mon: rd(RTC.MONTH), year: rd(RTC.YEAR) };
    const ctrl = rd(RTC.REG_B);
    if (rd(RTC.REG_A) & 0x80 || rd(RTC.SECONDS) !== sec0) continue;
    if (!(ctrl & REG_B.DM_BINARY)) for (const k of Object.keys(t) as (keyof typeof t)[]) t[k] = unbcd(t[k]);
    return t;
  }
  throw new Error('time never stable');
}

describe('CMOS/RTC', () => {
  const T = Date.UTC(2026, 10, 25, 15, 4, 19); // 2026-11-25 15:04:19 UTC, a Wednesday

  it('reads the host time in BCD, 24 h, the way Linux does', () => {
    const { rd } = cmosAt(T);
    expect(linuxReadTime(rd)).toEqual({ sec: 19, min: 4, hour: 15, mday: 25, mon: 11, year: 26 });
    expect(rd(RTC.CENTURY)).toBe(bcd(20));
    expect(rd(RTC.DAY_OF_WEEK)).toBe(4); // Sunday = 1
    expect(rd(RTC.REG_A) & 0x80).toBe(0);
    expect(rd(RTC.REG_D)).toBe(0x80);
  });

  it('follows the host clock', () => {
    const { rd, clock } = cmosAt(T);
    clock.now += 61_000;
    expect(unbcd(rd(RTC.MINUTES))).toBe(5);
    expect(unbcd(rd(RTC.SECONDS))).toBe(20);
  });

  it('switches to binary and 12-hour modes through register B', () => {
    const { rd, wr } = cmosAt(T);
    wr(RTC.REG_B, REG_B.DM_BINARY | REG_B.H24);
    expect(rd(RTC.HOURS)).toBe(15);
    expect(rd(RTC.YEAR)).toBe(26);
    wr(RTC.REG_B, 0); // BCD, 12 h
    expect(rd(RTC.HOURS)).toBe(0x80 | bcd(3)); // 3 PM
  });

  it('sets the time with SET frozen, then runs from the new time', () => {
    const { rd, wr, clock, c } = cmosAt(T);
    wr(RTC.REG_B, REG_B.SET | REG_B.H24);
    wr(RTC.YEAR, bcd(30));
    wr(RTC.MONTH, bcd(1));
    wr(RTC.DAY_OF_MONTH, bcd(2));
    wr(RTC.HOURS, bcd(3));
    wr(RTC.MINUTES, bcd(4));
    wr(RTC.SECONDS, bcd(5));
    clock.now += 10_000; // frozen while SET
    expect(unbcd(rd(RTC.SECONDS))).toBe(5);
    wr(RTC.REG_B, REG_B.H24);
    clock.now += 2_000;
    expect(c.guestTime().toISOString()).toBe('2030-01-02T03:04:07.000Z');
  });

  it('adjusts the offset on a direct write and clamps nonsense', () => {
    const { rd, wr, c } = cmosAt(T);
    wr(RTC.MINUTES, bcd(30));
    expect(unbcd(rd(RTC.MINUTES))).toBe(30);
    expect(unbcd(rd(RTC.HOURS))).toBe(15);
    wr(RTC.CENTURY, 0xff); // 165 in "BCD" → year 16526, clamped
    expect(c.guestTime().getUTCFullYear()).toBeLessThanOrEqual(2199);
    expect(Number.isFinite(c.guestTime().getTime())).toBe(true);
  });

  it('register C reports an update once per second and clears on read', () => {
    const { rd, clock } = cmosAt(T);
    expect(rd(RTC.REG_C)).toBe(0);
    clock.now += 1000;
    expect(rd(RTC.REG_C) & REG_C.UF).toBe(REG_C.UF);
    expect(rd(RTC.REG_C)).toBe(0);
  });

  it('keeps NVRAM bytes, the NMI mask bit and memory sizes', () => {
    const { rd, wr, c } = cmosAt(T, { memoryMiB: 4096 + 1024, cpus: 4 });
    wr(0x40, 0x99);
    expect(rd(0x40)).toBe(0x99);
    c.write(0, Uint8Array.of(0x80 | 0x0f));
    expect(c.nmiDisabled).toBe(true);
    c.write(0, Uint8Array.of(0x0f));
    expect(c.nmiDisabled).toBe(false);
    expect(rd(0x15) | (rd(0x16) << 8)).toBe(640);
    expect(rd(0x17) | (rd(0x18) << 8)).toBe(0xffff);
    expect(rd(0x34) | (rd(0x35) << 8)).toBe((3072 - 16) * 16);
    expect(rd(0x5b) | (rd(0x5c) << 8) | (rd(0x5d) << 16)).toBe(2048 * 16);
    expect(rd(0x5f)).toBe(3);
    const d = new Uint8Array(1);
    c.read(0, d);
    expect(d[0]).toBe(0xff); // index port is write-only
  });

  it('save/restore round trip (through the state encoding); corrupt state is rejected', () => {
    const a = cmosAt(T);
    a.wr(RTC.REG_B, REG_B.H24 | REG_B.DM_BINARY);
    a.wr(0x50, 0x12);
    a.wr(RTC.HOURS, 7);
    const s = decodeState(encodeState(a.c.save())) as ReturnType<Cmos['save']>;
    const b = cmosAt(T);
    b.c.restore(s);
    expect(b.rd(0x50)).toBe(0x12);
    expect(b.rd(RTC.HOURS)).toBe(7);
    expect(b.rd(RTC.REG_B)).toBe(REG_B.H24 | REG_B.DM_BINARY);
    expect(() => b.c.restore({ ...s, ram: new Uint8Array(3) })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    expect(() => b.c.restore({ ...s, offsetMs: NaN })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
  });
});

function kbd() {
  const irq: boolean[] = [];
  let resets = 0;
  const k = new I8042({ setKbdIrq: (l) => irq.push(l), reset: () => resets++ });
  const cmd = (c: number) => k.write(4, Uint8Array.of(c));
  const out = (v: number) => k.write(0, Uint8Array.of(v));
  const status = () => {
    const d = new Uint8Array(1);
    k.read(4, d);
    return d[0]!;
  };
  const data = () => {
    const d = new Uint8Array(1);
    k.read(0, d);
    return d[0]!;
  };
  /** Like Linux's i8042_command: wait IBF clear, write, read `n` answers (each must have OBF). */
  const command = (c: number, params: number[] = [], n = 0) => {
    expect(status() & STATUS.IBF).toBe(0);
    cmd(c);
    for (const p of params) {
      expect(status() & STATUS.IBF).toBe(0);
      out(p);
    }
    const r: Array<{ v: number; aux: boolean }> = [];
    for (let i = 0; i < n; i++) {
      const s = status();
      if (!(s & STATUS.OBF)) throw new Error('would time out');
      r.push({ aux: (s & STATUS.AUXDATA) !== 0, v: data() });
    }
    return r;
  };
  const flush = () => {
    let n = 0;
    while (status() & STATUS.OBF) {
      data();
      if (++n > 32) throw new Error('flush never ends');
    }
    return n;
  };
  return { k, irq, cmd, out, status, data, command, flush, resets: () => resets };
}

describe('i8042', () => {
  it("answers Linux's probe: flush, self-test, stable CTR read, CTR write, keylock clear", () => {
    const t = kbd();
    expect(t.flush()).toBe(0);
    expect(t.command(CMD.SELF_TEST, [], 1)[0]!.v).toBe(0x55);
    const c1 = t.command(CMD.READ_CTR, [], 1)[0]!.v;
    const c2 = t.command(CMD.READ_CTR, [], 1)[0]!.v;
    expect(c1).toBe(c2);
    expect(t.status() & STATUS.KEYLOCK).toBe(STATUS.KEYLOCK); // not inhibited
    const ctr = (c1 | CTR.KBDDIS) & ~CTR.KBDINT;
    t.command(CMD.WRITE_CTR, [ctr]);
    expect(t.command(CMD.READ_CTR, [], 1)[0]!.v).toBe(ctr);
    expect(t.flush()).toBe(0);
  });

  it('reports no AUX port quickly: AUX_LOOP answers without AUXDATA, AUX_TEST says clock stuck', () => {
    const t = kbd();
    const loop = t.command(CMD.WRITE_AUX_OBUF, [0x5a], 1)[0]!;
    expect(loop.aux).toBe(false); // Linux: "auxerr" → loop test failed
    const test = t.command(CMD.AUX_TEST, [], 1)[0]!.v;
    expect(test !== 0 && test !== 0xfa && test !== 0xff).toBe(true); // → Linux gives up on AUX
  });

  it('keyboard answers GETID, reset, LEDs, scan set and echo with ACKs, one IRQ edge per byte', () => {
    const t = kbd();
    t.command(CMD.WRITE_CTR, [CTR.KBDINT | CTR.SYS]); // interrupts on, no translation
    t.out(0xf2);
    expect(t.irq).toEqual([true]);
    expect(t.data()).toBe(0xfa);
    expect(t.irq).toEqual([true, false, true]); // dropped on read, raised for the next byte
    expect([t.data(), t.data()]).toEqual([0xab, 0x83]);
    expect(t.irq.at(-1)).toBe(false);
    t.out(0xff);
    expect([t.data(), t.data()]).toEqual([0xfa, 0xaa]);
    t.out(0xed);
    expect(t.data()).toBe(0xfa);
    t.out(0x00);
    expect(t.data()).toBe(0xfa);
    t.out(0xf0);
    t.out(0x00);
    expect([t.data(), t.data(), t.data()]).toEqual([0xfa, 0xfa, 0x02]);
    t.out(0xee);
    expect(t.data()).toBe(0xee);
    t.out(0xf4);
    expect(t.data()).toBe(0xfa);
    expect(t.status() & STATUS.OBF).toBe(0);
  });

  it('translating controller reports the translated keyboard ID', () => {
    const t = kbd();
    t.command(CMD.WRITE_CTR, [CTR.SYS | CTR.XLATE]);
    t.out(0xf2);
    expect([t.data(), t.data(), t.data()]).toEqual([0xfa, 0xab, 0x41]);
    expect(t.irq).toEqual([]); // KBDINT off: no IRQ
  });

  it('command 0xFE and output-port bit 0 pulse the reset line', () => {
    const t = kbd();
    t.cmd(0xfe);
    expect(t.resets()).toBe(1);
    t.cmd(0xff); // pulse nothing
    expect(t.resets()).toBe(1);
    t.command(CMD.WRITE_OUTPUT, [0x02]);
    expect(t.resets()).toBe(2);
    expect(t.command(CMD.READ_OUTPUT, [], 1)[0]!.v).toBe(0x02);
  });

  it('never grows its queue without bound and tolerates any width', () => {
    const t = kbd();
    for (let i = 0; i < 1000; i++) t.out(0xf2);
    expect(t.flush()).toBeLessThanOrEqual(16);
    for (const len of [0, 1, 2, 4]) {
      const d = new Uint8Array(len).fill(0xaa);
      t.k.write(0, d);
      t.k.read(4, d);
      t.k.read(2, d);
    }
  });

  it('save/restore round trip re-drives IRQ 1', () => {
    const a = kbd();
    a.command(CMD.WRITE_CTR, [CTR.KBDINT | CTR.SYS | CTR.XLATE]);
    a.out(0xf2);
    a.data();
    const s = decodeState(encodeState(a.k.save())) as ReturnType<I8042['save']>;
    const b = kbd();
    b.k.restore(s);
    expect(b.irq).toEqual([true]);
    expect([b.data(), b.data()]).toEqual([0xab, 0x41]);
    expect(() => b.k.restore({ ...s, queue: new Array(17).fill(0) })).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
  });
});

describe('small ports', () => {
  it('debug-exit: exit code = value & 0xff for 1-4 byte writes', () => {
    const got: Array<[number, number]> = [];
    const d = new DebugExit((c, v) => got.push([c, v]));
    d.write(0, Uint8Array.of(5));
    d.write(0, Uint8Array.of(0x34, 0x12));
    d.write(0, Uint8Array.of(0xff, 0xff, 0xff, 0xff));
    d.write(0, new Uint8Array(0));
    expect(got).toEqual([[5, 5], [0x34, 0x1234], [0xff, 0xffffffff]]);
    expect(leValue(Uint8Array.of(1, 2, 3, 4))).toBe(0x04030201);
  });

  it('boot-timer records the time of each write', () => {
    let now = 12.3456789;
    const marks: number[] = [];
    const b = new BootTimer((t) => marks.push(t.ms), () => now);
    b.write(0, Uint8Array.of(1));
    now = 50;
    b.write(0, Uint8Array.of(2, 0));
    expect(b.times).toEqual([{ ms: 12.346, value: 1 }, { ms: 50, value: 2 }]);
    expect(marks).toEqual([12.346, 50]);
  });

  it('POST port keeps the last code; port B reports PIT OUT2 high and toggles refresh', () => {
    const p = new PostCode();
    p.write(0, Uint8Array.of(0x42));
    const d = new Uint8Array(1);
    p.read(0, d);
    expect(d[0]).toBe(0x42);
    const b = new PortB();
    b.write(0, Uint8Array.of(0xff));
    b.read(0, d);
    const first = d[0]!;
    b.read(0, d);
    expect(first & 0x20).toBe(0x20);
    expect((first ^ d[0]!) & 0x10).toBe(0x10);
    expect(first & 0x0f).toBe(0x0f);
  });
});
