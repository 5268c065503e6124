import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as zlib from 'node:zlib';
import { isKvmkitError } from '@kvmkit/kernel';
import { xzDecompress, crc32, crc64, bcjX86Decode, isXz, DECOMPRESS_ERROR } from './xz.js';
import { findGuestKernel } from '@kvmkit/testkit';

let haveXz = true;
try {
  execFileSync('xz', ['--version'], { stdio: 'ignore' });
} catch {
  haveXz = false;
  console.warn('xz tests against the xz CLI skipped: install xz-utils');
}

const MiB = 1024 * 1024;

/** Deterministic pseudo-random bytes (xorshift32). */
function prng(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** Structured data: text, long repeats, near-repeats and x86-like code with CALL/JMP rel32 (BCJ food). */
function structured(n: number): Uint8Array {
  const out = new Uint8Array(n);
  const r = prng(n, 7);
  let i = 0;
  let k = 0;
  while (i < n) {
    const kind = k++ % 4;
    if (kind === 0) {
      const s = new TextEncoder().encode(`line ${k} of some text: the quick brown fox ${k % 17} jumps over the lazy dog\n`);
      out.set(s.subarray(0, Math.min(s.length, n - i)), i);
      i += s.length;
    } else if (kind === 1) {
      // copy an earlier stretch with a few changed bytes
      const len = Math.min(200 + (r[i % n]! << 2), n - i);
      const from = i > 5000 ? i - 1000 - (r[(i + 1) % n]! * 13) : 0;
      for (let j = 0; j < len; j++) out[i + j] = j % 97 === 0 ? r[(i + j) % n]! : out[from + j]!;
      i += len;
    } else if (kind === 2) {
      // x86-ish: push/mov/call rel32/jmp rel32 with small displacements
      for (let j = 0; j < 64 && i + 5 <= n; j++) {
        const op = j % 3 === 0 ? 0xe8 : j % 3 === 1 ? 0xe9 : 0x48;
        out[i++] = op;
        const disp = ((r[i % n]! << 8) | r[(i + 1) % n]!) - 0x8000;
        new DataView(out.buffer).setInt32(i, disp, true);
        i += 4;
      }
    } else {
      const len = Math.min(r[i % n]! + 1, n - i);
      out.set(r.subarray(i, i + len), i);
      i += len;
    }
  }
  return out;
}

function codeOf(f: () => unknown): { code: string; reason?: unknown } | 'ok' {
  try {
    f();
    return 'ok';
  } catch (e) {
    if (isKvmkitError(e)) return { code: e.code, reason: e.details.reason };
    throw e;
  }
}

describe('checksums', () => {
  it('CRC32 and CRC64 match the standard check values and zlib', () => {
    const nine = new TextEncoder().encode('123456789');
    expect(crc32(nine)).toBe(0xcbf43926);
    expect(Buffer.from(crc64(nine)).readBigUInt64LE()).toBe(0x995dc9bbdf1939fan);
    expect(Buffer.from(crc64(new Uint8Array(0))).readBigUInt64LE()).toBe(0n);
    const data = prng(100_000, 3);
    const z = (zlib as unknown as { crc32?: (d: Uint8Array) => number }).crc32;
    if (z) expect(crc32(data)).toBe(z(data));
  });
});

describe('BCJ x86', () => {
  it('leaves short buffers and buffers without E8/E9 alone', () => {
    const a = Uint8Array.of(0xe8, 1, 2, 3);
    bcjX86Decode(a, 0, a.length);
    expect([...a]).toEqual([0xe8, 1, 2, 3]);
    const b = Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8, 9);
    bcjX86Decode(b, 0, b.length);
    expect([...b]).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });
  it('turns an absolute CALL target back into rel32', () => {
    // encoder: at offset 16, E8 with rel 0x100 → absolute 0x100 + 16 + 5 = 0x115
    const buf = new Uint8Array(32);
    buf[16] = 0xe8;
    new DataView(buf.buffer).setUint32(17, 0x115, true);
    bcjX86Decode(buf, 0, buf.length);
    expect(new DataView(buf.buffer).getInt32(17, true)).toBe(0x100);
  });
});

describe.skipIf(!haveXz)('xz decoder against the xz CLI', () => {
  let tmp: string;
  beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'kvmkit-xz-')); });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  let n = 0;
  const xz = (data: Uint8Array, args: string[]): Uint8Array => {
    const f = join(tmp, `in${n++}`);
    writeFileSync(f, data);
    return new Uint8Array(execFileSync('xz', ['-c', '-T1', ...args, f], { maxBuffer: 256 * MiB }));
  };
  const roundTrip = (data: Uint8Array, args: string[]) => {
    const c = xz(data, args);
    expect(isXz(c)).toBe(true);
    const r = xzDecompress(c);
    expect(r.data.length).toBe(data.length);
    expect(Buffer.compare(r.data, data)).toBe(0);
    expect(r.consumed).toBe(c.length);
    return { c, r };
  };

  const random = prng(1 * MiB + 123, 1);
  const struct = structured(2 * MiB + 77);

  it.each([
    ['crc32', ['--check=crc32']],
    ['crc64', ['--check=crc64']],
    ['none', ['--check=none']],
    ['sha256', ['--check=sha256']],
  ])('check %s on random and structured data', (_name, args) => {
    const a = roundTrip(random, args);
    roundTrip(struct, args);
    expect(a.r.check).toBe({ '--check=crc32': 1, '--check=crc64': 4, '--check=none': 0, '--check=sha256': 10 }[args[0]!]);
  });

  it.each([
    ['x86 + lzma2 preset 6', ['--x86', '--lzma2=preset=6', '--check=crc32']],
    ['x86 start offset', ['--x86=start=4096', '--lzma2=preset=1']],
    ['lc=4 lp=0 pb=0', ['--lzma2=preset=6,lc=4,lp=0,pb=0']],
    ['lc=0 lp=4 pb=4', ['--lzma2=preset=6,lc=0,lp=4,pb=4']],
    ['lc=1 lp=3 pb=1', ['--lzma2=lc=1,lp=3,pb=1']],
    ['4 KiB dictionary', ['--lzma2=dict=4KiB']],
    ['extreme', ['--lzma2=preset=6e']],
    ['fast (hc3)', ['--lzma2=preset=0']],
    ['multiple blocks', ['--block-size=65536', '--check=crc64']],
    ['blocks with sizes, x86', ['--block-list=1000,70000,3,0', '--x86', '--lzma2=preset=2']],
  ])('%s', (_name, args) => {
    roundTrip(struct, args);
    roundTrip(random.subarray(0, 200_000), args);
  });

  it('empty, one byte, long runs of zeros (uncompressed and LZMA chunks, repeats)', () => {
    roundTrip(new Uint8Array(0), []);
    roundTrip(Uint8Array.of(42), ['--check=crc64']);
    roundTrip(new Uint8Array(3 * MiB), ['--x86', '--lzma2=preset=9']);
    const { r } = roundTrip(random.subarray(0, 300_000), ['--block-size=100000']);
    expect(r.blocks).toBe(3);
  });

  it('concatenated streams with stream padding; singleStream stops after the first', () => {
    const a = xz(struct.subarray(0, 50_000), ['--check=crc32']);
    const b = xz(random.subarray(0, 10_000), ['--check=sha256']);
    const cat = new Uint8Array([...a, 0, 0, 0, 0, ...b, 0, 0, 0, 0, 0, 0, 0, 0]);
    const r = xzDecompress(cat);
    expect(Buffer.compare(r.data, Buffer.concat([struct.subarray(0, 50_000), random.subarray(0, 10_000)]))).toBe(0);
    expect(r.blocks).toBe(2);
    const one = xzDecompress(new Uint8Array([...a, 1, 2, 3, 4]), { singleStream: true });
    expect(one.consumed).toBe(a.length);
    expect(one.data.length).toBe(50_000);
    // bad stream padding (not a multiple of 4) and trailing garbage without singleStream
    expect(codeOf(() => xzDecompress(new Uint8Array([...a, 0, 0])))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'bad-padding' });
    expect(codeOf(() => xzDecompress(new Uint8Array([...a, 1, 2, 3, 4])))).toMatchObject({ code: DECOMPRESS_ERROR });
  });

  it('every truncation of a stream is a coded error', () => {
    const c = xz(struct.subarray(0, 8000), ['--x86', '--lzma2', '--check=crc32', '--block-size=3000']);
    for (let len = 0; len < c.length; len++) {
      const r = codeOf(() => xzDecompress(c.subarray(0, len)));
      expect(r, `truncated to ${len}`).toMatchObject({ code: DECOMPRESS_ERROR });
    }
  });

  it('every single-bit flip in a checked stream is a coded error (never wrong data, a hang or another exception)', () => {
    for (const check of ['--check=crc32', '--check=crc64']) {
      const c = xz(struct.subarray(0, 6000), ['--x86', '--lzma2', check]);
      for (let i = 0; i < c.length; i++) {
        const bad = new Uint8Array(c);
        bad[i]! ^= 1 << (i % 8);
        expect(codeOf(() => xzDecompress(bad)), `${check} flip at ${i}`).toMatchObject({ code: DECOMPRESS_ERROR });
      }
    }
  });

  it('corrupt unchecked streams: coded errors or some output, never another exception', () => {
    const c = xz(struct.subarray(0, 30_000), ['--check=none']);
    const r = prng(c.length * 4, 99);
    let errors = 0;
    for (let t = 0; t < 400; t++) {
      const bad = new Uint8Array(c);
      const at = 12 + ((r[t * 3]! << 8) | r[t * 3 + 1]!) % (c.length - 12);
      bad[at] = r[t * 3 + 2]!;
      const res = codeOf(() => xzDecompress(bad, { maxOutput: 10 * MiB }));
      if (res !== 'ok') {
        expect(res.code).toBe(DECOMPRESS_ERROR);
        errors++;
      }
    }
    expect(errors).toBeGreaterThan(0);
    // garbage after a valid stream header
    for (let t = 0; t < 50; t++) {
      const g = new Uint8Array([...c.subarray(0, 12), ...prng(5000, t + 1)]);
      expect(codeOf(() => xzDecompress(g))).toMatchObject({ code: DECOMPRESS_ERROR });
    }
  });

  it('output is capped by maxOutput', () => {
    const c = xz(new Uint8Array(4 * MiB), ['--check=crc32']);
    expect(codeOf(() => xzDecompress(c, { maxOutput: MiB }))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'too-large' });
    expect(xzDecompress(c, { maxOutput: 4 * MiB }).data.length).toBe(4 * MiB);
    const blocks = xz(new Uint8Array(4 * MiB), ['--block-size=1MiB']); // sizes in block headers: refused up front
    expect(codeOf(() => xzDecompress(blocks, { maxOutput: 3 * MiB }))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'too-large' });
  });

  it('unsupported filters, formats and check types are named', () => {
    expect(codeOf(() => xzDecompress(xz(struct.subarray(0, 1000), ['--delta=dist=4', '--lzma2'])))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'unsupported-filter' });
    expect(codeOf(() => xzDecompress(xz(struct.subarray(0, 1000), ['--arm', '--lzma2'])))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'unsupported-filter' });
    expect(codeOf(() => xzDecompress(xz(struct.subarray(0, 1000), ['--format=lzma'])))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'bad-magic' });
    // check ID 2 (reserved, 4-byte) with a valid header CRC
    const c = new Uint8Array(xz(struct.subarray(0, 1000), ['--check=crc32']));
    c[7] = 2;
    new DataView(c.buffer).setUint32(8, crc32(c, 6, 8), true);
    expect(codeOf(() => xzDecompress(c))).toMatchObject({ code: DECOMPRESS_ERROR, reason: 'unsupported-check' });
  });

  it('decodes at a useful speed (reported)', () => {
    const c = xz(struct, ['--x86', '--lzma2=preset=6', '--check=crc32']);
    const t0 = performance.now();
    const r = xzDecompress(c);
    const ms = performance.now() - t0;
    expect(r.data.length).toBe(struct.length);
    console.log(`[xz] structured ${(struct.length / MiB).toFixed(1)} MiB from ${(c.length / 1024).toFixed(0)} KiB in ${ms.toFixed(0)} ms = ${(struct.length / MiB / (ms / 1000)).toFixed(1)} MiB/s`);
  });
});

// The fixture kernel, found by the one helper (KVMKIT_GUEST_DIR, ../shared/guest, the project's build); '' = none.
const fixture = findGuestKernel();
const FIXTURE_BZ = fixture?.bzImage ?? '';
const FIXTURE_ELF = fixture?.vmlinux ?? '';
describe.skipIf(!existsSync(FIXTURE_BZ) || !existsSync(FIXTURE_ELF))('the fixture bzImage payload', () => {
  it('decompresses to an ELF whose PT_LOAD bytes equal the fixture vmlinux', () => {
    const bz = readFileSync(FIXTURE_BZ);
    const setup = ((bz[0x1f1] || 4) + 1) * 512;
    const off = bz.readUInt32LE(0x248);
    const len = bz.readUInt32LE(0x24c);
    const payload = new Uint8Array(bz.subarray(setup + off, setup + off + len));
    expect(isXz(payload)).toBe(true);
    const t0 = performance.now();
    const r = xzDecompress(payload, { singleStream: true, maxOutput: 64 * MiB });
    const ms = performance.now() - t0;
    console.log(`[xz] fixture payload ${(len / MiB).toFixed(2)} MiB → ${(r.data.length / MiB).toFixed(2)} MiB in ${ms.toFixed(0)} ms = ${(r.data.length / MiB / (ms / 1000)).toFixed(1)} MiB/s`);
    expect(r.consumed).toBe(len - 4); // the 4-byte size the kernel build appends follows the stream
    expect(r.data.length).toBe(payload.length >= 4 ? Buffer.from(payload).readUInt32LE(len - 4) : -1);
    const segs = (img: Uint8Array) => {
      const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
      expect(dv.getUint32(0, true)).toBe(0x464c457f);
      const phoff = Number(dv.getBigUint64(32, true));
      const out: Array<{ paddr: bigint; bytes: Uint8Array; memsz: number }> = [];
      for (let i = 0; i < dv.getUint16(56, true); i++) {
        const p = phoff + i * dv.getUint16(54, true);
        if (dv.getUint32(p, true) !== 1) continue;
        const o = Number(dv.getBigUint64(p + 8, true));
        out.push({ paddr: dv.getBigUint64(p + 24, true), bytes: img.subarray(o, o + Number(dv.getBigUint64(p + 32, true))), memsz: Number(dv.getBigUint64(p + 40, true)) });
      }
      return { entry: dv.getBigUint64(24, true), out };
    };
    const a = segs(r.data);
    const b = segs(new Uint8Array(readFileSync(FIXTURE_ELF)));
    expect(a.entry).toBe(b.entry);
    expect(a.out.length).toBe(b.out.length);
    expect(a.out.length).toBeGreaterThan(0);
    a.out.forEach((s, i) => {
      expect(s.paddr).toBe(b.out[i]!.paddr);
      expect(s.memsz).toBe(b.out[i]!.memsz);
      expect(Buffer.compare(s.bytes, b.out[i]!.bytes), `segment ${i}`).toBe(0);
    });
  });
});
