/**
 * A small, strict XZ decoder (the .xz container with LZMA2 and the BCJ x86 filter), written for decompressing
 * a bzImage payload on the host. Format: https://tukaani.org/xz/xz-file-format.txt; LZMA: the LZMA SDK's
 * lzma-specification. One-shot: the whole input is in memory and the output goes into one growing buffer whose
 * size is capped by `maxOutput`. Every read is bounds-checked; every malformed input ends in a KvmkitError
 * with code KVMKIT_ERR_BOOT_DECOMPRESS (`details.reason` says what), never in a hang or an out-of-bounds write.
 */
import { createHash } from 'node:crypto';
import { KvmkitError } from '@kvmkit/kernel';

export const DECOMPRESS_ERROR = 'KVMKIT_ERR_BOOT_DECOMPRESS';

export const XZ_MAGIC = Uint8Array.of(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00);
const FOOTER_MAGIC0 = 0x59; // 'Y'
const FOOTER_MAGIC1 = 0x5a; // 'Z'

export const XZ_CHECK_NONE = 0;
export const XZ_CHECK_CRC32 = 1;
export const XZ_CHECK_CRC64 = 4;
export const XZ_CHECK_SHA256 = 10;

const FILTER_X86 = 0x04;
const FILTER_LZMA2 = 0x21;

export interface XzDecodeOptions {
  /** Upper bound of the decompressed size; more output is an error (reason 'too-large'). Default 1 GiB. */
  maxOutput?: number;
  /** Initial output buffer size (e.g. the size a kernel payload appends). Clamped to maxOutput. */
  sizeHint?: number;
  /**
   * Stop after the first stream and report where it ended (what the kernel's decompressor does: a bzImage
   * payload is one stream followed by the 4-byte uncompressed size). Default false: the whole input must be
   * streams and stream padding, as `xz -d` requires.
   */
  singleStream?: boolean;
}

export interface XzDecodeResult {
  data: Uint8Array;
  /** Input bytes consumed (end of the last stream read, stream padding included when not singleStream). */
  consumed: number;
  /** Check type of the last stream (0 none, 1 CRC32, 4 CRC64, 10 SHA-256). */
  check: number;
  blocks: number;
}

export type XzErrorReason =
  | 'truncated'
  | 'bad-magic'
  | 'bad-header'
  | 'unsupported-check'
  | 'unsupported-filter'
  | 'bad-block-header'
  | 'corrupt-data'
  | 'check-mismatch'
  | 'bad-index'
  | 'bad-footer'
  | 'bad-padding'
  | 'too-large';

export function xzError(reason: XzErrorReason, message: string, details: Record<string, unknown> = {}): KvmkitError {
  return new KvmkitError(DECOMPRESS_ERROR, `xz: ${message}`, { details: { format: 'xz', reason, ...details } });
}

// ---------------------------------------------------------------- checks

/** CRC32 tables for slicing-by-4: T[k][b] = CRC of byte b followed by k zero bytes. */
const CRC32_T = (() => {
  const t = new Uint32Array(256 * 4);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    for (let k = 1; k < 4; k++) t[k * 256 + i] = (t[(k - 1) * 256 + i]! >>> 8) ^ t[t[(k - 1) * 256 + i]! & 0xff]!;
  }
  return t;
})();

/** CRC32 (IEEE 802.3, reflected, as zlib/xz compute it). */
export function crc32(data: Uint8Array, start = 0, end = data.length): number {
  const t = CRC32_T;
  let c = ~0;
  let i = start;
  for (; i + 4 <= end; i += 4) {
    c ^= data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24);
    c = t[768 + (c & 0xff)]! ^ t[512 + ((c >>> 8) & 0xff)]! ^ t[256 + ((c >>> 16) & 0xff)]! ^ t[c >>> 24]!;
  }
  for (; i < end; i++) c = t[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

// CRC64 (ECMA-182 polynomial, reflected: 0xC96C5795D7870F42) with the 64-bit state split into two 32-bit halves.
const CRC64_LO = new Uint32Array(256);
const CRC64_HI = new Uint32Array(256);
(() => {
  const polyLo = 0xd7870f42;
  const polyHi = 0xc96c5795;
  for (let i = 0; i < 256; i++) {
    let lo = i;
    let hi = 0;
    for (let k = 0; k < 8; k++) {
      const bit = lo & 1;
      lo = ((lo >>> 1) | ((hi & 1) << 31)) >>> 0;
      hi = hi >>> 1;
      if (bit) {
        lo = (lo ^ polyLo) >>> 0;
        hi = (hi ^ polyHi) >>> 0;
      }
    }
    CRC64_LO[i] = lo;
    CRC64_HI[i] = hi;
  }
})();

/** CRC64 as xz computes it; returns the 8 little-endian bytes. */
export function crc64(data: Uint8Array, start = 0, end = data.length): Uint8Array {
  let lo = 0xffffffff;
  let hi = 0xffffffff;
  for (let i = start; i < end; i++) {
    const idx = (lo ^ data[i]!) & 0xff;
    lo = (((lo >>> 8) | (hi << 24)) ^ CRC64_LO[idx]!) >>> 0;
    hi = ((hi >>> 8) ^ CRC64_HI[idx]!) >>> 0;
  }
  lo = (lo ^ 0xffffffff) >>> 0;
  hi = (hi ^ 0xffffffff) >>> 0;
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, lo, true);
  dv.setUint32(4, hi, true);
  return out;
}

/** Size of the check field for each of the 16 check IDs (xz-file-format 3.1.2). */
function checkSize(id: number): number {
  if (id === 0) return 0;
  return 4 << Math.floor((id - 1) / 3);
}

function computeCheck(id: number, data: Uint8Array, start: number, end: number): Uint8Array {
  switch (id) {
    case XZ_CHECK_NONE:
      return new Uint8Array(0);
    case XZ_CHECK_CRC32: {
      const out = new Uint8Array(4);
      new DataView(out.buffer).setUint32(0, crc32(data, start, end), true);
      return out;
    }
    case XZ_CHECK_CRC64:
      return crc64(data, start, end);
    case XZ_CHECK_SHA256:
      return new Uint8Array(createHash('sha256').update(data.subarray(start, end)).digest());
    default:
      throw xzError('unsupported-check', `check type ${id} is not supported (none, CRC32, CRC64, SHA-256 are)`, { check: id });
  }
}

// ---------------------------------------------------------------- input cursor

class Input {
  pos: number;
  constructor(readonly buf: Uint8Array, start: number, readonly end: number) {
    this.pos = start;
  }
  need(n: number, what: string): void {
    if (n < 0 || this.pos + n > this.end) throw xzError('truncated', `input ends inside the ${what} (offset ${this.pos}, need ${n} bytes)`, { offset: this.pos });
  }
  u8(what: string): number {
    this.need(1, what);
    return this.buf[this.pos++]!;
  }
  u32(what: string): number {
    this.need(4, what);
    const b = this.buf;
    const p = this.pos;
    this.pos += 4;
    return (b[p]! | (b[p + 1]! << 8) | (b[p + 2]! << 16) | (b[p + 3]! << 24)) >>> 0;
  }
  /** Variable-length integer (xz-file-format 1.2): up to 9 bytes, no trailing zero byte; must fit 2^53. */
  vli(what: string, limit = this.end): number {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 9; i++) {
      if (this.pos >= limit) throw xzError(limit === this.end ? 'truncated' : 'bad-header', `the ${what} runs past its field`, { offset: this.pos });
      const b = this.buf[this.pos++]!;
      if (i > 0 && b === 0) throw xzError('bad-header', `the ${what} has a redundant zero byte`, { offset: this.pos - 1 });
      v += (b & 0x7f) * mul;
      if (!Number.isSafeInteger(v)) throw xzError('bad-header', `the ${what} is too large`, { offset: this.pos - 1 });
      if ((b & 0x80) === 0) return v;
      mul *= 128;
    }
    throw xzError('bad-header', `the ${what} is longer than 9 bytes`, { offset: this.pos });
  }
}

// ---------------------------------------------------------------- growable output

class Output {
  buf: Uint8Array;
  pos = 0;
  constructor(initial: number, readonly max: number) {
    this.buf = new Uint8Array(Math.max(64, Math.min(initial, max)));
  }
  /** Makes room for n more bytes or throws 'too-large'. */
  reserve(n: number): void {
    const need = this.pos + n;
    if (need <= this.buf.length) return;
    if (need > this.max) throw xzError('too-large', `the decompressed data exceeds the limit of ${this.max} bytes`, { max: this.max });
    let size = this.buf.length;
    while (size < need) size *= 2;
    if (size > this.max) size = this.max;
    const nb = new Uint8Array(size);
    nb.set(this.buf.subarray(0, this.pos));
    this.buf = nb;
  }
}

// ---------------------------------------------------------------- LZMA / LZMA2

const NUM_STATES = 12;
const POS_STATES_MAX = 16;
// Offsets of the probability groups inside one Uint16Array.
const P_IS_MATCH = 0;
const P_IS_REP = P_IS_MATCH + NUM_STATES * POS_STATES_MAX;
const P_IS_REP_G0 = P_IS_REP + NUM_STATES;
const P_IS_REP_G1 = P_IS_REP_G0 + NUM_STATES;
const P_IS_REP_G2 = P_IS_REP_G1 + NUM_STATES;
const P_IS_REP0_LONG = P_IS_REP_G2 + NUM_STATES;
const P_POS_SLOT = P_IS_REP0_LONG + NUM_STATES * POS_STATES_MAX; // 4 × 64
const P_POS_SPECIAL = P_POS_SLOT + 4 * 64; // 1 + 128 - 14 = 115
const P_ALIGN = P_POS_SPECIAL + 115; // 16
// Length coders: choice, choice2, low[16][8], mid[16][8], high[256]
const LEN_CHOICE = 0;
const LEN_CHOICE2 = 1;
const LEN_LOW = 2;
const LEN_MID = LEN_LOW + POS_STATES_MAX * 8;
const LEN_HIGH = LEN_MID + POS_STATES_MAX * 8;
const LEN_SIZE = LEN_HIGH + 256;
const P_LEN = P_ALIGN + 16;
const P_REP_LEN = P_LEN + LEN_SIZE;
const P_LITERAL = P_REP_LEN + LEN_SIZE;
const LITERAL_SIZE = 0x300 << 4; // lc + lp <= 4 in LZMA2
const PROBS_SIZE = P_LITERAL + LITERAL_SIZE;

const TOP = 1 << 24;

/** LZMA2 decoder writing into an Output; the dictionary is the output itself (since the last dict reset). */
class Lzma2Decoder {
  private readonly probs = new Uint16Array(PROBS_SIZE);
  private lc = 0;
  private lp = 0;
  private pb = 0;
  private state = 0;
  private rep0 = 0;
  private rep1 = 0;
  private rep2 = 0;
  private rep3 = 0;
  // range decoder
  private range = 0;
  private code = 0;
  private inBuf: Uint8Array = new Uint8Array(0);
  private inPos = 0;
  private inEnd = 0;
  /** Output position of the last dictionary reset. */
  private dictStart = 0;

  constructor(private readonly dictSize: number) {}

  /** Decodes one LZMA2 stream starting at inp.pos; returns with inp.pos just after the end marker. */
  decode(inp: Input, out: Output): void {
    let needDictReset = true;
    let needProps = true;
    for (;;) {
      const control = inp.u8('LZMA2 chunk header');
      if (control === 0x00) return;
      if (control >= 0xe0 || control === 0x01) {
        needProps = true;
        needDictReset = false;
        this.dictStart = out.pos;
      } else if (needDictReset) {
        throw xzError('corrupt-data', `LZMA2: the first chunk (control ${control.toString(16)}) does not reset the dictionary`, { offset: inp.pos - 1 });
      }
      if (control >= 0x80) {
        inp.need(4, 'LZMA2 chunk header');
        const b = inp.buf;
        const p = inp.pos;
        const usize = (control & 0x1f) * 65536 + (b[p]! << 8) + b[p + 1]! + 1;
        const csize = (b[p + 2]! << 8) + b[p + 3]! + 1;
        inp.pos += 4;
        const reset = (control >> 5) & 3;
        if (reset >= 2) {
          this.setProps(inp.u8('LZMA2 properties'), inp.pos - 1);
          needProps = false;
        } else if (needProps) {
          throw xzError('corrupt-data', 'LZMA2: an LZMA chunk without properties after a dictionary reset', { offset: inp.pos - 5 });
        }
        if (reset >= 1) this.resetState();
        inp.need(csize, 'LZMA2 compressed chunk');
        out.reserve(usize);
        this.decodeChunk(inp.buf, inp.pos, inp.pos + csize, out, usize);
        inp.pos += csize;
      } else if (control <= 0x02) {
        inp.need(2, 'LZMA2 chunk header');
        const size = (inp.buf[inp.pos]! << 8) + inp.buf[inp.pos + 1]! + 1;
        inp.pos += 2;
        inp.need(size, 'LZMA2 uncompressed chunk');
        out.reserve(size);
        out.buf.set(inp.buf.subarray(inp.pos, inp.pos + size), out.pos);
        out.pos += size;
        inp.pos += size;
      } else {
        throw xzError('corrupt-data', `LZMA2: invalid chunk control byte 0x${control.toString(16)}`, { offset: inp.pos - 1 });
      }
    }
  }

  private setProps(props: number, offset: number): void {
    if (props >= 9 * 5 * 5) throw xzError('corrupt-data', `LZMA2: invalid properties byte ${props}`, { offset });
    const lc = props % 9;
    const rest = Math.floor(props / 9);
    const lp = rest % 5;
    const pb = Math.floor(rest / 5);
    if (lc + lp > 4) throw xzError('corrupt-data', `LZMA2: lc ${lc} + lp ${lp} > 4`, { offset });
    this.lc = lc;
    this.lp = lp;
    this.pb = pb;
  }

  private resetState(): void {
    this.probs.fill(1024);
    this.state = 0;
    this.rep0 = this.rep1 = this.rep2 = this.rep3 = 0;
  }

  // --- range decoder (normalization after every bit: the same bytes are consumed as the reference decoders' normalize-before + final normalize)

  private bit(i: number): number {
    const probs = this.probs;
    const p = probs[i]!;
    const bound = (this.range >>> 11) * p;
    let bit: number;
    if (this.code < bound) {
      this.range = bound;
      probs[i] = p + ((2048 - p) >>> 5);
      bit = 0;
    } else {
      this.range -= bound;
      this.code -= bound;
      probs[i] = p - (p >>> 5);
      bit = 1;
    }
    if (this.range < TOP) this.shift();
    return bit;
  }

  private shift(): void {
    if (this.inPos >= this.inEnd) throw xzError('corrupt-data', 'LZMA: the range decoder ran past the end of its chunk', { offset: this.inPos });
    this.range = (this.range * 256) >>> 0;
    this.code = ((this.code * 256) + this.inBuf[this.inPos++]!) >>> 0;
  }

  private tree(base: number, bits: number): number {
    let m = 1;
    for (let i = 0; i < bits; i++) m = (m << 1) | this.bit(base + m);
    return m - (1 << bits);
  }

  private reverseTree(base: number, bits: number): number {
    let m = 1;
    let sym = 0;
    for (let i = 0; i < bits; i++) {
      const b = this.bit(base + m);
      m = (m << 1) | b;
      sym |= b << i;
    }
    return sym;
  }

  private direct(bits: number): number {
    let r = 0;
    for (let i = 0; i < bits; i++) {
      this.range >>>= 1;
      let b = 0;
      if (this.code >= this.range) {
        this.code -= this.range;
        b = 1;
      }
      r = r * 2 + b;
      if (this.range < TOP) this.shift();
    }
    return r;
  }

  private len(base: number, posState: number): number {
    if (this.bit(base + LEN_CHOICE) === 0) return this.tree(base + LEN_LOW + posState * 8, 3);
    if (this.bit(base + LEN_CHOICE2) === 0) return 8 + this.tree(base + LEN_MID + posState * 8, 3);
    return 16 + this.tree(base + LEN_HIGH, 8);
  }

  /** Decodes one LZMA chunk: [start, end) of compressed input producing exactly `usize` bytes. */
  private decodeChunk(inBuf: Uint8Array, start: number, end: number, out: Output, usize: number): void {
    if (end - start < 5 || inBuf[start] !== 0) throw xzError('corrupt-data', 'LZMA: bad range coder start', { offset: start });
    this.inBuf = inBuf;
    this.inEnd = end;
    this.code = ((inBuf[start + 1]! << 24) | (inBuf[start + 2]! << 16) | (inBuf[start + 3]! << 8) | inBuf[start + 4]!) >>> 0;
    this.range = 0xffffffff;
    this.inPos = start + 5;
    if (this.code === 0xffffffff) throw xzError('corrupt-data', 'LZMA: bad range coder start', { offset: start });

    const buf = out.buf; // reserved for usize bytes already
    let pos = out.pos;
    const limit = pos + usize;
    const dictStart = this.dictStart;
    const dictSize = this.dictSize;
    const pbMask = (1 << this.pb) - 1;
    const lpMask = (1 << this.lp) - 1;
    const lc = this.lc;
    let state = this.state;
    let rep0 = this.rep0, rep1 = this.rep1, rep2 = this.rep2, rep3 = this.rep3;

    // The range decoder's state lives in locals in the hot path (is-match bit and literals) and in the fields
    // while the helper methods decode matches; sync() / load() move it between the two.
    const probs = this.probs;
    let range = this.range;
    let code = this.code;
    let ip = this.inPos;
    const inEnd = end;
    let p = 0;
    let bound = 0;
    let b = 0;

    while (pos < limit) {
      const rel = pos - dictStart; // positions count from the last dictionary reset
      const posState = rel & pbMask;
      // is-match bit, inlined
      const im = P_IS_MATCH + (state << 4) + posState;
      p = probs[im]!;
      bound = (range >>> 11) * p;
      if (code < bound) {
        range = bound;
        probs[im] = p + ((2048 - p) >>> 5);
        b = 0;
      } else {
        range -= bound;
        code -= bound;
        probs[im] = p - (p >>> 5);
        b = 1;
      }
      if (range < TOP) {
        if (ip >= inEnd) throw xzError('corrupt-data', 'LZMA: the range decoder ran past the end of its chunk', { offset: ip });
        range *= 256;
        code = code * 256 + inBuf[ip++]!;
      }
      if (b === 0) {
        // literal, inlined
        const prev = pos > dictStart ? buf[pos - 1]! : 0;
        const base = P_LITERAL + 0x300 * (((rel & lpMask) << lc) + (prev >>> (8 - lc)));
        let sym = 1;
        if (state >= 7) {
          const mpos = pos - rep0 - 1;
          if (mpos < dictStart) throw xzError('corrupt-data', 'LZMA: match byte before the dictionary start', { offset: ip });
          let matchByte = buf[mpos]!;
          do {
            const matchBit = (matchByte >>> 7) & 1;
            matchByte <<= 1;
            const i = base + ((1 + matchBit) << 8) + sym;
            p = probs[i]!;
            bound = (range >>> 11) * p;
            if (code < bound) {
              range = bound;
              probs[i] = p + ((2048 - p) >>> 5);
              b = 0;
            } else {
              range -= bound;
              code -= bound;
              probs[i] = p - (p >>> 5);
              b = 1;
            }
            if (range < TOP) {
              if (ip >= inEnd) throw xzError('corrupt-data', 'LZMA: the range decoder ran past the end of its chunk', { offset: ip });
              range *= 256;
              code = code * 256 + inBuf[ip++]!;
            }
            sym = (sym << 1) | b;
            if (matchBit !== b) break;
          } while (sym < 0x100);
        }
        while (sym < 0x100) {
          const i = base + sym;
          p = probs[i]!;
          bound = (range >>> 11) * p;
          if (code < bound) {
            range = bound;
            probs[i] = p + ((2048 - p) >>> 5);
            sym <<= 1;
          } else {
            range -= bound;
            code -= bound;
            probs[i] = p - (p >>> 5);
            sym = (sym << 1) | 1;
          }
          if (range < TOP) {
            if (ip >= inEnd) throw xzError('corrupt-data', 'LZMA: the range decoder ran past the end of its chunk', { offset: ip });
            range *= 256;
            code = code * 256 + inBuf[ip++]!;
          }
        }
        buf[pos++] = sym & 0xff;
        state = state < 4 ? 0 : state < 10 ? state - 3 : state - 6;
        continue;
      }
      // matches: decoded with the helper methods on the fields
      this.range = range;
      this.code = code;
      this.inPos = ip;
      let len: number;
      if (this.bit(P_IS_REP + state) === 0) {
        // simple match
        rep3 = rep2;
        rep2 = rep1;
        rep1 = rep0;
        len = this.len(P_LEN, posState);
        state = state < 7 ? 7 : 10;
        const lenState = len < 3 ? len : 3;
        const slot = this.tree(P_POS_SLOT + lenState * 64, 6);
        if (slot < 4) {
          rep0 = slot;
        } else {
          const nd = (slot >>> 1) - 1;
          let dist = (2 | (slot & 1)) * 2 ** nd;
          if (slot < 14) {
            dist += this.reverseTree(P_POS_SPECIAL + dist - slot, nd);
          } else {
            dist += this.direct(nd - 4) * 16;
            dist += this.reverseTree(P_ALIGN, 4);
          }
          rep0 = dist;
        }
        if (rep0 === 0xffffffff) throw xzError('corrupt-data', 'LZMA: end-of-payload marker inside an LZMA2 chunk', { offset: this.inPos });
      } else {
        if (pos <= dictStart) throw xzError('corrupt-data', 'LZMA: repeated match with an empty dictionary', { offset: this.inPos });
        if (this.bit(P_IS_REP_G0 + state) === 0) {
          if (this.bit(P_IS_REP0_LONG + (state << 4) + posState) === 0) {
            // short rep: one byte at rep0
            state = state < 7 ? 9 : 11;
            const src = pos - rep0 - 1;
            if (src < dictStart || rep0 >= dictSize) throw xzError('corrupt-data', 'LZMA: distance beyond the dictionary', { offset: this.inPos, distance: rep0 + 1 });
            buf[pos] = buf[src]!;
            pos++;
            range = this.range;
            code = this.code;
            ip = this.inPos;
            continue;
          }
        } else {
          let dist: number;
          if (this.bit(P_IS_REP_G1 + state) === 0) {
            dist = rep1;
          } else {
            if (this.bit(P_IS_REP_G2 + state) === 0) {
              dist = rep2;
            } else {
              dist = rep3;
              rep3 = rep2;
            }
            rep2 = rep1;
          }
          rep1 = rep0;
          rep0 = dist;
        }
        len = this.len(P_REP_LEN, posState);
        state = state < 7 ? 8 : 11;
      }
      range = this.range;
      code = this.code;
      ip = this.inPos;
      // copy len + 2 bytes from distance rep0 + 1
      let n = len + 2;
      let src = pos - rep0 - 1;
      if (src < dictStart || rep0 >= dictSize) throw xzError('corrupt-data', 'LZMA: distance beyond the dictionary', { offset: this.inPos, distance: rep0 + 1 });
      if (n > limit - pos) throw xzError('corrupt-data', 'LZMA: a match runs past the end of its chunk', { offset: this.inPos });
      if (n > 64 && rep0 + 1 >= n) {
        buf.copyWithin(pos, src, src + n);
        pos += n;
      } else {
        while (n-- > 0) buf[pos++] = buf[src++]!;
      }
    }
    this.range = range;
    this.code = code;
    this.inPos = ip;
    this.state = state;
    this.rep0 = rep0;
    this.rep1 = rep1;
    this.rep2 = rep2;
    this.rep3 = rep3;
    out.pos = pos;
    if (this.inPos !== end || this.code !== 0) {
      throw xzError('corrupt-data', `LZMA: chunk ended with ${end - this.inPos} unused compressed bytes or a nonzero range code`, { offset: this.inPos });
    }
  }
}

/** LZMA2 dictionary size from its filter property byte. */
function lzma2DictSize(b: number): number {
  if (b > 40) throw xzError('bad-block-header', `LZMA2 dictionary size byte ${b} > 40`);
  if (b === 40) return 0xffffffff;
  return (2 | (b & 1)) * 2 ** (Math.floor(b / 2) + 11);
}

// ---------------------------------------------------------------- BCJ x86

const X86_ALLOWED = [true, true, true, false, true, false, false, false];
const X86_BIT = [0, 1, 2, 2, 3, 3, 3, 3];
const isMsByte = (b: number) => b === 0 || b === 0xff;

/**
 * Undoes the x86 BCJ filter over [start, end) of buf in place: CALL/JMP rel32 (E8/E9) targets that the encoder
 * made absolute become relative again. `startOffset` is the filter's start offset property. Processing the
 * whole block at once equals the streaming filter (its last < 5 bytes are never converted).
 */
export function bcjX86Decode(buf: Uint8Array, start: number, end: number, startOffset = 0): void {
  const size = end - start;
  if (size < 5) return;
  let prevMask = 0;
  let prevPos = -5; // relative to the block start, as (start offset + i)
  const limit = size - 5;
  let i = 0;
  while (i <= limit) {
    const op = buf[start + i]!;
    if (op !== 0xe8 && op !== 0xe9) {
      i++;
      continue;
    }
    const offset = i - prevPos;
    prevPos = i;
    if (offset > 5) {
      prevMask = 0;
    } else {
      for (let k = 0; k < offset; k++) {
        prevMask &= 0x77;
        prevMask <<= 1;
      }
    }
    let b = buf[start + i + 4]!;
    if (isMsByte(b) && X86_ALLOWED[(prevMask >>> 1) & 7] && prevMask >>> 1 < 0x10) {
      const p = start + i;
      let src = (b * 0x1000000 + (buf[p + 3]! << 16) + (buf[p + 2]! << 8) + buf[p + 1]!) >>> 0;
      let dest: number;
      for (;;) {
        dest = (src - ((startOffset + i + 5) >>> 0)) >>> 0;
        if (prevMask === 0) break;
        const idx = X86_BIT[prevMask >>> 1]!;
        b = (dest >>> (24 - idx * 8)) & 0xff;
        if (!isMsByte(b)) break;
        src = (dest ^ (2 ** (32 - idx * 8) - 1)) >>> 0;
      }
      buf[p + 4] = (dest >>> 24) & 1 ? 0xff : 0x00;
      buf[p + 3] = (dest >>> 16) & 0xff;
      buf[p + 2] = (dest >>> 8) & 0xff;
      buf[p + 1] = dest & 0xff;
      i += 5;
      prevMask = 0;
    } else {
      i++;
      prevMask |= 1;
      if (isMsByte(b)) prevMask |= 0x10;
    }
  }
}

// ---------------------------------------------------------------- container

interface Filter {
  id: number;
  props: Uint8Array;
}

interface BlockRecord {
  unpadded: number;
  uncompressed: number;
}

function readStreamFlags(b: Uint8Array, at: number, what: string): number {
  if (b[at] !== 0 || (b[at + 1]! & 0xf0) !== 0) throw xzError('bad-header', `reserved bits set in the ${what} stream flags`, { offset: at });
  return b[at + 1]! & 0x0f;
}

function decodeBlock(inp: Input, out: Output, headerSizeByte: number, check: number): BlockRecord {
  const headerStart = inp.pos - 1;
  const headerSize = (headerSizeByte + 1) * 4;
  inp.pos = headerStart;
  inp.need(headerSize, 'block header');
  const hdrEnd = headerStart + headerSize;
  const storedCrc = new DataView(inp.buf.buffer, inp.buf.byteOffset).getUint32(hdrEnd - 4, true);
  if (crc32(inp.buf, headerStart, hdrEnd - 4) !== storedCrc) throw xzError('check-mismatch', 'block header CRC32 mismatch', { offset: headerStart });
  inp.pos = headerStart + 1;
  const flags = inp.buf[inp.pos++]!;
  if (flags & 0x3c) throw xzError('bad-block-header', 'reserved block flags set', { offset: headerStart });
  const nFilters = (flags & 3) + 1;
  const fieldEnd = hdrEnd - 4;
  const compressedSize = flags & 0x40 ? inp.vli('compressed size', fieldEnd) : undefined;
  const uncompressedSize = flags & 0x80 ? inp.vli('uncompressed size', fieldEnd) : undefined;
  if (compressedSize === 0) throw xzError('bad-block-header', 'compressed size 0', { offset: headerStart });
  const filters: Filter[] = [];
  for (let i = 0; i < nFilters; i++) {
    const id = inp.vli('filter ID', fieldEnd);
    const psize = inp.vli('filter properties size', fieldEnd);
    if (inp.pos + psize > fieldEnd) throw xzError('bad-block-header', 'filter properties run past the block header', { offset: inp.pos });
    filters.push({ id, props: inp.buf.subarray(inp.pos, inp.pos + psize) });
    inp.pos += psize;
  }
  for (let p = inp.pos; p < fieldEnd; p++) {
    if (inp.buf[p] !== 0) throw xzError('bad-block-header', 'nonzero block header padding', { offset: p });
  }
  // Filter chain: [x86]* lzma2 (the last filter is LZMA2; others must be BCJ x86).
  const last = filters[filters.length - 1]!;
  if (last.id !== FILTER_LZMA2) throw xzError('unsupported-filter', `last filter 0x${last.id.toString(16)} is not LZMA2`, { filter: last.id });
  if (last.props.length !== 1) throw xzError('bad-block-header', 'LZMA2 filter properties must be 1 byte');
  const dictSize = lzma2DictSize(last.props[0]!);
  const bcj: number[] = [];
  for (const f of filters.slice(0, -1)) {
    if (f.id === FILTER_LZMA2) throw xzError('unsupported-filter', 'LZMA2 is only allowed as the last filter');
    if (f.id !== FILTER_X86) throw xzError('unsupported-filter', `filter 0x${f.id.toString(16)} is not supported (BCJ x86 and LZMA2 are)`, { filter: f.id });
    if (f.props.length === 0) bcj.push(0);
    else if (f.props.length === 4) bcj.push(new DataView(f.props.buffer, f.props.byteOffset, 4).getUint32(0, true));
    else throw xzError('bad-block-header', `BCJ x86 properties of ${f.props.length} bytes`);
  }
  inp.pos = hdrEnd;

  const dataStart = inp.pos;
  const outStart = out.pos;
  const dataLimit = compressedSize !== undefined ? dataStart + compressedSize : inp.end;
  if (dataLimit > inp.end) throw xzError('truncated', 'input ends inside a block', { offset: dataStart });
  if (uncompressedSize !== undefined && outStart + uncompressedSize > out.max) {
    throw xzError('too-large', `a block of ${uncompressedSize} bytes exceeds the output limit of ${out.max}`, { max: out.max });
  }
  const sub = new Input(inp.buf, dataStart, dataLimit);
  new Lzma2Decoder(dictSize).decode(sub, out);
  inp.pos = sub.pos;
  const csize = inp.pos - dataStart;
  const usize = out.pos - outStart;
  if (compressedSize !== undefined && csize !== compressedSize) throw xzError('corrupt-data', `block compressed size is ${csize}, header says ${compressedSize}`, { offset: dataStart });
  if (uncompressedSize !== undefined && usize !== uncompressedSize) throw xzError('corrupt-data', `block uncompressed size is ${usize}, header says ${uncompressedSize}`, { offset: dataStart });
  for (let k = bcj.length - 1; k >= 0; k--) bcjX86Decode(out.buf, outStart, out.pos, bcj[k]);
  // block padding
  while ((inp.pos - headerStart) % 4 !== 0) {
    if (inp.u8('block padding') !== 0) throw xzError('bad-padding', 'nonzero block padding', { offset: inp.pos - 1 });
  }
  const cs = checkSize(check);
  inp.need(cs, 'block check');
  if (check === XZ_CHECK_NONE || check === XZ_CHECK_CRC32 || check === XZ_CHECK_CRC64 || check === XZ_CHECK_SHA256) {
    const want = computeCheck(check, out.buf, outStart, out.pos);
    for (let k = 0; k < cs; k++) {
      if (inp.buf[inp.pos + k] !== want[k]) throw xzError('check-mismatch', `block ${['none', 'CRC32', '', '', 'CRC64'][check] ?? 'SHA-256'} check mismatch`, { offset: inp.pos });
    }
  }
  inp.pos += cs;
  return { unpadded: headerSize + csize + cs, uncompressed: usize };
}

function decodeIndex(inp: Input, records: BlockRecord[]): number {
  const start = inp.pos - 1; // the 0x00 indicator was read
  const n = inp.vli('index record count');
  if (n !== records.length) throw xzError('bad-index', `index lists ${n} blocks, the stream has ${records.length}`, { offset: start });
  for (let i = 0; i < n; i++) {
    const unpadded = inp.vli('index unpadded size');
    const uncompressed = inp.vli('index uncompressed size');
    if (unpadded !== records[i]!.unpadded || uncompressed !== records[i]!.uncompressed) {
      throw xzError('bad-index', `index record ${i} (${unpadded}/${uncompressed}) does not match block (${records[i]!.unpadded}/${records[i]!.uncompressed})`, { offset: start });
    }
  }
  while ((inp.pos - start) % 4 !== 0) {
    if (inp.u8('index padding') !== 0) throw xzError('bad-padding', 'nonzero index padding', { offset: inp.pos - 1 });
  }
  const crc = crc32(inp.buf, start, inp.pos);
  if (inp.u32('index CRC32') !== crc) throw xzError('check-mismatch', 'index CRC32 mismatch', { offset: inp.pos - 4 });
  return inp.pos - start;
}

function decodeStream(inp: Input, out: Output): { check: number; blocks: number } {
  const start = inp.pos;
  inp.need(12, 'stream header');
  for (let i = 0; i < 6; i++) if (inp.buf[start + i] !== XZ_MAGIC[i]) throw xzError('bad-magic', 'not an xz stream (bad magic)', { offset: start });
  const check = readStreamFlags(inp.buf, start + 6, 'header');
  const hcrc = new DataView(inp.buf.buffer, inp.buf.byteOffset).getUint32(start + 8, true);
  if (crc32(inp.buf, start + 6, start + 8) !== hcrc) throw xzError('check-mismatch', 'stream header CRC32 mismatch', { offset: start });
  if (check !== XZ_CHECK_NONE && check !== XZ_CHECK_CRC32 && check !== XZ_CHECK_CRC64 && check !== XZ_CHECK_SHA256) {
    throw xzError('unsupported-check', `check type ${check} is not supported (none, CRC32, CRC64, SHA-256 are)`, { check });
  }
  inp.pos = start + 12;
  const records: BlockRecord[] = [];
  let indexSize: number;
  for (;;) {
    const b = inp.u8('block header or index');
    if (b === 0) {
      indexSize = decodeIndex(inp, records);
      break;
    }
    records.push(decodeBlock(inp, out, b, check));
  }
  // footer
  inp.need(12, 'stream footer');
  const f = inp.pos;
  const b = inp.buf;
  if (b[f + 10] !== FOOTER_MAGIC0 || b[f + 11] !== FOOTER_MAGIC1) throw xzError('bad-footer', 'bad stream footer magic', { offset: f });
  const dv = new DataView(b.buffer, b.byteOffset);
  if (crc32(b, f + 4, f + 10) !== dv.getUint32(f, true)) throw xzError('check-mismatch', 'stream footer CRC32 mismatch', { offset: f });
  const backward = (dv.getUint32(f + 4, true) + 1) * 4;
  if (backward !== indexSize) throw xzError('bad-footer', `footer backward size ${backward} != index size ${indexSize}`, { offset: f });
  if (readStreamFlags(b, f + 8, 'footer') !== check) throw xzError('bad-footer', 'stream flags in header and footer differ', { offset: f });
  inp.pos = f + 12;
  return { check, blocks: records.length };
}

/** True when data starts with the xz stream magic. */
export function isXz(data: Uint8Array): boolean {
  if (data.length < 6) return false;
  for (let i = 0; i < 6; i++) if (data[i] !== XZ_MAGIC[i]) return false;
  return true;
}

/** Decodes .xz data (see XzDecodeOptions). Throws KvmkitError KVMKIT_ERR_BOOT_DECOMPRESS on any malformed input. */
export function xzDecompress(input: Uint8Array, opts: XzDecodeOptions = {}): XzDecodeResult {
  const max = opts.maxOutput ?? 1 << 30;
  if (!Number.isSafeInteger(max) || max < 0) throw new KvmkitError('KVMKIT_ERR_CONFIG', `xz: bad maxOutput ${max}`);
  const out = new Output(opts.sizeHint ?? Math.min(max, input.length * 4), max);
  const inp = new Input(input, 0, input.length);
  let r = decodeStream(inp, out);
  let blocks = r.blocks;
  if (!opts.singleStream) {
    for (;;) {
      // stream padding: groups of 4 zero bytes, then maybe another stream
      const padStart = inp.pos;
      while (inp.pos < inp.end && inp.buf[inp.pos] === 0) inp.pos++;
      if ((inp.pos - padStart) % 4 !== 0) throw xzError('bad-padding', 'stream padding is not a multiple of 4 bytes', { offset: padStart });
      if (inp.pos === inp.end) break;
      r = decodeStream(inp, out);
      blocks += r.blocks;
    }
  }
  return { data: out.buf.subarray(0, out.pos), consumed: inp.pos, check: r.check, blocks };
}
