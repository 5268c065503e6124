import { describe, it, expect } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ffi from './ffi.js';
import { GuestMemory } from '../memory.js';

describe('ffi.pollIn', () => {
  it('reports readable eventfds by index, times out with 0', () => {
    const a = ffi.eventfd();
    const b = ffi.eventfd();
    try {
      expect(ffi.pollIn([a, b], 0)).toBe(0);
      const one = Buffer.alloc(8);
      one.writeBigUInt64LE(1n);
      ffi.writeFd(b, one);
      expect(ffi.pollIn([a, b], 1000)).toBe(0b10);
      ffi.writeFd(a, one);
      expect(ffi.pollIn([a, b], -1)).toBe(0b11);
      const t = performance.now();
      ffi.readFd(a, Buffer.alloc(8));
      ffi.readFd(b, Buffer.alloc(8));
      expect(ffi.pollIn([a, b], 30)).toBe(0);
      expect(performance.now() - t).toBeGreaterThanOrEqual(25);
    } finally {
      ffi.closeFd(a);
      ffi.closeFd(b);
    }
  });
});

describe('ffi.preadvRaw / pwritevRaw on host addresses of guest RAM', () => {
  it('moves bytes between a file and mmap-backed guest memory', () => {
    const size = 0x10000;
    const hva = ffi.mmap(size, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS);
    const mem = new GuestMemory([{ gpa: 0n, size, bytes: new Uint8Array(ffi.viewOf(hva, size)), hva, slot: 0, name: 'ram' }]);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmkit-ffi-'));
    const file = path.join(dir, 'img');
    const data = Buffer.alloc(8192);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    fs.writeFileSync(file, data);
    const fd = fs.openSync(file, 'r+');
    try {
      const iov = new BigUint64Array(4);
      iov[0] = BigInt(mem.hostAddress(0x1000, 100));
      iov[1] = 100n;
      iov[2] = BigInt(mem.hostAddress(0x3000, 4000));
      iov[3] = 4000n;
      expect(ffi.preadvRaw(fd, iov, 2, 10)).toBe(4100);
      expect(Buffer.from(mem.view(0x1000, 100))).toEqual(data.subarray(10, 110));
      expect(Buffer.from(mem.view(0x3000, 4000))).toEqual(data.subarray(110, 4110));
      mem.fill(0x5000, 512, 0xab);
      iov[0] = BigInt(mem.hostAddress(0x5000, 512));
      iov[1] = 512n;
      expect(ffi.pwritevRaw(fd, iov, 1, 8192)).toBe(512);
      expect(fs.readFileSync(file).subarray(8192)).toEqual(Buffer.alloc(512, 0xab));
      expect(ffi.preadvRaw(-1, iov, 1, 0)).toBe(-9); // EBADF
      // writev/readv through an fd without a position (an eventfd takes exactly 8 bytes).
      const efd = ffi.eventfd();
      try {
        mem.writeU64(0x6000, 5n);
        iov[0] = BigInt(mem.hostAddress(0x6000, 8));
        iov[1] = 8n;
        expect(ffi.writevRaw(efd, iov, 1)).toBe(8);
        iov[0] = BigInt(mem.hostAddress(0x7000, 8));
        expect(ffi.readvRaw(efd, iov, 1)).toBe(8);
        expect(mem.readU64(0x7000)).toBe(5n);
        expect(ffi.readvRaw(efd, iov, 1)).toBe(-11); // EAGAIN: nonblocking and empty
        mem.writeU64(0x6008, 7n);
        expect(ffi.writeRaw(efd, mem.hostAddress(0x6008, 8), 8)).toBe(8);
        expect(ffi.readRaw(efd, mem.hostAddress(0x7008, 8), 8)).toBe(8);
        expect(mem.readU64(0x7008)).toBe(7n);
        expect(ffi.readRaw(efd, mem.hostAddress(0x7008, 8), 8)).toBe(-11);
      } finally {
        ffi.closeFd(efd);
      }
      expect(() => ffi.preadvRaw(fd, iov, 3, 0)).toThrow(RangeError);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
      mem.close();
      ffi.munmap(hva, size);
    }
  });
});

describe('GuestMemory.fill(0) on private anonymous memory', () => {
  it('drops whole pages and writes the partial edges; other values and small ranges are written', () => {
    const size = 0x40000;
    const hva = ffi.mmap(size, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS);
    const mem = new GuestMemory([{ gpa: 0x100000n, size, bytes: new Uint8Array(ffi.viewOf(hva, size)), hva, slot: 0, name: 'ram', anonymousPrivate: true }]);
    try {
      mem.fill(0x100000, size, 0x5a);
      expect(mem.readU8(0x13ffff)).toBe(0x5a);
      mem.setHostTracking(0, true);
      mem.fill(0x100123, 0x30000, 0); // unaligned both ends
      const all = mem.view(0x100000, size);
      expect(all[0x122]).toBe(0x5a);
      expect(all.subarray(0x123, 0x30123).every((b) => b === 0)).toBe(true);
      expect(all[0x30123]).toBe(0x5a);
      // Every page touched counts as written for dirty tracking.
      const bm = mem.takeHostDirty(0)!;
      expect(bm[0]).toBe(0xff);
      expect(bm[5]).toBe(0xff);
      expect(bm[6]).toBe(0x01); // page 0x30 holds the last zeroed bytes
      expect(bm[7]).toBe(0);
      mem.fill(0x101000, 0x100, 0); // small: plain write
      expect(mem.view(0x101000, 0x100).every((b) => b === 0)).toBe(true);
    } finally {
      mem.close();
      ffi.munmap(hva, size);
    }
  });
});
