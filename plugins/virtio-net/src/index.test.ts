import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { GuestMemory, PluginHost, silentLogger } from '@kvmkit/kernel';
import { MMIO, VIRTIO_MMIO_INT, VIRTIO_STATUS as S, VirtioMmioTransport, VirtioTestDriver, bit, VIRTIO_F } from '@kvmkit/virtio';
import virtioNet, { Tap, TUN, VirtioNet, VIRTIO_NET_F, VIRTIO_NET_HDR_F_NEEDS_CSUM, RXQ, TXQ, parseMac, stableMac, validateNetOptions } from './index.js';

const NS = `kvmkit-net-${process.pid}`;
const HOST_IP = [10, 77, 0, 1];
const GUEST_IP = [10, 77, 0, 2];
const GUEST_MAC = '52:54:00:aa:bb:cc';

function ip(...args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

let netnsOk = false;
let why = '';
beforeAll(() => {
  if (process.getuid?.() !== 0 || !existsSync('/dev/net/tun')) {
    why = 'needs root and /dev/net/tun';
    return;
  }
  try {
    ip('netns', 'add', NS);
    netnsOk = true;
  } catch (e) {
    why = `ip netns add failed: ${(e as Error).message}`;
  }
  if (!netnsOk) console.warn(`[virtio-net] TAP tests skipped: ${why}`);
});
afterAll(() => {
  if (netnsOk) ip('netns', 'del', NS);
});

function csum16(b: Uint8Array, start = 0, end = b.length, init = 0): number {
  let s = init;
  for (let i = start; i < end; i += 2) s += (b[i]! << 8) | (i + 1 < end ? b[i + 1]! : 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

function eth(dst: Uint8Array, src: Uint8Array, type: number, payload: Uint8Array): Buffer {
  const b = Buffer.alloc(14 + payload.length);
  b.set(dst, 0);
  b.set(src, 6);
  b.writeUInt16BE(type, 12);
  b.set(payload, 14);
  return b;
}

function arpRequest(mac: Uint8Array): Buffer {
  const a = Buffer.alloc(28);
  a.writeUInt16BE(1, 0); // ethernet
  a.writeUInt16BE(0x0800, 2);
  a[4] = 6;
  a[5] = 4;
  a.writeUInt16BE(1, 6); // request
  a.set(mac, 8);
  a.set(GUEST_IP, 14);
  a.set(HOST_IP, 24);
  return eth(new Uint8Array(6).fill(0xff), mac, 0x0806, a);
}

function icmpEcho(mac: Uint8Array, dstMac: Uint8Array, id: number, seq: number, goodCsum: boolean): Buffer {
  const icmp = Buffer.alloc(8 + 32);
  icmp[0] = 8;
  icmp.writeUInt16BE(id, 4);
  icmp.writeUInt16BE(seq, 6);
  for (let i = 8; i < icmp.length; i++) icmp[i] = i;
  if (goodCsum) icmp.writeUInt16BE(csum16(icmp), 2);
  const iph = Buffer.alloc(20);
  iph[0] = 0x45;
  iph.writeUInt16BE(20 + icmp.length, 2);
  iph.writeUInt16BE(seq, 4);
  iph[8] = 64;
  iph[9] = 1;
  iph.set(GUEST_IP, 12);
  iph.set(HOST_IP, 16);
  iph.writeUInt16BE(csum16(iph), 10);
  return eth(dstMac, mac, 0x0800, Buffer.concat([iph, icmp]));
}

function vnetHdr(o: { needsCsum?: { start: number; offset: number } } = {}): Buffer {
  const h = Buffer.alloc(12);
  if (o.needsCsum) {
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h.writeUInt16LE(o.needsCsum.start, 6);
    h.writeUInt16LE(o.needsCsum.offset, 8);
  }
  return h;
}

async function setupNic(want?: bigint) {
  const tap = Tap.open(`kvt${process.pid % 100000}`);
  ip('link', 'set', tap.name, 'netns', NS);
  ip('-n', NS, 'addr', 'add', `${HOST_IP.join('.')}/24`, 'dev', tap.name);
  ip('-n', NS, 'link', 'set', tap.name, 'up');
  const dev = new VirtioNet(tap, { mac: parseMac(GUEST_MAC), queueSize: 64, offload: true, log: silentLogger() });
  const mem = GuestMemory.anonymous(32 << 20);
  let irqs = 0;
  const t = new VirtioMmioTransport(dev, { memory: mem, raiseIrq: () => irqs++ });
  const drv = new VirtioTestDriver(t, mem, 0x1000n);
  const st = drv.init(want !== undefined ? { want } : {});
  const rxBufs = new Map<number, bigint>();
  const postRx = (n: number, len: number) => {
    for (let i = 0; i < n; i++) {
      const { head, addrs } = drv.add(RXQ, [{ len, write: true }]);
      rxBufs.set(head, addrs[0]!);
    }
    drv.kick(RXQ);
  };
  /** Waits for RX frames until `pred` matches one (returns it) or the timeout. */
  const waitRx = async (pred: (frame: Buffer, hdr: Buffer) => boolean, ms = 3000): Promise<Buffer | undefined> => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      for (const u of drv.takeUsed(RXQ)) {
        const a = rxBufs.get(u.id)!;
        const all = Buffer.from(mem.read(a, u.len));
        postRx(1, 2048);
        if (u.len >= 12 && pred(all.subarray(12), all.subarray(0, 12))) return all.subarray(12);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    return undefined;
  };
  const send = (frame: Buffer, hdr = vnetHdr()) => {
    drv.add(TXQ, [{ len: 12, data: hdr }, { len: frame.length, data: frame }]);
    drv.kick(TXQ);
  };
  return { tap, dev, mem, t, drv, st, postRx, waitRx, send, irqs: () => irqs };
}

describe('virtio-net (TAP in a test network namespace)', () => {
  it('ARP and ping through the TAP; checksum offload header passes through; link status', async (ctx) => {
    if (!netnsOk) ctx.skip();
    const nic = await setupNic();
    try {
      expect(nic.st & S.DRIVER_OK).toBe(S.DRIVER_OK);
      const f = nic.t.driverFeatures;
      expect(f & bit(VIRTIO_NET_F.GUEST_CSUM)).not.toBe(0n);
      expect(nic.dev.offloadFlags()).toBe(TUN.TUN_F_CSUM | TUN.TUN_F_TSO4 | TUN.TUN_F_TSO6);
      expect(nic.mem && [...nic.drv.readConfig(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':')).toBe(GUEST_MAC);
      expect(nic.drv.readConfig(6, 2)[0]).toBe(1); // link up
      nic.postRx(16, 65562);
      const mac = parseMac(GUEST_MAC);
      nic.send(arpRequest(mac));
      const arp = await nic.waitRx((fr) => fr.readUInt16BE(12) === 0x0806 && fr.readUInt16BE(20) === 2);
      expect(arp, 'ARP reply from the namespace').toBeDefined();
      const hostMac = new Uint8Array(arp!.subarray(22, 28));
      expect([...arp!.subarray(28, 32)]).toEqual(HOST_IP);
      // ping
      nic.send(icmpEcho(mac, hostMac, 0x1234, 1, true));
      const isReply = (seq: number) => (fr: Buffer) => fr.readUInt16BE(12) === 0x0800 && fr[23] === 1 && fr[34] === 0 && fr.readUInt16BE(38) === 0x1234 && fr.readUInt16BE(40) === seq;
      expect(await nic.waitRx(isReply(1)), 'echo reply').toBeDefined();
      // a bad ICMP checksum without NEEDS_CSUM is dropped by the namespace's stack ...
      nic.send(icmpEcho(mac, hostMac, 0x1234, 2, false));
      expect(await nic.waitRx(isReply(2), 500)).toBeUndefined();
      // ... with NEEDS_CSUM (csum_start = ICMP header, csum_offset = 2) the header reaches the TAP and it is accepted
      nic.send(icmpEcho(mac, hostMac, 0x1234, 3, false), vnetHdr({ needsCsum: { start: 34, offset: 2 } }));
      expect(await nic.waitRx(isReply(3)), 'echo reply to an offloaded checksum').toBeDefined();
      expect(nic.dev.stats.txPackets).toBe(4);
      expect(nic.dev.stats.rxPackets).toBeGreaterThanOrEqual(3);
      expect(nic.irqs()).toBeGreaterThan(0);
      // link down: config status, config interrupt, TX dropped
      nic.drv.ack(3);
      nic.dev.setLink(false);
      expect(nic.drv.readConfig(6, 2)[0]).toBe(0);
      expect(nic.drv.interruptStatus() & VIRTIO_MMIO_INT.CONFIG).toBe(VIRTIO_MMIO_INT.CONFIG);
      nic.send(icmpEcho(mac, hostMac, 0x1234, 4, true));
      expect(nic.dev.stats.txDropped).toBe(1);
      nic.dev.setLink(true);
    } finally {
      await nic.t.close();
    }
    // closing the fd removed the (non-persistent) TAP from the namespace
    expect(ip('-n', NS, 'link', 'show')).not.toContain(nic.tap.name);
  });

  it('without offload features: TUNSETOFFLOAD 0; TSO without CSUM is refused at FEATURES_OK', async (ctx) => {
    if (!netnsOk) ctx.skip();
    const nic = await setupNic(bit(VIRTIO_F.VERSION_1) | bit(VIRTIO_NET_F.MAC) | bit(VIRTIO_NET_F.STATUS));
    try {
      expect(nic.dev.offloadFlags()).toBe(0);
      nic.drv.w32(MMIO.STATUS, 0);
      nic.drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER);
      nic.drv.w32(MMIO.DRIVER_FEATURES_SEL, 0);
      nic.drv.w32(MMIO.DRIVER_FEATURES, 1 << VIRTIO_NET_F.GUEST_TSO4);
      nic.drv.w32(MMIO.DRIVER_FEATURES_SEL, 1);
      nic.drv.w32(MMIO.DRIVER_FEATURES, 1);
      nic.drv.w32(MMIO.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
      expect(nic.drv.r32(MMIO.STATUS) & S.FEATURES_OK).toBe(0);
    } finally {
      await nic.t.close();
    }
  });

  it('holds RX while the guest has no buffers and while paused; resumes on RX notify / resume', async (ctx) => {
    if (!netnsOk) ctx.skip();
    const nic = await setupNic();
    try {
      const mac = parseMac(GUEST_MAC);
      nic.send(arpRequest(mac)); // reply arrives with no RX buffer posted
      await new Promise((r) => setTimeout(r, 200));
      expect(nic.dev.stats.rxPackets).toBe(0);
      await nic.t.pause();
      nic.postRx(4, 2048); // notify while paused: remembered
      await new Promise((r) => setTimeout(r, 100));
      expect(nic.dev.stats.rxPackets).toBe(0);
      nic.t.resume();
      const arp = await nic.waitRx((fr) => fr.readUInt16BE(12) === 0x0806 && fr.readUInt16BE(20) === 2);
      expect(arp).toBeDefined();
    } finally {
      await nic.t.close();
    }
  });
});

describe('virtio-net TAP queues', () => {
  it('a TAP is multi-queue: a second process can hold it, each queue detaches/attaches; a single-queue TAP held elsewhere is EBUSY', async (ctx) => {
    if (!netnsOk) ctx.skip();
    // Both TAPs live in the host namespace only for the duration of this test (down, no address).
    const name = `kvq${process.pid % 100000}`;
    const a = Tap.open(name);
    let b: Tap | undefined;
    try {
      expect(a.multiQueue).toBe(true);
      b = Tap.open(name);
      expect(b.name).toBe(name);
      expect(b.multiQueue).toBe(true);
      expect(b.detachQueue()).toBe(0);
      expect(b.attached).toBe(false);
      expect(b.attachQueue()).toBe(0);
      expect(b.attached).toBe(true);
    } finally {
      b?.close();
      a.close();
    }
    const single = `kvs${process.pid % 100000}`;
    ip('tuntap', 'add', 'dev', single, 'mode', 'tap', 'vnet_hdr');
    try {
      const c = Tap.open(single);
      try {
        expect(c.multiQueue).toBe(false);
        expect(c.detachQueue()).toBe(0); // a no-op: the only queue stays attached
        expect(c.attached).toBe(true);
        expect(() => Tap.open(single)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_VIRTIO_NET_TAP', details: expect.objectContaining({ errno: 16 }) }));
      } finally {
        c.close();
      }
    } finally {
      ip('tuntap', 'del', 'dev', single, 'mode', 'tap');
    }
  });
});

describe('virtio-net save/restore', () => {
  it('a frame read from the TAP but not yet delivered (no RX buffer) is saved with the state and delivered after restore', async (ctx) => {
    if (!netnsOk) ctx.skip();
    const nic = await setupNic();
    let t2: VirtioMmioTransport | undefined;
    try {
      nic.send(arpRequest(parseMac(GUEST_MAC))); // the reply arrives while no RX buffer is posted: held
      const t0 = Date.now();
      while (nic.dev.rxHeld === 0 && Date.now() - t0 < 3000) await new Promise((r) => setTimeout(r, 5));
      expect(nic.dev.rxHeld).toBe(1);
      await nic.t.pause();
      nic.postRx(4, 2048); // made available while paused: not used by this device
      const state = nic.t.saveState();
      const held = (state.device as { held?: Uint8Array }).held;
      expect(held).toBeInstanceOf(Uint8Array);
      expect(Buffer.from(held!).readUInt16BE(12 + 12)).toBe(0x0806);
      await nic.t.close();
      // Another device (its own TAP: only the state carries the frame) restores it and delivers it first.
      const tap2 = Tap.open('');
      ip('link', 'set', tap2.name, 'netns', NS);
      const dev2 = new VirtioNet(tap2, { mac: parseMac('52:54:00:00:00:09'), queueSize: 64, offload: true, log: silentLogger() });
      t2 = new VirtioMmioTransport(dev2, { memory: nic.mem, raiseIrq: () => {} });
      t2.restoreState(state);
      expect(dev2.rxHeld).toBe(1);
      expect(dev2.mac).toBe(GUEST_MAC); // the saved MAC wins over the constructor's
      expect(dev2.tap.attached).toBe(false); // restored paused: the TAP queue attaches once the device runs
      t2.resume();
      expect(dev2.tap.attached).toBe(true);
      expect(dev2.rxHeld).toBe(0);
      const arp = await nic.waitRx((fr) => fr.readUInt16BE(12) === 0x0806 && fr.readUInt16BE(20) === 2, 500);
      expect(arp).toBeDefined();
      expect(Buffer.from(arp!).equals(Buffer.from(held!.subarray(12)))).toBe(true);
      // a malformed held frame is a coded error
      const bad = { ...state, device: { ...(state.device as object), held: new Uint8Array(3) } };
      expect(() => t2!.restoreState(bad)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_STATE_FORMAT' }));
    } finally {
      await nic.t.close();
      await t2?.close();
    }
  });
});

describe('virtio-net options', () => {
  it('stable MAC from the VM name; coded errors for bad options', () => {
    expect(stableMac('vm1/virtio-net')).toBe(stableMac('vm1/virtio-net'));
    expect(stableMac('vm1/virtio-net')).not.toBe(stableMac('vm2/virtio-net'));
    expect(stableMac('x')).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    for (const o of [{ mac: 'zz' }, { mac: '01:00:00:00:00:01' }, { tap: 'a/b' }, { tap: 'x'.repeat(16) }, { queueSize: 3 }, { id: '' }, { nope: 1 }]) {
      expect(() => validateNetOptions(o), JSON.stringify(o)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    }
    const host = new PluginHost('0.1.0');
    expect(host.register(virtioNet({ id: 'a' })).name).toBe('virtio-net-a');
    expect(host.register(virtioNet({ id: 'b', mac: '52:54:00:00:00:01' })).name).toBe('virtio-net-b');
  });
});
