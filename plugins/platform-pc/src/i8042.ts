import { KvmkitError } from '@kvmkit/kernel';

/** Status register (port 0x64 read). */
export const STATUS = { OBF: 0x01, IBF: 0x02, SYS: 0x04, CMD: 0x08, KEYLOCK: 0x10, AUXDATA: 0x20, TIMEOUT: 0x40, PARITY: 0x80 } as const;
/** Controller configuration byte ("command byte"). */
export const CTR = { KBDINT: 0x01, AUXINT: 0x02, SYS: 0x04, KBDDIS: 0x10, AUXDIS: 0x20, XLATE: 0x40 } as const;
/** Controller commands (port 0x64 write). */
export const CMD = {
  READ_CTR: 0x20, WRITE_CTR: 0x60, AUX_DISABLE: 0xa7, AUX_ENABLE: 0xa8, AUX_TEST: 0xa9, SELF_TEST: 0xaa, KBD_TEST: 0xab,
  KBD_DISABLE: 0xad, KBD_ENABLE: 0xae, READ_INPUT: 0xc0, READ_OUTPUT: 0xd0, WRITE_OUTPUT: 0xd1, WRITE_KBD_OBUF: 0xd2,
  WRITE_AUX_OBUF: 0xd3, WRITE_AUX: 0xd4, A20_DISABLE: 0xdd, A20_ENABLE: 0xdf, PULSE_RESET: 0xfe,
} as const;

const ACK = 0xfa;
const QUEUE_MAX = 16;

export interface I8042Options {
  /** Keyboard IRQ (1) level changes. */
  setKbdIrq(level: boolean): void;
  /** The guest pulsed the CPU reset line (command 0xFE, or output port bit 0 cleared). */
  reset(): void;
}

/** Saved state (inside section 'platform-pc' v1). */
export interface I8042State {
  ctr: number;
  status: number;
  outPort: number;
  queue: number[];
  queueAux: boolean[];
  pendingCmd: number;
  kbdPendingCmd: number;
  kbdEnabled: boolean;
  scanSet: number;
}

/**
 * An 8042 keyboard controller at 0x60 (data) / 0x64 (status, command), with just enough of a PS/2 keyboard
 * behind it that Linux's i8042 and atkbd drivers probe quickly and quietly: self-test (0xAA → 0x55),
 * command byte read/write, interface tests, A20, output port; the keyboard ACKs commands, answers reset
 * (0xFA 0xAA), GETID (0xFA 0xAB 0x83, 0x41 when translating), scan-code set queries and echo. There is no
 * AUX (mouse) port: AUX_LOOP answers without the AUXDATA bit and AUX_TEST reports "clock line stuck",
 * which makes Linux skip the port at once instead of timing out. No keys are ever pressed.
 * Reset: command 0xFE (and any 0xF0-0xFF pulse with bit 0 clear) or writing the output port with bit 0
 * clear calls `reset()`. Responses are queued (16 bytes); while a byte from the keyboard waits in the output
 * buffer and CTR.KBDINT is set, IRQ 1 is asserted (a level: it drops when the byte is read and rises again
 * for the next, so each byte is one edge at the IOAPIC/PIC).
 */
export class I8042 {
  private ctr = CTR.KBDINT | CTR.SYS | CTR.AUXDIS | CTR.XLATE;
  private status = STATUS.SYS | STATUS.KEYLOCK;
  private outPort = 0x03; // reset line high (bit 0), A20 enabled (bit 1)
  /** Output bytes waiting for the guest; queue[0] is in the output buffer when OBF is set. */
  private queue: number[] = [];
  private queueAux: boolean[] = [];
  /** A controller command waiting for its data byte (0 = none). */
  private pendingCmd = 0;
  /** A keyboard command waiting for its parameter byte (0 = none). */
  private kbdPendingCmd = 0;
  private kbdEnabled = true;
  private scanSet = 2;
  private irqLevel = false;
  resets = 0;

  constructor(private readonly opts: I8042Options) {}

  /** Bus read for a device registered at 0x60 (offset 0) and one at 0x64 (offset 4), or one range 0x60-0x64. */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length === 0) return;
    data[0] = offset === 0 ? this.readData() : offset === 4 ? this.readStatus() : 0xff;
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset === 0) this.writeData(data[0]!);
    else if (offset === 4) this.writeCommand(data[0]!);
  }

  readStatus(): number {
    let s = this.status & ~(STATUS.OBF | STATUS.AUXDATA | STATUS.IBF);
    if (this.queue.length > 0) {
      s |= STATUS.OBF;
      if (this.queueAux[0]) s |= STATUS.AUXDATA;
    }
    return s;
  }

  readData(): number {
    if (this.queue.length === 0) return 0; // an empty buffer reads the last value on hardware; 0 is harmless
    const v = this.queue.shift()!;
    this.queueAux.shift();
    // Each byte is its own interrupt: drop the line on every read so the next byte is a fresh edge.
    if (this.irqLevel) {
      this.irqLevel = false;
      this.opts.setKbdIrq(false);
    }
    this.update();
    return v;
  }

  private push(v: number, aux = false): void {
    if (this.queue.length >= QUEUE_MAX) return;
    this.queue.push(v & 0xff);
    this.queueAux.push(aux);
  }

  /** A controller command's response replaces whatever was waiting (the controller owns the buffer). */
  private respond(v: number, aux = false): void {
    this.queue = [];
    this.queueAux = [];
    this.push(v, aux);
  }

  private update(): void {
    const level = this.queue.length > 0 && !this.queueAux[0] && (this.ctr & CTR.KBDINT) !== 0;
    if (level !== this.irqLevel) {
      this.irqLevel = level;
      this.opts.setKbdIrq(level);
    }
  }

  get irq(): boolean {
    return this.irqLevel;
  }

  writeCommand(c: number): void {
    this.status |= STATUS.CMD;
    this.pendingCmd = 0;
    switch (c) {
      case CMD.READ_CTR:
        this.respond(this.ctr);
        break;
      case CMD.WRITE_CTR:
      case CMD.WRITE_OUTPUT:
      case CMD.WRITE_KBD_OBUF:
      case CMD.WRITE_AUX_OBUF:
      case CMD.WRITE_AUX:
        this.pendingCmd = c;
        break;
      case CMD.AUX_DISABLE:
        this.ctr |= CTR.AUXDIS;
        break;
      case CMD.AUX_ENABLE:
        this.ctr &= ~CTR.AUXDIS;
        break;
      case CMD.AUX_TEST:
        this.respond(0x02); // clock line stuck high: no AUX device
        break;
      case CMD.SELF_TEST:
        this.status |= STATUS.SYS;
        this.ctr |= CTR.SYS;
        this.respond(0x55);
        break;
      case CMD.KBD_TEST:
        this.respond(0x00);
        break;
      case CMD.KBD_DISABLE:
        this.ctr |= CTR.KBDDIS;
        break;
      case CMD.KBD_ENABLE:
        this.ctr &= ~CTR.KBDDIS;
        break;
      case CMD.READ_INPUT:
        this.respond(0x80); // keyboard not inhibited
        break;
      case CMD.READ_OUTPUT:
        this.respond(this.outPort);
        break;
      case CMD.A20_DISABLE:
        this.outPort &= ~0x02;
        break;
      case CMD.A20_ENABLE:
        this.outPort |= 0x02;
        break;
      default:
        if (c >= 0xf0) {
          // Pulse output lines low for bits that are 0; bit 0 is the CPU reset line.
          if ((c & 1) === 0) this.doReset();
        }
      // other commands: ignored
    }
    this.update();
  }

  writeData(v: number): void {
    this.status &= ~STATUS.CMD;
    const cmd = this.pendingCmd;
    this.pendingCmd = 0;
    switch (cmd) {
      case CMD.WRITE_CTR:
        this.ctr = v;
        this.status = v & CTR.SYS ? this.status | STATUS.SYS : this.status & ~STATUS.SYS;
        break;
      case CMD.WRITE_OUTPUT:
        this.outPort = v;
        if ((v & 1) === 0) this.doReset();
        break;
      case CMD.WRITE_KBD_OBUF:
        this.respond(v);
        break;
      case CMD.WRITE_AUX_OBUF:
        // No AUX port: the byte comes back without AUXDATA, so Linux's AUX loop test fails fast.
        this.respond(v);
        break;
      case CMD.WRITE_AUX:
        break; // no mouse: dropped
      default:
        this.keyboard(v);
    }
    this.update();
  }

  /** A byte written to the keyboard (data port without a pending controller command). */
  private keyboard(v: number): void {
    this.ctr &= ~CTR.KBDDIS; // writing to the keyboard enables its interface
    const pending = this.kbdPendingCmd;
    if (pending !== 0) {
      this.kbdPendingCmd = 0;
      if (pending === 0xf0) {
        if (v === 0) {
          this.push(ACK);
          this.push(this.ctr & CTR.XLATE ? [0, 0x43, 0x41, 0x3f][this.scanSet]! : this.scanSet);
          return;
        }
        if (v >= 1 && v <= 3) this.scanSet = v;
      }
      this.push(ACK); // 0xED LEDs, 0xF3 typematic, 0xF0 set: parameter acknowledged
      return;
    }
    switch (v) {
      case 0xff: // reset + BAT
        this.queue = [];
        this.queueAux = [];
        this.scanSet = 2;
        this.kbdEnabled = true;
        this.push(ACK);
        this.push(0xaa);
        return;
      case 0xf2: // identify
        this.push(ACK);
        this.push(0xab);
        this.push(this.ctr & CTR.XLATE ? 0x41 : 0x83);
        return;
      case 0xee: // echo
        this.push(0xee);
        return;
      case 0xed:
      case 0xf3:
      case 0xf0:
        this.kbdPendingCmd = v;
        this.push(ACK);
        return;
      case 0xf4:
        this.kbdEnabled = true;
        this.push(ACK);
        return;
      case 0xf5:
      case 0xf6:
        this.kbdEnabled = v === 0xf6;
        this.push(ACK);
        return;
      default:
        this.push(ACK);
    }
  }

  private doReset(): void {
    this.resets++;
    this.opts.reset();
  }

  save(): I8042State {
    return {
      ctr: this.ctr, status: this.status, outPort: this.outPort, queue: [...this.queue], queueAux: [...this.queueAux],
      pendingCmd: this.pendingCmd, kbdPendingCmd: this.kbdPendingCmd, kbdEnabled: this.kbdEnabled, scanSet: this.scanSet,
    };
  }

  restore(s: I8042State): void {
    const bad = (what: string) => new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `platform-pc i8042 state: ${what}`);
    const isByte = (x: unknown) => Number.isInteger(x) && (x as number) >= 0 && (x as number) <= 0xff;
    if (typeof s !== 'object' || s === null) throw bad('not an object');
    for (const k of ['ctr', 'status', 'outPort', 'pendingCmd', 'kbdPendingCmd'] as const) if (!isByte(s[k])) throw bad(`${k} must be a byte`);
    if (!Array.isArray(s.queue) || s.queue.length > QUEUE_MAX || !s.queue.every(isByte)) throw bad('queue must be at most 16 bytes');
    if (!Array.isArray(s.queueAux) || s.queueAux.length !== s.queue.length) throw bad('queueAux must match queue');
    if (![1, 2, 3].includes(s.scanSet)) throw bad('scanSet must be 1-3');
    this.ctr = s.ctr;
    this.status = s.status;
    this.outPort = s.outPort;
    this.queue = [...s.queue];
    this.queueAux = s.queueAux.map(Boolean);
    this.pendingCmd = s.pendingCmd;
    this.kbdPendingCmd = s.kbdPendingCmd;
    this.kbdEnabled = Boolean(s.kbdEnabled);
    this.scanSet = s.scanSet;
    const level = this.queue.length > 0 && !this.queueAux[0] && (this.ctr & CTR.KBDINT) !== 0;
    this.irqLevel = level;
    this.opts.setKbdIrq(level);
  }
}
