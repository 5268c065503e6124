import { KvmkitError } from '@kvmkit/kernel';

/** Register offsets (from the UART's base port). */
export const UART_REG = { RBR_THR_DLL: 0, IER_DLM: 1, IIR_FCR: 2, LCR: 3, MCR: 4, LSR: 5, MSR: 6, SCR: 7 } as const;

export const IER = { RDA: 0x01, THRE: 0x02, RLS: 0x04, MSI: 0x08 } as const;
/** IIR interrupt identification (bits 3:1, bit 0 = no interrupt pending); bits 7:6 = 11 when FIFOs are on. */
export const IIR = { NO_INT: 0x01, MSI: 0x00, THRE: 0x02, RDA: 0x04, RLS: 0x06, TIMEOUT: 0x0c, FIFO: 0xc0 } as const;
export const FCR = { ENABLE: 0x01, CLEAR_RX: 0x02, CLEAR_TX: 0x04, DMA: 0x08, TRIGGER_MASK: 0xc0 } as const;
export const LCR = { DLAB: 0x80 } as const;
export const MCR = { DTR: 0x01, RTS: 0x02, OUT1: 0x04, OUT2: 0x08, LOOP: 0x10 } as const;
export const LSR = { DR: 0x01, OE: 0x02, PE: 0x04, FE: 0x08, BI: 0x10, THRE: 0x20, TEMT: 0x40, RXFE: 0x80 } as const;
export const MSR = { DCTS: 0x01, DDSR: 0x02, TERI: 0x04, DDCD: 0x08, CTS: 0x10, DSR: 0x20, RI: 0x40, DCD: 0x80 } as const;

/** Depth of the 16550A receive and transmit FIFOs. */
export const FIFO_SIZE = 16;
const TRIGGER_LEVELS = [1, 4, 8, 14] as const;
/** Modem inputs seen outside loopback: carrier, data set ready and clear to send asserted (a null modem). */
const MODEM_INPUTS = MSR.DCD | MSR.DSR | MSR.CTS;
/** Host-side input waiting for room in the RX FIFO (bytes beyond are dropped and counted). */
export const DEFAULT_BACKLOG_LIMIT = 64 * 1024;

export interface UartOptions {
  /** Called with the new interrupt line level whenever it changes. */
  setIrq(level: boolean): void;
  /** Called for every byte the guest transmits (not in loopback mode). */
  transmit(byte: number): void;
  /**
   * Gate the interrupt output with MCR.OUT2 as PC boards wire it (Linux sets OUT2 when it uses the IRQ).
   * Default false, like QEMU and Firecracker: the line follows the pending interrupt only.
   */
  out2Gate?: boolean;
  /** Maximum bytes of host input queued behind the RX FIFO (default 64 KiB). */
  backlogLimit?: number;
  /**
   * Shared mirror for the vCPU-thread fast path: element 0 is kept equal to LSR whenever reading LSR has no side
   * effects, and -1 otherwise (see fastpath.ts).
   */
  lsrMirror?: Int32Array;
}

/** Saved UART state (section version 1). */
export interface UartState {
  dll: number;
  dlm: number;
  ier: number;
  fcr: number;
  lcr: number;
  mcr: number;
  lsr: number;
  msr: number;
  scr: number;
  thrPending: boolean;
  rx: Uint8Array;
  backlog: Uint8Array;
}

function byte(v: unknown, name: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xff) {
    throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `serial state: ${name} must be a byte (got ${JSON.stringify(v)})`);
  }
  return v;
}

function bytes(v: unknown, name: string, max: number): Uint8Array {
  if (!(v instanceof Uint8Array) || v.length > max) {
    throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `serial state: ${name} must be a Uint8Array of at most ${max} bytes`);
  }
  return v;
}

/**
 * A 16550A UART as the guest sees it: eight byte-wide registers, 16-byte FIFOs, the four interrupt sources with
 * the datasheet's priorities (line status > received data / character timeout > THR empty > modem status), DLAB,
 * loopback. Transmission is instantaneous: a byte written to THR leaves at once, so THRE and TEMT read back set.
 * The character-timeout interrupt is reported as soon as the RX FIFO holds fewer bytes than the trigger level
 * (there is no bit clock to wait for). The interrupt output is a level: `setIrq(true)` while an enabled interrupt
 * is pending, `setIrq(false)` once none is (ISA IRQ lines are edge-triggered at the PIC/IOAPIC; dropping the line
 * when the guest has serviced every source makes the next interrupt a fresh rising edge).
 */
export class Uart16550 {
  private dll = 0x0c; // 9600 baud from a 1.8432 MHz clock
  private dlm = 0;
  private ier = 0;
  private fcr = 0;
  private lcr = 0x03; // 8N1
  private mcr = 0;
  private lsr = LSR.THRE | LSR.TEMT;
  private msr = MODEM_INPUTS;
  private scr = 0;
  /** THR-empty interrupt latched (cleared by an IIR read that reports it or by a THR write). */
  private thrPending = true;
  private rx: number[] = [];
  private backlog: number[] = [];
  private irqLevel = false;
  private readonly setIrqFn: (level: boolean) => void;
  private readonly transmitFn: (byte: number) => void;
  private readonly out2Gate: boolean;
  private readonly backlogLimit: number;
  private readonly lsrMirror: Int32Array | undefined;
  /** Bytes dropped: RX overruns and host input beyond the backlog limit. */
  overruns = 0;
  droppedInput = 0;

  constructor(opts: UartOptions) {
    this.setIrqFn = opts.setIrq;
    this.transmitFn = opts.transmit;
    this.out2Gate = opts.out2Gate ?? false;
    this.backlogLimit = opts.backlogLimit ?? DEFAULT_BACKLOG_LIMIT;
    this.lsrMirror = opts.lsrMirror;
    this.syncMirror();
  }

  /** Publishes LSR for the vCPU-thread fast path (-1 while a read would clear error bits). */
  private syncMirror(): void {
    if (!this.lsrMirror) return;
    const v = this.lsr & (LSR.OE | LSR.PE | LSR.FE | LSR.BI) ? -1 : this.lsr;
    Atomics.store(this.lsrMirror, 0, v);
  }

  get fifoEnabled(): boolean {
    return (this.fcr & FCR.ENABLE) !== 0;
  }

  get loopback(): boolean {
    return (this.mcr & MCR.LOOP) !== 0;
  }

  /** Current level of the interrupt output. */
  get irq(): boolean {
    return this.irqLevel;
  }

  /** Bytes in the RX FIFO (or holding register). */
  get rxCount(): number {
    return this.rx.length;
  }

  /** Host bytes queued behind the RX FIFO. */
  get backlogCount(): number {
    return this.backlog.length;
  }

  private get rxCapacity(): number {
    return this.fifoEnabled ? FIFO_SIZE : 1;
  }

  private get triggerLevel(): number {
    return TRIGGER_LEVELS[(this.fcr >> 6) & 3]!;
  }

  /** The interrupt identification the IIR would report now (without FIFO bits). */
  private pendingId(): number {
    if (this.ier & IER.RLS && this.lsr & (LSR.OE | LSR.PE | LSR.FE | LSR.BI)) return IIR.RLS;
    if (this.ier & IER.RDA && this.rx.length > 0) {
      if (!this.fifoEnabled || this.rx.length >= this.triggerLevel) return IIR.RDA;
      return IIR.TIMEOUT;
    }
    if (this.ier & IER.THRE && this.thrPending) return IIR.THRE;
    if (this.ier & IER.MSI && this.msr & 0x0f) return IIR.MSI;
    return IIR.NO_INT;
  }

  private update(): void {
    this.syncMirror();
    let level = this.pendingId() !== IIR.NO_INT;
    if (this.out2Gate && !(this.mcr & MCR.OUT2)) level = false;
    if (level !== this.irqLevel) {
      this.irqLevel = level;
      this.setIrqFn(level);
    }
  }

  private updateLsrDr(): void {
    if (this.rx.length > 0) this.lsr |= LSR.DR;
    else this.lsr &= ~LSR.DR;
  }

  /** A character arrives on the serial line: into the RX FIFO, or an overrun (OE) when it is full. */
  private receiveByte(b: number): void {
    if (this.rx.length >= this.rxCapacity) {
      // 16550A: the FIFO keeps its bytes; the character in the shift register is lost.
      this.lsr |= LSR.OE;
      this.overruns++;
      return;
    }
    this.rx.push(b & 0xff);
    this.lsr |= LSR.DR;
  }

  /**
   * Hardware-level reception of `data` (no flow control): bytes that do not fit set OE and are lost, as on a
   * real line. Ignored in loopback mode (the receiver is disconnected from the line). Returns bytes accepted.
   */
  receive(data: Uint8Array): number {
    if (this.loopback) return 0;
    let n = 0;
    for (const b of data) {
      const before = this.rx.length;
      this.receiveByte(b);
      if (this.rx.length > before) n++;
    }
    this.update();
    return n;
  }

  /**
   * Host input with flow control: bytes go into the RX FIFO as room allows and the rest waits in a backlog
   * (filled in as the guest reads RBR). Bytes beyond the backlog limit are dropped (counted in droppedInput).
   */
  enqueueInput(data: Uint8Array): void {
    for (const b of data) {
      if (this.backlog.length === 0 && !this.loopback && this.rx.length < this.rxCapacity) {
        this.rx.push(b);
        continue;
      }
      if (this.backlog.length >= this.backlogLimit) {
        this.droppedInput++;
        continue;
      }
      this.backlog.push(b);
    }
    this.refill();
    this.update();
  }

  private refill(): void {
    if (this.loopback) return;
    while (this.backlog.length > 0 && this.rx.length < this.rxCapacity) {
      this.rx.push(this.backlog.shift()!);
    }
    this.updateLsrDr();
  }

  /** Bus read: `offset` 0-7, fills every byte of `data` with the register value. */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length === 0) return;
    data[0] = this.readReg(offset & 7);
  }

  /** Bus write: only the low byte counts (the registers are 8 bits wide). */
  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    this.writeReg(offset & 7, data[0]!);
  }

  readReg(reg: number): number {
    const dlab = (this.lcr & LCR.DLAB) !== 0;
    switch (reg) {
      case 0: {
        if (dlab) return this.dll;
        const v = this.rx.length > 0 ? this.rx.shift()! : 0;
        this.refill();
        this.updateLsrDr();
        this.update();
        return v;
      }
      case 1:
        return dlab ? this.dlm : this.ier;
      case 2: {
        const id = this.pendingId();
        // Reading IIR while it reports THR empty clears that source.
        if (id === IIR.THRE) {
          this.thrPending = false;
          this.update();
        }
        return id | (this.fifoEnabled ? IIR.FIFO : 0);
      }
      case 3:
        return this.lcr;
      case 4:
        return this.mcr;
      case 5: {
        let v = this.lsr;
        if (this.fifoEnabled && this.lsr & (LSR.PE | LSR.FE | LSR.BI)) v |= LSR.RXFE;
        // Reading LSR clears the error bits (and with them the line-status interrupt).
        this.lsr &= ~(LSR.OE | LSR.PE | LSR.FE | LSR.BI);
        this.update();
        return v;
      }
      case 6: {
        const v = this.msr;
        this.msr &= 0xf0;
        this.update();
        return v;
      }
      default:
        return this.scr;
    }
  }

  writeReg(reg: number, v: number): void {
    v &= 0xff;
    const dlab = (this.lcr & LCR.DLAB) !== 0;
    switch (reg) {
      case 0:
        if (dlab) {
          this.dll = v;
          return;
        }
        this.thrPending = false;
        if (this.loopback) this.receiveByte(v);
        else this.transmitFn(v);
        // The byte left at once: THR and shift register are empty again.
        this.lsr |= LSR.THRE | LSR.TEMT;
        this.thrPending = true;
        this.update();
        return;
      case 1: {
        if (dlab) {
          this.dlm = v;
          return;
        }
        const old = this.ier;
        this.ier = v & 0x0f;
        // Enabling the THRE interrupt while THR is empty raises it (Linux's THRE test relies on this).
        if (!(old & IER.THRE) && this.ier & IER.THRE && this.lsr & LSR.THRE) this.thrPending = true;
        this.update();
        return;
      }
      case 2: {
        const enable = (v & FCR.ENABLE) !== 0;
        if (enable !== this.fifoEnabled) {
          // Changing the FIFO mode clears both FIFOs.
          this.rx = [];
        }
        if (enable && v & FCR.CLEAR_RX) this.rx = [];
        // TX FIFO is always empty here (transmission is instantaneous); CLEAR_TX has nothing to drop.
        this.fcr = enable ? v & (FCR.ENABLE | FCR.DMA | FCR.TRIGGER_MASK) : 0;
        this.refill();
        this.updateLsrDr();
        this.update();
        return;
      }
      case 3:
        this.lcr = v;
        return;
      case 4: {
        const old = this.mcr;
        this.mcr = v & 0x1f;
        if ((old ^ this.mcr) & MCR.LOOP && !this.loopback) this.refill();
        this.updateModemStatus();
        this.update();
        return;
      }
      case 5:
        // LSR is read-only on a 16550A (factory test writes ignored).
        return;
      case 6:
        return;
      default:
        this.scr = v;
    }
  }

  /** Recomputes MSR inputs: from MCR in loopback, the fixed null-modem inputs otherwise; sets delta bits. */
  private updateModemStatus(): void {
    let inputs: number;
    if (this.loopback) {
      inputs = 0;
      if (this.mcr & MCR.RTS) inputs |= MSR.CTS;
      if (this.mcr & MCR.DTR) inputs |= MSR.DSR;
      if (this.mcr & MCR.OUT1) inputs |= MSR.RI;
      if (this.mcr & MCR.OUT2) inputs |= MSR.DCD;
    } else {
      inputs = MODEM_INPUTS;
    }
    const old = this.msr & 0xf0;
    const changed = old ^ inputs;
    let delta = this.msr & 0x0f;
    if (changed & MSR.CTS) delta |= MSR.DCTS;
    if (changed & MSR.DSR) delta |= MSR.DDSR;
    if (changed & MSR.DCD) delta |= MSR.DDCD;
    if (old & MSR.RI && !(inputs & MSR.RI)) delta |= MSR.TERI; // trailing edge of ring indicator
    this.msr = inputs | delta;
  }

  save(): UartState {
    return {
      dll: this.dll, dlm: this.dlm, ier: this.ier, fcr: this.fcr, lcr: this.lcr, mcr: this.mcr,
      lsr: this.lsr, msr: this.msr, scr: this.scr, thrPending: this.thrPending,
      rx: Uint8Array.from(this.rx), backlog: Uint8Array.from(this.backlog),
    };
  }

  /** Restores a saved state (validated: a corrupt state gives KVMKIT_ERR_STATE_FORMAT, never a bad UART). */
  restore(s: UartState): void {
    if (typeof s !== 'object' || s === null) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', 'serial state must be an object');
    const fcr = byte(s.fcr, 'fcr');
    const rx = bytes(s.rx, 'rx', FIFO_SIZE);
    const backlog = bytes(s.backlog, 'backlog', this.backlogLimit);
    if (typeof s.thrPending !== 'boolean') throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', 'serial state: thrPending must be a boolean');
    if (!(fcr & FCR.ENABLE) && rx.length > 1) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', 'serial state: rx holds more than 1 byte with FIFOs off');
    this.dll = byte(s.dll, 'dll');
    this.dlm = byte(s.dlm, 'dlm');
    this.ier = byte(s.ier, 'ier') & 0x0f;
    this.fcr = fcr;
    this.lcr = byte(s.lcr, 'lcr');
    this.mcr = byte(s.mcr, 'mcr') & 0x1f;
    this.lsr = byte(s.lsr, 'lsr');
    this.msr = byte(s.msr, 'msr');
    this.scr = byte(s.scr, 'scr');
    this.thrPending = s.thrPending;
    this.rx = Array.from(rx);
    this.backlog = Array.from(backlog);
    this.updateLsrDr();
    // Always re-drive the line so the irqchip (restored separately) and the UART agree.
    let level = this.pendingId() !== IIR.NO_INT;
    if (this.out2Gate && !(this.mcr & MCR.OUT2)) level = false;
    this.irqLevel = level;
    this.setIrqFn(level);
    this.syncMirror();
  }
}
