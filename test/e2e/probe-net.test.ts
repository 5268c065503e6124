/**
 * The probe guest's virtio-net driver (probe.test=net: ARP, IPv4, ICMP echo, UDP; ring-3 polling) against
 * kvmkit's virtio-net plugin and, when installed, QEMU microvm's virtio-net-device — both on a TAP inside a
 * throwaway network namespace, so no traffic leaves the machine:
 * - ping: the host pings the guest (`ping -c 5 -i 0.2`), 0% loss;
 * - tx: the guest sends UDP datagrams as fast as its TX queue allows; a receiver in the namespace checks seq/pattern;
 * - rx: a sender in the namespace sends paced datagrams; the guest checks seq/pattern, reports lost/dup/bad;
 * - echo: the guest echoes UDP datagrams back.
 * kvmkit: the machine starts paused, its TAP is moved into the namespace and configured, then it runs.
 * The TAP's queue is raised above the datagram counts, so rx checks the VMM's delivery, not host scheduling.
 * QEMU: a persistent TAP is created in the namespace and QEMU runs under `ip netns exec`.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import type { Plugin } from '@kvmkit/kernel';
import { VIRTIO_ID, VirtioDevice, useVirtioMmio } from '@kvmkit/virtio';
import virtioNet from '@kvmkit/plugin-virtio-net';
import {
  probeElfPath, parseProbeOutput, probeCmdline, runQemuProbe, findExecutable, netnsUnavailable, TestNetns,
  startNetnsUdpReceiver, runNetnsUdpSender, type ProbeLine, type QemuProbeResult,
} from '@kvmkit/testkit';
import { hasKvm, runProbeOnKvmkit } from './helpers.js';

const HOST = '10.77.7.1';
const GUEST = '10.77.7.2';
const MAC = '52:54:00:7e:57:01';
const PORT = 5000;
/** Frames the TAP queues towards the VMM (default 500 for a TAP): larger than any test's burst, so a VMM that
 * stalls for a moment (2 shared cores here) delays datagrams instead of the TAP dropping them. */
const TAP_QUEUE = 4096;

const noNet = hasKvm ? netnsUnavailable() : 'no /dev/kvm';
if (hasKvm && noNet) console.warn(`[kvmkit e2e] probe-net skipped: ${noNet}`);
const qemu = hasKvm && !noNet ? findExecutable('qemu-system-x86_64') : undefined;
if (hasKvm && !noNet && !qemu) console.warn('[kvmkit e2e] qemu-system-x86_64 not installed: the QEMU microvm virtio-net probe tests are skipped');

let elf = '';
let ns: TestNetns | undefined;
let tapSeq = 0;
beforeAll(() => {
  if (noNet) return;
  elf = probeElfPath();
  try {
    ns = TestNetns.create('probenet');
  } catch (e) {
    console.warn(`[kvmkit e2e] probe-net skipped: ${(e as Error).message}`);
  }
});
afterAll(() => ns?.destroy());

const tapName = () => `kpn${process.pid % 100000}${tapSeq++}`;

interface NetRun {
  out: string;
  exit: number | null;
  net?: ProbeLine;
  dev?: ProbeLine;
}

function parse(out: string, exit: number | null): NetRun {
  const p = parseProbeOutput(out);
  return { out, exit, net: p.lines.find((l) => l.test === 'net'), dev: p.lines.find((l) => l.test === 'net_dev') };
}

const params = (mode: string, extra: Record<string, string | number> = {}) => ({ 'net.mode': mode, 'net.ip': GUEST, 'net.host': HOST, 'net.port': PORT, ...extra });

/**
 * Boots the probe on kvmkit with virtio-net on a fresh TAP, paused until the TAP is in the namespace;
 * `during` runs the host side while the guest runs.
 */
async function kvmkitNet(p: Record<string, string | number>, during: (ready: Promise<void>) => Promise<void> = async () => {}, timeoutMs = 30_000): Promise<NetRun> {
  const w = readyWatch();
  const tap = tapName();
  const { out, r } = await runProbeOnKvmkit({
    name: 'probe-net', cmdline: probeCmdline('net', p), kernel: elf, timeoutMs, onOutput: w.feed,
    devices: [virtioNet({ tap, mac: MAC, offload: false })],
    beforeRun: () => {
      ns!.adopt(tap, `${HOST}/24`);
      ns!.ip('link', 'set', tap, 'txqueuelen', String(TAP_QUEUE));
    },
    during: () => during(w.ready),
  });
  return parse(out, r.reason === 'guest-exit' ? (r.exitCode ?? null) : null);
}

/** Boots the probe on QEMU microvm inside the namespace, on a persistent TAP created there. */
async function qemuNet(p: Record<string, string | number>, during: (ready: Promise<void>) => Promise<void> = async () => {}, timeoutMs = 30_000): Promise<NetRun & { res: QemuProbeResult }> {
  const tap = tapName();
  const w = readyWatch();
  ns!.addTap(tap, `${HOST}/24`);
  ns!.ip('link', 'set', tap, 'txqueuelen', String(TAP_QUEUE));
  try {
    const running = runQemuProbe({
      test: 'net', params: p, wrap: ns!.wrap, timeoutMs, onOutput: w.feed,
      extraArgs: ['-global', 'virtio-mmio.force-legacy=false', '-netdev', `tap,id=n0,ifname=${tap},script=no,downscript=no`, '-device', `virtio-net-device,netdev=n0,mac=${MAC}`],
    });
    const [res] = await Promise.all([running, Promise.race([during(w.ready), running.then(() => undefined, () => undefined)])]);
    return { ...parse(res.output, res.exitStatus), res };
  } finally {
    ns!.ip('link', 'del', tap);
  }
}

/** Resolves once the guest printed its `PROBE net_dev` line (its RX queue is filled by then). */
function readyWatch() {
  let text = '';
  let resolve!: () => void;
  const ready = new Promise<void>((r) => (resolve = r));
  return { ready, feed: (s: string) => { text += s; if (text.includes('PROBE net_dev')) resolve(); } };
}

/** Host side of mode=ping: `ping -c 5 -i 0.2` once the guest is up. */
async function hostPing(ready: Promise<void>): Promise<string> {
  await ready;
  const r = await ns!.exec('ping', ['-c', '5', '-i', '0.2', '-W', '2', GUEST]);
  return r.stdout + r.stderr;
}

type Vmm = (p: Record<string, string | number>, during?: (ready: Promise<void>) => Promise<void>, timeoutMs?: number) => Promise<NetRun>;

function suite(name: string, vmm: () => Vmm) {
  it(`${name}: the host pings the guest (ARP + ICMP echo), 0% loss`, async (ctx) => {
    if (!ns) return ctx.skip();
    let ping = '';
    const run = await vmm()(params('ping', { 'net.count': 5, 'net.secs': 20 }), async (ready) => { ping = await hostPing(ready); });
    expect(run.exit, run.out + ping).toBe(0);
    expect(ping).toMatch(/5 packets transmitted, 5 received, 0% packet loss/);
    expect(run.dev?.fields.mac).toBe(MAC);
    expect(run.net?.fields.echo).toBe('5');
    expect(Number(run.net?.fields.arp)).toBeGreaterThanOrEqual(1);
    console.log(`[probe-net] ${name} ping: ${run.net?.raw} | ${ping.split('\n').find((l) => l.startsWith('rtt')) ?? ''}`);
  }, 60_000);

  it(`${name}: guest → host UDP (tx): every datagram arrives with the right seq and pattern`, async (ctx) => {
    if (!ns) return ctx.skip();
    const count = 2000, size = 256;
    const rx = await startNetnsUdpReceiver(ns!, { address: '', port: PORT, count, size });
    let stats: Awaited<ReturnType<typeof rx.stop>> | undefined;
    try {
      const run = await vmm()(params('tx', { 'net.count': count, 'net.size': size }));
      await new Promise((r) => setTimeout(r, 200));
      stats = await rx.stop();
      expect(run.exit, run.out).toBe(0);
      expect(run.net?.fields).toMatchObject({ sent: String(count), bytes: String(count * size), ok: '1' });
      expect(Number(run.net?.fields.pps)).toBeGreaterThan(0);
      expect(stats).toMatchObject({ received: count, bad: 0, dup: 0 });
      console.log(`[probe-net] ${name} tx: ${run.net?.raw} | host received ${stats.received} in ${stats.ms.toFixed(1)} ms`);
    } finally {
      if (!stats) await rx.stop().catch(() => undefined);
    }
  }, 60_000);

  it(`${name}: host → guest UDP (rx): the guest sees every datagram once with the right seq and pattern`, async (ctx) => {
    if (!ns) return ctx.skip();
    const count = 2000, size = 256;
    let sent: { sent: number; errors: number; ms: number } | undefined;
    const run = await vmm()(params('rx', { 'net.count': count, 'net.secs': 20 }), async (ready) => {
      // Resolve ARP first (the guest answers pings in every mode), then send paced datagrams.
      await ready;
      expect((await ns!.exec('ping', ['-c', '1', '-W', '2', GUEST])).code).toBe(0);
      sent = await runNetnsUdpSender(ns!, { address: GUEST, port: PORT, count, size, pps: 5_000 });
    });
    expect(sent).toMatchObject({ sent: count, errors: 0 });
    expect(run.exit, run.out).toBe(0);
    expect(run.net?.fields).toMatchObject({ received: String(count), lost: '0', dup: '0', bad: '0', ok: '1' });
    console.log(`[probe-net] ${name} rx: ${run.net?.raw} | host sent in ${sent?.ms.toFixed(1)} ms`);
  }, 60_000);

  it(`${name}: UDP echo (echo): datagrams come back unchanged`, async (ctx) => {
    if (!ns) return ctx.skip();
    const n = 20;
    const got: Buffer[] = [];
    let client = '';
    const run = await vmm()(params('echo', { 'net.count': n, 'net.secs': 20 }), async (ready) => {
      await ready;
      // A tiny echo client inside the namespace: sends n datagrams one at a time, prints what came back.
      const script = `const d=require('node:dgram');const s=d.createSocket('udp4');const out=[];let i=0;
        const send=()=>{const b=Buffer.from('probe-echo-'+i+'-'+'x'.repeat(i*7));s.send(b,${PORT},'${GUEST}');};
        s.on('message',(m)=>{out.push(m.toString('hex'));if(++i<${n})send();else{console.log(JSON.stringify(out));process.exit(0);}});
        s.bind(0,'${HOST}',send);setTimeout(()=>{console.log(JSON.stringify(out));process.exit(1);},15000);`;
      const r = await ns!.exec(process.execPath, ['-e', script], 20_000);
      client = `client exit ${r.code}: ${r.stdout}${r.stderr}`;
      for (const h of JSON.parse(r.stdout.trim().split('\n').at(-1) || '[]') as string[]) got.push(Buffer.from(h, 'hex'));
    });
    expect(run.exit, run.out + client).toBe(0);
    expect(got.length, run.out + client).toBe(n);
    got.forEach((b, i) => expect(b.toString()).toBe(`probe-echo-${i}-${'x'.repeat(i * 7)}`));
    expect(run.net?.fields.echoed).toBe(String(n));
  }, 60_000);
}

describe.skipIf(!!noNet)('probe virtio-net driver on kvmkit (TAP in a netns)', () => {
  suite('kvmkit', () => kvmkitNet);

  it('bad parameters are refused before the device is touched', async (ctx) => {
    if (!ns) return ctx.skip();
    const a = await kvmkitNet(params('ping', { 'net.host': '10.9.9.9' }));
    expect(a.out).toContain('PROBE error net_host_not_on_link');
    expect(a.exit).toBe(1);
    const b = await kvmkitNet(params('warp'));
    expect(b.out).toContain('PROBE error net_bad_param net.mode=warp');
    expect(b.exit).toBe(2);
    const c = await kvmkitNet(params('tx', { 'net.size': 2000 }));
    expect(c.out).toContain('PROBE error net_bad_param_size');
  }, 60_000);

  it('rx: datagrams with a wrong pattern are counted bad and fail the run', async (ctx) => {
    if (!ns) return ctx.skip();
    const run = await kvmkitNet(params('rx', { 'net.count': 5, 'net.idle_ms': 500, 'net.secs': 10 }), async (ready) => {
      await ready;
      // seq 1 with a broken pattern, then seq 7 (≥ count) with a correct one, then 2 good ones.
      const script = `const d=require('node:dgram');const s=d.createSocket('udp4');
        const p=(seq,n)=>{const b=Buffer.alloc(n);b.writeUInt32BE(seq,0);for(let i=4;i<n;i++)b[i]=(seq+i)&255;return b;};
        const bad=p(1,64);bad[40]^=1;const q=[bad,p(7,64),p(0,64),p(2,64)];
        (async()=>{for(const b of q){await new Promise(r=>s.send(b,${PORT},'${GUEST}',r));await new Promise(r=>setTimeout(r,20));}s.close();})();`;
      expect((await ns!.exec('ping', ['-c', '1', '-W', '2', GUEST])).code).toBe(0);
      expect((await ns!.exec(process.execPath, ['-e', script], 10_000)).code).toBe(0);
    });
    expect(run.exit, run.out).toBe(1);
    expect(run.net?.fields).toMatchObject({ received: '2', bad: '2', first_bad_seq: '1', lost: '3', ok: '0' });
  }, 60_000);

  it('tx without a host answering ARP: net_arp_timeout', async (ctx) => {
    if (!ns) return ctx.skip();
    const run = await kvmkitNet(params('tx', { 'net.host': '10.77.7.9', 'net.secs': 1 }));
    expect(run.out).toContain('PROBE error net_arp_timeout');
    expect(run.exit).toBe(1);
  }, 60_000);
});

describe.skipIf(!!noNet || !qemu)('probe virtio-net driver on QEMU microvm (TAP in a netns)', () => {
  suite('qemu', () => qemuNet);
});

// ---- a misbehaving NIC: the guest must catch what it writes ----

type Evil = 'rx-len' | 'rx-hdr' | 'rx-twice' | 'rx-id-range' | 'rx-too-many' | 'ip-csum' | 'udp-csum' | 'ip-len' | 'tx-len' | 'tx-id';
const EVIL_MAC = [0x52, 0x54, 0x00, 0x7e, 0x57, 0x09];

function csum(b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < b.length; i += 2) s += (b[i]! << 8) | (b[i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** vnet header + an Ethernet/IPv4/UDP frame from HOST:7 to GUEST:PORT (valid unless `evil` breaks it). */
function evilFrame(evil: Evil): Buffer {
  const payload = Buffer.from('evil-payload');
  const udp = Buffer.alloc(8 + payload.length);
  udp.writeUInt16BE(7, 0);
  udp.writeUInt16BE(PORT, 2);
  udp.writeUInt16BE(udp.length, 4);
  payload.copy(udp, 8);
  const ip = Buffer.alloc(20);
  ip[0] = 0x45;
  ip.writeUInt16BE(20 + udp.length + (evil === 'ip-len' ? 100 : 0), 2);
  ip[8] = 64;
  ip[9] = 17;
  Buffer.from(HOST.split('.').map(Number)).copy(ip, 12);
  Buffer.from(GUEST.split('.').map(Number)).copy(ip, 16);
  ip.writeUInt16BE(csum(ip) ^ (evil === 'ip-csum' ? 1 : 0), 10);
  const pseudo = Buffer.concat([ip.subarray(12, 20), Buffer.from([0, 17, udp.length >> 8, udp.length & 0xff]), udp]);
  udp.writeUInt16BE((csum(pseudo) || 0xffff) ^ (evil === 'udp-csum' ? 0x10 : 0), 6);
  const eth = Buffer.concat([Buffer.from(EVIL_MAC), Buffer.from([0x52, 0x54, 0, 1, 2, 3]), Buffer.from([0x08, 0x00])]);
  const hdr = Buffer.alloc(12);
  if (evil === 'rx-hdr') hdr[1] = 1; // GSO_TCPV4 without GUEST_TSO4
  return Buffer.concat([hdr, eth, ip, udp]);
}

/** virtio-net (id 1, MAC + STATUS) that answers the guest's first RX buffers / first TX chain wrongly. */
class EvilNet extends VirtioDevice {
  readonly deviceId = VIRTIO_ID.NET;
  readonly name = 'evil-net';
  readonly queueSizes = [256, 256];
  readonly features = (1n << 5n) | (1n << 16n);
  private done = false;
  constructor(private readonly evil: Evil) {
    super();
    this.config = Uint8Array.from([...EVIL_MAC, 1, 0]);
  }
  processQueue(q: number): void {
    const vq = this.ctx.queue(q);
    const tx = this.evil.startsWith('tx-');
    if (this.done || (q === 1) !== tx) {
      if (q === 1) for (let c = vq.pop(); c; c = vq.pop()) vq.pushUsed(c, 0);
      this.ctx.signalUsed(q);
      return;
    }
    const c = vq.pop();
    if (!c) return;
    this.done = true;
    if (tx) {
      vq.pushUsed(this.evil === 'tx-len' ? c : c.head + 1, this.evil === 'tx-len' ? 1 : 0);
    } else {
      const n = c.write(this.ctx.memory, evilFrame(this.evil));
      if (this.evil === 'rx-len') vq.pushUsed(c, c.writableLength + 1);
      else if (this.evil === 'rx-id-range') vq.pushUsed(999, n);
      else if (this.evil === 'rx-twice') { vq.pushUsed(c, n); vq.pushUsed(c.head, n); }
      else if (this.evil === 'rx-too-many') for (let i = 0; i < 200; i++) vq.pushUsed(c, n);
      else vq.pushUsed(c, n);
    }
    this.ctx.signalUsed(q);
  }
}

const evilNet = (evil: Evil): Plugin => ({
  name: 'evil-net', version: '0.1.0', kernel: '^0.1.0', provides: ['virtio-device+'], options: {},
  apply(machine) {
    useVirtioMmio(machine, 'evil-net', () => new EvilNet(evil));
  },
});

describe.skipIf(!hasKvm)('probe virtio-net driver against a misbehaving device (kvmkit)', () => {
  it.each([
    ['rx-len', 'ping', 'net_rx_used_len'],
    ['rx-hdr', 'ping', 'net_rx_hdr'],
    ['rx-twice', 'ping', 'net_rx_used_id'],
    ['rx-id-range', 'ping', 'net_used_id'],
    ['rx-too-many', 'ping', 'net_used_idx_jump'],
    ['ip-csum', 'ping', 'net_rx_ip_csum'],
    ['ip-len', 'ping', 'net_rx_ip_len'],
    ['udp-csum', 'echo', 'net_rx_udp_csum'],
    ['tx-len', 'tx', 'net_tx_used_len'],
    ['tx-id', 'tx', 'net_tx_used_id'],
  ] as const)('%s (mode %s) → PROBE error %s', async (evil, mode, err) => {
    const { out, r } = await runProbeOnKvmkit({ name: 'probe-evil-net', cmdline: probeCmdline('net', params(mode, { 'net.secs': 5 })), devices: [evilNet(evil)], kernel: elf });
    expect(out).toContain(`PROBE error ${err} `);
    expect(r.exitCode, out).toBe(1);
  }, 30_000);

  it('the same device answering correctly: the guest echoes the datagram (control for the cases above)', async () => {
    // Mode echo with count 1: the valid frame from evilFrame() is echoed, then the probe exits 0.
    const { out, r } = await runProbeOnKvmkit({ name: 'probe-evil-net', cmdline: probeCmdline('net', params('echo', { 'net.count': 1, 'net.secs': 5 })), devices: [evilNet('ok' as Evil)], kernel: elf });
    expect(r.exitCode, out).toBe(0);
    expect(parse(out, 0).net?.fields).toMatchObject({ echoed: '1', udp: '1', ok: '1' });
  }, 30_000);
});
