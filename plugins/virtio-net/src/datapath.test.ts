/**
 * The TX/RX data path's batching rules (real TAP in a throwaway network namespace, host-side test driver):
 * TX serves at most TURN_CHAINS chains per event-loop turn and continues from a macrotask, with
 * VIRTQ_USED_F_NO_NOTIFY set only while it serves and one interrupt per turn; scattered TX chains are gathered;
 * RX reads straight into a one-buffer chain that holds any frame, copies into smaller and multi-buffer chains,
 * completes a chain with len 0 for a frame longer than it, and leaves the ring untouched when the TAP is empty.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { GuestMemory, ffi, silentLogger } from '@kvmkit/kernel';
import { VirtioMmioTransport, VirtioTestDriver, VIRTQ_USED_F_NO_NOTIFY, bit, VIRTIO_F } from '@kvmkit/virtio';
import { Tap, VirtioNet, VIRTIO_NET_F, RXQ, TXQ, TURN_CHAINS, MAX_FRAME, VNET_HDR_SIZE, parseMac } from './index.js';

const NS = `kvmkit-netdp-${process.pid}`;
const HOST = '10.78.0.1';
const GUEST = '10.78.0.2';
const MAC = '52:54:00:aa:bb:dd';

const ip = (...a: string[]) => execFileSync('ip', a, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
let ok = false;
beforeAll(() => {
  if (process.getuid?.() !== 0 || !existsSync('/dev/net/tun')) {
    console.warn('[virtio-net] datapath tests skipped: needs root and /dev/net/tun');
    return;
  }
  try {
    ip('netns', 'add', NS);
    // No IPv6 router solicitations / ND: only the frames a test sends cross the TAP.
    execFileSync('ip', ['netns', 'exec', NS, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
    ok = true;
  } catch (e) {
    console.warn(`[virtio-net] datapath tests skipped: ${(e as Error).message}`);
  }
});
afterAll(() => {
  if (ok) ip('netns', 'del', NS);
});

/**
 * Guest RAM for a test NIC: 'anonymous' = GuestMemory.anonymous (no host addresses: the device copies and uses
 * read/write), 'mmap' = an mmap'd region like a real VM's (the device readv/writev's guest buffers directly).
 */
type MemKind = 'anonymous' | 'mmap';
const MEM = 32 << 20;
function guestMemory(kind: MemKind): { mem: GuestMemory; release(): void } {
  if (kind === 'anonymous') return { mem: GuestMemory.anonymous(MEM), release() {} };
  const hva = ffi.mmap(MEM, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_PRIVATE | ffi.MAP_ANONYMOUS | ffi.MAP_NORESERVE);
  // slot 0: host write tracking can be turned on for it (no KVM involved)
  const mem = new GuestMemory([{ gpa: 0n, size: MEM, bytes: new Uint8Array(ffi.viewOf(hva, MEM)), hva, slot: 0, name: 'ram' }]);
  return { mem, release: () => ffi.munmap(hva, MEM) };
}

async function nic(queueSize: number, kind: MemKind = 'anonymous') {
  const tap = Tap.open(`kvd${process.pid % 100000}`);
  ip('link', 'set', tap.name, 'netns', NS);
  ip('-n', NS, 'addr', 'add', `${HOST}/24`, 'dev', tap.name);
  ip('-n', NS, 'link', 'set', tap.name, 'up');
  ip('-n', NS, 'neigh', 'replace', GUEST, 'lladdr', MAC, 'dev', tap.name, 'nud', 'permanent');
  const dev = new VirtioNet(tap, { mac: parseMac(MAC), queueSize, offload: false, log: silentLogger() });
  const { mem, release } = guestMemory(kind);
  let irqs = 0;
  const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  drv.init({ want: bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_NET_F.MAC) | bit(VIRTIO_NET_F.STATUS) });
  /** Frames the TAP took from us (the namespace side's RX counter). */
  const tapRx = () => (JSON.parse(ip('-n', NS, '-s', '-j', 'link', 'show', tap.name))[0].stats64.rx.packets as number);
  /** ICMP echo requests of `size` payload bytes from the namespace to the guest (never answered). */
  const ping = (count: number, size: number) => spawnSync('ip', ['netns', 'exec', NS, 'ping', '-n', '-q', '-c', String(count), '-i', '0.01', '-s', String(size), '-W', '0.1', GUEST], { stdio: 'ignore' });
  const close = async () => {
    await t.close();
    release();
  };
  return { tap, dev, mem, t, drv, tapRx, ping, irqs: () => irqs, close };
}

/** A 60-byte broadcast frame (ethertype 0x88b5, local experimental) behind a zero vnet header. */
function frame(i: number): Buffer {
  const f = Buffer.alloc(12 + 60);
  f.fill(0xff, 12, 18);
  parseMac(MAC).forEach((b, k) => (f[18 + k] = b));
  f.writeUInt16BE(0x88b5, 24);
  f.writeUInt32BE(i, 26);
  return f;
}

const turn = () => new Promise((r) => setImmediate(r));

function csum(b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < b.length; i += 2) s += (b[i]! << 8) | (b[i + 1] ?? 0);
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return ~s & 0xffff;
}

/** vnet header (zero) + an ICMP echo request GUEST → HOST with `size` payload bytes (pattern i & 255). */
function echoRequest(dstMac: number[], id: number, size: number): Buffer {
  const f = Buffer.alloc(12 + 14 + 20 + 8 + size);
  f.set(dstMac, 12);
  f.set(parseMac(MAC), 18);
  f.writeUInt16BE(0x0800, 24);
  const ip4 = f.subarray(26, 46);
  ip4[0] = 0x45;
  ip4.writeUInt16BE(20 + 8 + size, 2);
  ip4[8] = 64;
  ip4[9] = 1;
  ip4.set(GUEST.split('.').map(Number), 12);
  ip4.set(HOST.split('.').map(Number), 16);
  ip4.writeUInt16BE(csum(ip4), 10);
  const icmp = f.subarray(46);
  icmp[0] = 8;
  icmp.writeUInt16BE(id, 4);
  icmp.writeUInt16BE(1, 6);
  for (let i = 0; i < size; i++) icmp[8 + i] = i & 255;
  icmp.writeUInt16BE(csum(icmp), 2);
  return f;
}

describe.each(['anonymous', 'mmap'] as const)('virtio-net data path (TAP in a test network namespace), %s guest RAM', (kind) => {
  it('TX: a ring fuller than one turn completes over two turns, one interrupt each; NO_NOTIFY set while serving and between the turns, clear once the ring is empty; scattered chains gathered', async (ctx) => {
    if (!ok) ctx.skip();
    const n = await nic(512, kind);
    try {
      const before = n.tapRx();
      const total = TURN_CHAINS + 44;
      for (let i = 0; i < total; i++) {
        const f = frame(i);
        // every 10th chain: header and frame in separate descriptors (bounce-buffer path)
        n.drv.add(TXQ, i % 10 === 0 ? [{ len: 12, data: f.subarray(0, 12) }, { len: 60, data: f.subarray(12) }] : [{ len: 72, data: f }]);
      }
      n.drv.kick(TXQ);
      // the notification's turn served exactly TURN_CHAINS
      expect(n.drv.takeUsed(TXQ).length).toBe(TURN_CHAINS);
      expect(n.irqs()).toBe(1);
      // the rest follows from a macrotask: the driver need not notify meanwhile
      expect(n.mem.readU16(n.drv.queues[TXQ]!.used) & VIRTQ_USED_F_NO_NOTIFY).toBe(VIRTQ_USED_F_NO_NOTIFY);
      await turn();
      await turn();
      const rest = n.drv.takeUsed(TXQ);
      expect(rest.length).toBe(total - TURN_CHAINS);
      expect(rest.every((u) => u.len === 0)).toBe(true);
      expect(n.irqs()).toBe(2);
      expect(n.mem.readU16(n.drv.queues[TXQ]!.used) & VIRTQ_USED_F_NO_NOTIFY).toBe(0);
      expect(n.dev.stats.txPackets).toBe(total);
      expect(n.dev.stats.txBytes).toBe(total * 60);
      expect(n.dev.stats.txDropped).toBe(0);
      for (let i = 0; i < 50 && n.tapRx() - before < total; i++) await new Promise((r) => setTimeout(r, 10));
      expect(n.tapRx() - before).toBe(total);
      // a chain shorter than the vnet header is dropped, still completed
      n.drv.add(TXQ, [{ len: 8, data: new Uint8Array(8) }]);
      n.drv.kick(TXQ);
      expect(n.drv.takeUsed(TXQ)).toHaveLength(1);
      expect(n.dev.stats.txDropped).toBe(1);
    } finally {
      await n.close();
    }
  });

  it('RX: straight into one-buffer chains that hold any frame, copy into smaller ones, len 0 for a frame longer than the buffer, copy into scattered chains; an empty TAP consumes no chain', async (ctx) => {
    if (!ok) ctx.skip();
    const n = await nic(64, kind);
    try {
      const q = n.t.queues[RXQ]!;
      const posted = new Map<number, bigint[]>();
      const post = (bufs: { len: number; write: true }[]) => {
        const { head, addrs } = n.drv.add(RXQ, bufs);
        posted.set(head, addrs);
      };
      // two buffers that hold any frame (read straight into guest memory), two 2 KiB ones (copied)
      for (let i = 0; i < 4; i++) post([{ len: i < 2 ? VNET_HDR_SIZE + MAX_FRAME : 2048, write: true }]);
      n.drv.kick(RXQ);
      expect(q.lastAvail).toBe(0); // nothing in the TAP: the chains stay available
      n.ping(4, 1400);
      const got: { id: number; len: number }[] = [];
      for (let i = 0; i < 100 && got.length < 4; i++) {
        await new Promise((r) => setTimeout(r, 10));
        got.push(...n.drv.takeUsed(RXQ));
      }
      expect(got).toHaveLength(4);
      for (const u of got) {
        expect(u.len).toBe(12 + 14 + 20 + 8 + 1400);
        const b = Buffer.from(n.mem.read(posted.get(u.id)![0]!, u.len));
        expect(b.readUInt16LE(10)).toBe(1); // num_buffers
        expect(b.readUInt16BE(12 + 12)).toBe(0x0800);
        expect(b[12 + 14 + 20]).toBe(8); // ICMP echo request
      }
      expect(n.dev.stats.rxPackets).toBe(4);

      // a 200-byte one-buffer chain: a 1442-byte frame is dropped (len 0), a 98-byte one fits
      const small = new Map<number, bigint>();
      for (let i = 0; i < 2; i++) {
        const { head, addrs } = n.drv.add(RXQ, [{ len: 200, write: true }]);
        small.set(head, addrs[0]!);
      }
      n.drv.kick(RXQ);
      expect(q.lastAvail).toBe(4); // the TAP is empty: no chain taken
      const drain = async (want: number) => {
        const out: { id: number; len: number }[] = [];
        for (let i = 0; i < 100 && out.length < want; i++) {
          await new Promise((r) => setTimeout(r, 10));
          out.push(...n.drv.takeUsed(RXQ));
        }
        return out;
      };
      n.ping(1, 1400);
      const [big] = await drain(1);
      expect(small.has(big!.id)).toBe(true);
      expect(big!.len).toBe(0);
      expect(n.dev.stats.rxDropped).toBe(1);
      n.ping(1, 56);
      const [fit] = await drain(1);
      expect(small.has(fit!.id)).toBe(true);
      expect(fit!.len).toBe(12 + 98);

      // scattered chain (header buffer + data buffer): one copy
      post([{ len: 12, write: true }, { len: 2048, write: true }]);
      n.drv.kick(RXQ);
      n.ping(1, 300);
      const [sc] = await drain(1);
      expect(sc!.len).toBe(12 + 14 + 20 + 8 + 300);
      const [h, d] = posted.get(sc!.id)!;
      expect(Buffer.from(n.mem.read(h!, 12)).readUInt16LE(10)).toBe(1);
      expect(Buffer.from(n.mem.read(d!, 14)).readUInt16BE(12)).toBe(0x0800);
      expect(n.dev.stats.rxPackets).toBe(6);
      expect(q.lastAvail).toBe(7);
    } finally {
      await n.close();
    }
  });

  it('TX of a chain in 5 pieces (header split 6 + 6) reaches the host intact: its echo reply comes back into a split-header RX chain (num_buffers across buffers), RX writes dirty-tracked', async (ctx) => {
    if (!ok) ctx.skip();
    const n = await nic(64, kind);
    try {
      const hostMac = (JSON.parse(ip('-n', NS, '-j', 'link', 'show', n.tap.name))[0].address as string).split(':').map((x) => parseInt(x, 16));
      const req = echoRequest(hostMac, 0x4b4b, 700);
      // RX: header split over two 6-byte buffers, then the frame
      const { head: rxHead, addrs: rxAddrs } = n.drv.add(RXQ, [
        { len: 6, write: true },
        { len: 6, write: true },
        { len: 2048, write: true, addr: 0x100_0000n }, // a page of its own
      ]);
      n.drv.kick(RXQ);
      const slot = n.mem.regions[0]!.slot;
      n.mem.setHostTracking(slot, true);
      n.mem.takeHostDirty(slot);
      // TX: 6 + 6 + 100 + 500 + rest
      const cuts = [0, 6, 12, 112, 612, req.length];
      n.drv.add(
        TXQ,
        cuts.slice(1).map((end, i) => ({ len: end - cuts[i]!, data: req.subarray(cuts[i]!, end) })),
      );
      n.drv.kick(TXQ);
      expect(n.drv.takeUsed(TXQ)).toEqual([{ id: expect.any(Number), len: 0 }]);
      expect(n.dev.stats.txPackets).toBe(1);
      expect(n.dev.stats.txBytes).toBe(req.length - 12);
      let used: { id: number; len: number }[] = [];
      for (let i = 0; i < 100 && used.length === 0; i++) {
        await new Promise((r) => setTimeout(r, 10));
        used = n.drv.takeUsed(RXQ);
      }
      expect(used).toEqual([{ id: rxHead, len: req.length }]);
      const hdr = Buffer.concat([n.mem.read(rxAddrs[0]!, 6), n.mem.read(rxAddrs[1]!, 6)]);
      expect(hdr.readUInt16LE(10)).toBe(1); // num_buffers, in the second buffer
      const reply = Buffer.from(n.mem.read(rxAddrs[2]!, req.length - 12));
      expect(reply.subarray(0, 6)).toEqual(Buffer.from(parseMac(MAC)));
      expect(reply[14 + 20]).toBe(0); // echo reply
      expect(reply.readUInt16BE(14 + 20 + 4)).toBe(0x4b4b);
      expect(reply.subarray(14 + 28)).toEqual(req.subarray(12 + 14 + 28)); // payload intact both ways
      // the pages of the buffers the frame went into count as written (dirty log for migration)
      const bm = n.mem.takeHostDirty(slot)!;
      for (const a of rxAddrs) {
        const p = Number(a) >> 12;
        expect(bm[p >> 3]! & (1 << (p & 7))).not.toBe(0);
      }
      n.mem.setHostTracking(slot, false);
    } finally {
      await n.close();
    }
  });
});
