/**
 * A deliberately tiny x86-64 assembler: just the instructions the hello guest needs, with labels and rel8/rel32
 * fix-ups. It exists so that the example makes its own guest binary with no external tools.
 */
export class Asm {
  private bytes: number[] = [];
  private labels = new Map<string, number>();
  private fixups: Array<{ at: number; label: string; size: 1 | 4; from: number }> = [];

  get pc(): number {
    return this.bytes.length;
  }
  label(name: string): this {
    if (this.labels.has(name)) throw new Error(`label ${name} defined twice`);
    this.labels.set(name, this.pc);
    return this;
  }
  db(...b: number[]): this {
    for (const x of b) this.bytes.push(x & 0xff);
    return this;
  }
  d32(x: number): this {
    return this.db(x, x >>> 8, x >>> 16, x >>> 24);
  }
  ascii(s: string): this {
    return this.db(...Buffer.from(s, 'latin1'));
  }
  private rel(op: number[], label: string, size: 1 | 4): this {
    this.db(...op);
    const at = this.pc;
    this.db(...new Array<number>(size).fill(0));
    this.fixups.push({ at, label, size, from: this.pc });
    return this;
  }
  jmp8(l: string) { return this.rel([0xeb], l, 1); }
  jz8(l: string) { return this.rel([0x74], l, 1); }
  jnz8(l: string) { return this.rel([0x75], l, 1); }
  jnc8(l: string) { return this.rel([0x73], l, 1); }
  call(l: string) { return this.rel([0xe8], l, 4); }
  /** lea rbx, [rip + label] */
  leaRbx(l: string) { return this.rel([0x48, 0x8d, 0x1d], l, 4); }

  assemble(): Uint8Array {
    const out = Uint8Array.from(this.bytes);
    for (const f of this.fixups) {
      const target = this.labels.get(f.label);
      if (target === undefined) throw new Error(`undefined label ${f.label}`);
      const d = target - f.from;
      if (f.size === 1) {
        if (d < -128 || d > 127) throw new Error(`jump to ${f.label} out of rel8 range`);
        out[f.at] = d & 0xff;
      } else new DataView(out.buffer).setInt32(f.at, d, true);
    }
    return out;
  }
}
