/**
 * Live migration of a Linux guest that answers ping (slow, KVMKIT_SLOW=1): the guest kernel boots with a
 * virtio-net NIC on a TAP in a test network namespace (`ip=` configures it, the spin /init runs), the
 * namespace pings it continuously, the guest is pre-copy migrated to a NEW process (run inside the namespace
 * so its NIC re-attaches to the same TAP by name), the source stops, and the ping goes on being answered
 * by the destination. Minutes on the nested-PVM development hosts (keep the host quiet).
 */
import { describe, it, expect } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, createLogger, type Plugin } from '@kvmkit/kernel';
import serial, { type SerialApi } from '@kvmkit/plugin-serial';
import bootLinux from '@kvmkit/plugin-boot-linux';
import platformPc from '@kvmkit/plugin-platform-pc';
import hostPvm from '@kvmkit/plugin-host-pvm';
import virtioNet, { type VirtioNetApi } from '@kvmkit/plugin-virtio-net';
import snapshotPlugin from '@kvmkit/plugin-snapshot';
import migratePrecopy, { migrate } from '@kvmkit/plugin-migrate-precopy';
import { findGuestKernel, findExecutable, guestKernelHelp } from '@kvmkit/testkit';
import { hasKvm, spawnJsonChild } from './helpers.js';

const slow = process.env.KVMKIT_SLOW === '1';
/** How long a boot may take to reach /init (KVMKIT_LINUX_TIMEOUT_S; CI sets it lower). */
const LIMIT_MS = Number(process.env.KVMKIT_LINUX_TIMEOUT_S ?? 600) * 1000;
const kernel = findGuestKernel();
const onPvm = existsSync('/sys/module/kvm_pvm');
const DEST = fileURLToPath(new URL('./fixtures/linux-migrate-dest.mjs', import.meta.url));
const tools = ['ip', 'ping'].filter((t) => !findExecutable(t));
const why = !slow ? 'set KVMKIT_SLOW=1 to run it'
  : !hasKvm ? '/dev/kvm is missing'
  : !kernel?.vmlinux || !kernel.initrd ? guestKernelHelp()
  : process.getuid?.() !== 0 ? 'needs root (TAP, netns)'
  : tools.length ? `missing tools: ${tools.join(', ')} (apt-get install iproute2 iputils-ping)` : '';
if (why) console.warn(`[linux migrate e2e] skipped: ${why}`);

const ip = (...a: string[]) => execFileSync('ip', a, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

/** A running `ping -D` whose replies are collected as they arrive (it must not block this event loop: the NIC runs on it). */
function pinger(ns: string, addr: string) {
  const p = spawn('ip', ['netns', 'exec', ns, 'ping', '-D', '-n', '-i', '0.2', '-W', '1', addr], { stdio: ['ignore', 'pipe', 'pipe'] });
  const replies: { seq: number; at: number }[] = [];
  let buf = '';
  p.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const m = line.match(/^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)/);
      if (m) replies.push({ at: Number(m[1]) * 1000, seq: Number(m[2]) });
    }
  });
  const waitReplies = async (pred: () => boolean, ms: number, what: string) => {
    const t0 = Date.now();
    while (!pred()) {
      if (Date.now() - t0 > ms) throw new Error(`ping: ${what} not within ${ms} ms (${replies.length} replies)`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  return { replies, waitReplies, stop: () => p.kill('SIGINT') };
}

describe.skipIf(!!why)('Linux guest live migration with ping (KVMKIT_SLOW=1)', () => {
  it('the guest answers ping before, and from the destination after, a pre-copy migration to a new process', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'kvmkit-linux-mig-'));
    const ns = `kvmkit-lm-${process.pid}`;
    const tap = `klm${process.pid % 100000}`;
    const mac = '52:54:00:4b:56:12';
    const config = { name: 'linux-mig', memory: 256, cpus: Number(process.env.KVMKIT_LINUX_CPUS ?? 1), cmdline: 'panic=-1 ip=10.77.1.2::10.77.1.1:255.255.255.0::eth0:off' };
    ip('netns', 'add', ns);
    const log = createLogger({ level: (process.env.KVMKIT_LOG_LEVEL as 'info' | undefined) ?? 'warn', pretty: false });
    const m = new Machine({
      config,
      plugins: [snapshotPlugin(), migratePrecopy(), platformPc(), ...(onPvm ? [hostPvm()] : []),
        serial({ output: 'none', input: 'none' }), virtioNet({ tap, mac }),
        bootLinux({ kernel: kernel!.vmlinux!, initrd: kernel!.initrd! })] as Plugin[],
      log,
    });
    let ping: ReturnType<typeof pinger> | undefined;
    try {
      const t0 = performance.now();
      await m.start();
      ip('link', 'set', tap, 'netns', ns);
      ip('-n', ns, 'addr', 'add', '10.77.1.1/24', 'dev', tap);
      ip('-n', ns, 'link', 'set', tap, 'up');
      const con = m.api.use<SerialApi>('serial')!;
      const stopped = m.waitForStop().then((r) => {
        throw new Error(`source guest stopped: ${JSON.stringify(r)}\n${con.text().slice(-3000)}`);
      });
      stopped.catch(() => undefined);
      await Promise.race([con.waitFor(/Run \/init as init process/, LIMIT_MS), stopped]);
      const initS = (performance.now() - t0) / 1000;
      ping = pinger(ns, '10.77.1.2');
      await ping.waitReplies(() => ping!.replies.length >= 5, 30_000, '5 replies from the source');
      const srcStats = { ...m.api.use<VirtioNetApi>('virtio-net')!.device!.stats };

      const sock = path.join(dir, 'mig.sock');
      const dest = spawnJsonChild(DEST, { listen: sock, memory: config.memory, cpus: config.cpus, cmdline: config.cmdline, tap, mac, runMs: 8_000 },
        { wrap: ['ip', 'netns', 'exec', ns] });
      await dest.next((o) => o.listening, 30_000);
      const before = ping.replies.length;
      const report = await migrate(m, { to: sock, timeoutMs: 60_000 });
      const migratedAt = Date.now();
      const moved = await dest.next((o) => o.migrated, 30_000);
      expect(moved.error).toBeUndefined();
      expect((await m.waitForStop()).reason).toBeDefined();   // the source stopped after the destination confirmed
      await ping.waitReplies(() => ping!.replies.some((r) => r.at > migratedAt + 1000) && ping!.replies.filter((r) => r.at > migratedAt).length >= 10,
        30_000, '10 replies from the destination');
      const res = (await dest.done).last;
      expect(res?.error, JSON.stringify(res)).toBeUndefined();
      const after = ping.replies.filter((r) => r.at > migratedAt);
      // Sequence numbers around the switch: how many echo requests went unanswered while the guest moved.
      const seqs = ping.replies.map((r) => r.seq);
      const span = seqs.at(-1)! - seqs[0]! + 1;
      console.log(`[linux migrate e2e] /init at ${initS.toFixed(1)} s; migration ${JSON.stringify({ totalMs: report.totalMs, rounds: report.rounds, pagesSent: report.pagesSent, downtimeMs: report.downtimeMs })}; ` +
        `replies ${before} before, ${after.length} after (of seq ${seqs[0]}..${seqs.at(-1)}: ${span - seqs.length} unanswered); ` +
        `source net ${JSON.stringify(srcStats)}; destination net at resume ${JSON.stringify(res.netAtResume)}, at end ${JSON.stringify(res.net)}`);
      expect(res.ok).toBe(true);
      expect(res.needsReset).toBe(false);
      // The destination's NIC itself carried the replies after the switch (its counters moved past the migrated ones).
      expect(res.net.rxPackets).toBeGreaterThan(res.netAtResume.rxPackets + 5);
      expect(res.net.txPackets).toBeGreaterThan(res.netAtResume.txPackets + 5);
      expect(after.length).toBeGreaterThanOrEqual(10);
    } finally {
      ping?.stop();
      await m.stop();
      try { ip('netns', 'del', ns); } catch { /* already gone */ }
      rmSync(dir, { recursive: true, force: true });
    }
  }, LIMIT_MS + 120_000);
});
