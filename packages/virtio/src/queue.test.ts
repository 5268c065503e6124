import { describe, it, expect } from 'vitest';
import { GuestMemory } from '@kvmkit/kernel';
import { ChainBuf, Virtqueue, VirtqueueError } from './queue.js';
import { VIRTQ_DESC_F as F } from './constants.js';

const DESC = 0x0n;
const AVAIL = 0x1000n;
const USED = 0x2000n;

function mk(size = 8, opts = { indirect: true, eventIdx: false }, memSize = 0x10000) {
  const mem = GuestMemory.anonymous(memSize);
  const q = new Virtqueue(0, size);
  q.desc = DESC;
  q.driver = AVAIL;
  q.device = USED;
  q.enable(mem, opts);
  const desc = (i: number, addr: bigint, len: number, flags: number, next: number, table = DESC) => {
    const d = table + BigInt(16 * i);
    mem.writeU64(d, addr);
    mem.writeU32(d + 8n, len);
    mem.writeU16(d + 12n, flags);
    mem.writeU16(d + 14n, next);
  };
  let availIdx = 0;
  const publish = (...heads: number[]) => {
    for (const h of heads) {
      mem.writeU16(AVAIL + 4n + BigInt(2 * (availIdx % size)), h);
      availIdx = (availIdx + 1) & 0xffff;
    }
    mem.writeU16(AVAIL + 2n, availIdx);
  };
  const setAvail = (v: number) => {
    availIdx = v & 0xffff;
    mem.writeU16(AVAIL + 2n, availIdx);
  };
  return { mem, q, desc, publish, setAvail };
}

const err = (fn: () => unknown, re: RegExp) => {
  let e: unknown;
  try {
    fn();
  } catch (x) {
    e = x;
  }
  expect(e).toBeInstanceOf(VirtqueueError);
  expect((e as VirtqueueError).code).toBe('KVMKIT_ERR_VIRTIO_QUEUE');
  expect((e as Error).message).toMatch(re);
};

describe('split virtqueue', () => {
  it('unpop gives back only the chain popped last; the next pop returns it again', () => {
    const { q, desc, publish } = mk();
    desc(0, 0x4000n, 16, F.WRITE, 0);
    desc(1, 0x5000n, 16, F.WRITE, 0);
    publish(0, 1);
    const a = q.pop()!;
    q.unpop(a);
    expect(q.pending()).toBe(2);
    const a2 = q.pop()!;
    expect(a2.head).toBe(0);
    const b = q.pop()!;
    expect(b.head).toBe(1);
    err(() => q.unpop(a2), /not the one popped last/);
    q.unpop(b);
    err(() => q.unpop(b), /not the one popped last/);   // twice: the second would skip back past a2
    expect(q.pop()!.head).toBe(1);
  });

  it('unpop gives back a ChainBuf filled last by popInto, only that one', () => {
    const { q, desc, publish } = mk();
    desc(0, 0x4000n, 16, F.WRITE, 0);
    desc(1, 0x5000n, 16, F.WRITE, 0);
    publish(0, 1);
    const a = new ChainBuf();
    const b = new ChainBuf();
    expect(q.popInto(a)).toBe(true);
    q.unpop(a);
    expect(q.pending()).toBe(2);
    expect(q.popInto(a)).toBe(true);
    expect(a.head).toBe(0);
    expect(q.popInto(b)).toBe(true);
    err(() => q.unpop(a), /not the one popped last/);
    q.unpop(b);
    err(() => q.unpop(b), /not the one popped last/);
    const c = q.pop()!; // pop after popInto: only the DescriptorChain can be given back now
    expect(c.head).toBe(1);
    err(() => q.unpop(b), /not the one popped last/);
    q.unpop(c);
    expect(q.popInto(b)).toBe(true);
    expect(b.head).toBe(1);
  });

  it('DescriptorChain.read/write copy through its own ChainBuf copy (the scratch chain is reused)', () => {
    const { q, desc, publish, mem } = mk();
    desc(0, 0x4000n, 4, F.NEXT, 1);
    desc(1, 0x4100n, 4, F.NEXT, 2);
    desc(2, 0x5000n, 3, F.WRITE | F.NEXT, 3);
    desc(3, 0x5100n, 3, F.WRITE, 0);
    desc(4, 0x6000n, 8, F.WRITE, 0);
    publish(0, 4);
    mem.write(0x4000, Uint8Array.of(1, 2, 3, 4));
    mem.write(0x4100, Uint8Array.of(5, 6, 7, 8));
    const c = q.pop()!;
    q.pop(); // reuses the queue's scratch ChainBuf
    expect(Array.from(c.read(mem))).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(Array.from(c.read(mem, 3, 3))).toEqual([4, 5, 6]);
    expect(c.write(mem, Uint8Array.of(9, 9, 9, 9, 9, 9, 9), 1)).toBe(5);
    expect(Array.from(mem.view(0x5000, 3))).toEqual([0, 9, 9]);
    expect(Array.from(mem.view(0x5100, 3))).toEqual([9, 9, 9]);
  });

  it('walks a direct chain: readable then writable', () => {
    const { q, desc, publish } = mk();
    desc(0, 0x4000n, 16, F.NEXT, 3);
    desc(3, 0x5000n, 32, F.NEXT | F.WRITE, 5);
    desc(5, 0x6000n, 8, F.WRITE, 0);
    publish(0);
    const c = q.pop()!;
    expect(c.head).toBe(0);
    expect(c.readable).toEqual([{ addr: 0x4000n, len: 16 }]);
    expect(c.writable).toEqual([{ addr: 0x5000n, len: 32 }, { addr: 0x6000n, len: 8 }]);
    expect(c.readableLength).toBe(16);
    expect(c.writableLength).toBe(40);
    expect(q.pop()).toBeNull();
  });

  it('rejects loops, out-of-table next, and head >= size', () => {
    let t = mk();
    t.desc(0, 0x4000n, 1, F.NEXT, 1);
    t.desc(1, 0x4000n, 1, F.NEXT, 0);
    t.publish(0);
    err(() => t.q.pop(), /loops/);
    t = mk();
    t.desc(0, 0x4000n, 1, F.NEXT, 0); // self loop
    t.publish(0);
    err(() => t.q.pop(), /loops/);
    t = mk();
    t.desc(0, 0x4000n, 1, F.NEXT, 8);
    t.publish(0);
    err(() => t.q.pop(), /index 8 >= table size 8/);
    t = mk();
    t.publish(9);
    err(() => t.q.pop(), /head index 9/);
  });

  it('rejects buffers outside guest RAM, including wrapping 64-bit addresses and huge lengths', () => {
    for (const [addr, len] of [
      [0xfff0n, 0x20],
      [0x10000n, 1],
      [0xffff_ffff_ffff_fff0n, 0x20],
      [0x4000n, 0xffff_ffff],
    ] as const) {
      const t = mk();
      t.desc(0, addr, len, 0, 0);
      t.publish(0);
      err(() => t.q.pop(), /outside guest RAM/);
    }
  });

  it('rejects a readable descriptor after a writable one', () => {
    const t = mk();
    t.desc(0, 0x4000n, 4, F.WRITE | F.NEXT, 1);
    t.desc(1, 0x5000n, 4, 0, 0);
    t.publish(0);
    err(() => t.q.pop(), /readable descriptor after/);
  });

  it('rejects an avail idx that moved more than the queue size', () => {
    const t = mk();
    t.setAvail(9);
    err(() => t.q.pop(), /9 entries ahead/);
  });

  it('handles wrapping 16-bit indexes', () => {
    const t = mk(4);
    t.q.lastAvail = 0xfffe;
    t.q.usedIdx = 0xfffe;
    t.setAvail(0xfffe);
    for (let i = 0; i < 4; i++) t.desc(i, 0x4000n, 4, 0, 0);
    t.publish(0, 1, 2, 3);
    const heads: number[] = [];
    for (let c = t.q.pop(); c; c = t.q.pop()) {
      heads.push(c.head);
      t.q.pushUsed(c, 0);
    }
    expect(heads).toEqual([0, 1, 2, 3]);
    expect(t.q.lastAvail).toBe(2);
    expect(t.mem.readU16(USED + 2n)).toBe(2);
    // the used elements landed at ring slots (0xfffe % 4 = 2), 3, 0, 1
    expect(t.mem.readU32(USED + 4n + 8n * 2n)).toBe(0);
    expect(t.mem.readU32(USED + 4n + 8n * 1n)).toBe(3);
  });

  it('indirect tables: accepted when negotiated, validated, nested and NEXT rejected', () => {
    let t = mk();
    t.desc(0, 0x4000n, 4, 0, 0, 0x3000n);
    t.desc(1, 0x5000n, 4, F.WRITE, 0, 0x3000n);
    t.mem.writeU16(0x3000n + 12n, F.NEXT);
    t.mem.writeU16(0x3000n + 14n, 1);
    t.desc(2, 0x3000n, 32, F.INDIRECT, 0);
    t.publish(2);
    const c = t.q.pop()!;
    expect(c.head).toBe(2);
    expect(c.readable).toEqual([{ addr: 0x4000n, len: 4 }]);
    expect(c.writable).toEqual([{ addr: 0x5000n, len: 4 }]);

    t = mk(8, { indirect: false, eventIdx: false });
    t.desc(0, 0x3000n, 16, F.INDIRECT, 0);
    t.publish(0);
    err(() => t.q.pop(), /without VIRTIO_F_INDIRECT_DESC/);

    t = mk();
    t.desc(0, 0x3100n, 16, F.INDIRECT, 0, 0x3000n);
    t.desc(0, 0x3000n, 16, F.INDIRECT, 0);
    t.publish(0);
    err(() => t.q.pop(), /nested indirect/);

    t = mk();
    t.desc(0, 0x3000n, 16, F.INDIRECT | F.NEXT, 1);
    t.publish(0);
    err(() => t.q.pop(), /NEXT/);

    for (const len of [0, 15, 24]) {
      t = mk();
      t.desc(0, 0x3000n, len, F.INDIRECT, 0);
      t.publish(0);
      err(() => t.q.pop(), /multiple of 16/);
    }
    t = mk();
    t.desc(0, 0xfff0n, 32, F.INDIRECT, 0);
    t.publish(0);
    err(() => t.q.pop(), /indirect table .* outside guest RAM/);

    t = mk();
    t.desc(0, 0x4000n, 1, F.NEXT, 0, 0x3000n);
    t.desc(1, 0x4000n, 1, F.NEXT, 0, 0x3000n);
    t.desc(0, 0x3000n, 32, F.INDIRECT, 0);
    t.publish(0);
    err(() => t.q.pop(), /loops/);
  });

  it('EVENT_IDX: publishes avail_event when empty and computes need_event with wrap', () => {
    const t = mk(8, { indirect: false, eventIdx: true });
    const usedEvent = AVAIL + 4n + 16n;
    const availEvent = USED + 4n + 64n;
    expect(t.q.pop()).toBeNull();
    expect(t.mem.readU16(availEvent)).toBe(0);
    t.desc(0, 0x4000n, 1, 0, 0);
    t.publish(0);
    t.q.pushUsed(t.q.pop()!, 1);
    expect(t.q.pop()).toBeNull();
    expect(t.mem.readU16(availEvent)).toBe(1);
    t.mem.writeU16(usedEvent, 0);
    expect(t.q.needsInterrupt()).toBe(true); // used went 0 -> 1, event 0
    expect(t.q.needsInterrupt()).toBe(false); // nothing new
    t.q.usedIdx = 0xffff;
    t.q.signalledUsed = 0xfffe;
    t.mem.writeU16(usedEvent, 0xfffe);
    expect(t.q.needsInterrupt()).toBe(true);
    t.q.usedIdx = 0x0001;
    t.mem.writeU16(usedEvent, 0x0005);
    expect(t.q.needsInterrupt()).toBe(false);
  });

  it('chains popped before a reset are not completed', () => {
    const t = mk();
    t.desc(0, 0x4000n, 1, F.WRITE, 0);
    t.publish(0);
    const c = t.q.pop()!;
    t.q.reset();
    expect(c.valid).toBe(false);
    expect(t.q.pushUsed(c, 1)).toBe(false);
  });

  it('refuses to enable a ring outside RAM or misaligned', () => {
    const mem = GuestMemory.anonymous(0x4000);
    const q = new Virtqueue(0, 8);
    q.desc = 0x3f90n;
    q.driver = 0x1000n;
    q.device = 0x2000n;
    expect(() => q.enable(mem, { indirect: false, eventIdx: false })).toThrow(VirtqueueError);
    q.desc = 0x0n;
    q.device = 0x2002n;
    expect(() => q.enable(mem, { indirect: false, eventIdx: false })).toThrow(/aligned/);
    expect(q.ready).toBe(false);
  });

  it('suppressNotifications sets and clears VIRTQ_USED_F_NO_NOTIFY in used.flags (only while ready)', () => {
    const { mem, q } = mk();
    q.suppressNotifications(true);
    expect(mem.readU16(USED)).toBe(1);
    q.suppressNotifications(false);
    expect(mem.readU16(USED)).toBe(0);
    q.disable();
    q.suppressNotifications(true);
    expect(mem.readU16(USED)).toBe(0);
  });
});
