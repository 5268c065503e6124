/**
 * Linux with real virtio devices (slow, KVMKIT_SLOW=1): the guest kernel boots with an **ext4 disk image as
 * its root** (`root=/dev/vda rw`, no initramfs: the spin /init lives on the disk), a virtio-rng and a
 * virtio-net NIC on a TAP in a test network namespace configured by `ip=`. Checks:
 *  - the kernel mounted the disk read-write: the host sees the superblock's mount count go 0 → 1 and a
 *    last-mount time with `dumpe2fs -h` after the VM stopped;
 *  - the host (from the namespace) pings the guest: 5/5 replies (RX and TX through the TAP);
 *  - the hwrng drew entropy, no device flagged DEVICE_NEEDS_RESET.
 * Minutes on the nested-PVM development hosts (guest ring 0 is emulated; keep the host quiet), well under a
 * second of boot on real KVM.
 */
import { describe, it, expect } from 'vitest';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Machine, createLogger, type Plugin } from '@kvmkit/kernel';
import serial, { type SerialApi } from '@kvmkit/plugin-serial';
import bootLinux from '@kvmkit/plugin-boot-linux';
import platformPc from '@kvmkit/plugin-platform-pc';
import hostPvm from '@kvmkit/plugin-host-pvm';
import virtioRng from '@kvmkit/plugin-virtio-rng';
import virtioNet, { type VirtioNetApi } from '@kvmkit/plugin-virtio-net';
import virtioBlk, { type VirtioBlkApi } from '@kvmkit/plugin-virtio-blk';
import { findGuestKernel, findExecutable, guestKernelHelp } from '@kvmkit/testkit';
import { hasKvm } from './helpers.js';

const slow = process.env.KVMKIT_SLOW === '1';
/** How long a boot may take to reach /init (KVMKIT_LINUX_TIMEOUT_S; CI sets it lower). */
const LIMIT_MS = Number(process.env.KVMKIT_LINUX_TIMEOUT_S ?? 600) * 1000;
const kernel = findGuestKernel();
const onPvm = existsSync('/sys/module/kvm_pvm');
const tools = ['mke2fs', 'dumpe2fs', 'cpio', 'ip', 'ping'].filter((t) => !findExecutable(t));
const why = !slow ? 'set KVMKIT_SLOW=1 to run it'
  : !hasKvm ? '/dev/kvm is missing'
  : !kernel?.vmlinux || !kernel.initrd ? guestKernelHelp()
  : process.getuid?.() !== 0 ? 'needs root (TAP, netns)'
  : tools.length ? `missing tools: ${tools.join(', ')} (apt-get install e2fsprogs cpio iproute2 iputils-ping)` : '';
if (why) console.warn(`[linux virtio e2e] skipped: ${why}`);

const run = (cmd: string, a: string[], cwd?: string, input?: Buffer) =>
  execFileSync(cmd, a, { encoding: 'utf8', cwd, input, stdio: [input ? 'pipe' : 'ignore', 'pipe', 'pipe'] });

/** The devices run on this process's event loop: anything that waits on the guest (ping) must not block it. */
const runAsync = async (cmd: string, a: string[]) => (await promisify(execFile)(cmd, a, { encoding: 'utf8' })).stdout;

/** The superblock fields the test compares, from `dumpe2fs -h`. */
function superblock(img: string): { mountCount: number; lastMount: string } {
  const out = run('dumpe2fs', ['-h', img]);
  const field = (k: string) => out.match(new RegExp(`^${k}:\\s*(.*)$`, 'm'))?.[1]?.trim() ?? '';
  return { mountCount: Number(field('Mount count')), lastMount: field('Last mount time') };
}

/** An ext4 image holding the spin /init from the fixture initramfs, plus the mount points the kernel uses. */
function makeRootImage(dir: string, initrd: string): string {
  const root = path.join(dir, 'root');
  mkdirSync(root);
  run('cpio', ['-idm', '--quiet'], root, execFileSync('cat', [initrd]));
  for (const d of ['dev', 'proc', 'sys', 'tmp']) mkdirSync(path.join(root, d), { recursive: true });
  if (!existsSync(path.join(root, 'init'))) throw new Error(`${initrd} has no /init`);
  const img = path.join(dir, 'root.ext4');
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'kvmkit-root', '-d', root, img, '16M']);
  return img;
}

describe.skipIf(!!why)('Linux guest with an ext4 root on virtio-blk, virtio-net on a TAP, virtio-rng (KVMKIT_SLOW=1)', () => {
  it('mounts the disk read-write (mount count changes in the image) and answers the host\'s ping', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'kvmkit-linux-virtio-'));
    const ns = `kvmkit-lx-${process.pid}`;
    const tap = `kvl${process.pid % 100000}`;
    const img = makeRootImage(dir, kernel!.initrd!);
    const before = superblock(img);
    expect(before.mountCount).toBe(0);
    run('ip', ['netns', 'add', ns]);
    const log = createLogger({ level: (process.env.KVMKIT_LOG_LEVEL as 'info' | undefined) ?? 'warn', pretty: false });
    const m = new Machine({
      config: {
        name: 'linux-virtio', memory: 256, cpus: Number(process.env.KVMKIT_LINUX_CPUS ?? 1),
        cmdline: 'panic=-1 root=/dev/vda rw rootfstype=ext4 rootwait init=/init ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off',
      },
      plugins: [
        platformPc(),
        ...(onPvm ? [hostPvm()] : []),
        // KVMKIT_LINUX_CONSOLE=<file> mirrors the guest console to a file while the test runs.
        serial({ output: process.env.KVMKIT_LINUX_CONSOLE ? { file: process.env.KVMKIT_LINUX_CONSOLE } : 'none', input: 'none' }),
        virtioBlk({ path: img }),
        virtioRng(),
        virtioNet({ tap, mac: '52:54:00:4b:56:02' }),
        bootLinux({ kernel: kernel!.vmlinux! }),
      ] as Plugin[],
      log,
    });
    const t0 = performance.now();
    const times: Record<string, string> = {};
    let stoppedVm = false;
    try {
      await m.start();
      run('ip', ['link', 'set', tap, 'netns', ns]);
      run('ip', ['-n', ns, 'addr', 'add', '10.77.0.1/24', 'dev', tap]);
      run('ip', ['-n', ns, 'link', 'set', tap, 'up']);
      const con = m.api.use<SerialApi>('serial')!;
      const stopped = m.waitForStop().then((r) => {
        throw new Error(`guest stopped: ${JSON.stringify(r)}`);
      });
      stopped.catch(() => undefined);
      const at = async (name: string, re: RegExp) => {
        try {
          await Promise.race([con.waitFor(re, LIMIT_MS), stopped]);
        } catch (e) {
          throw new Error(`${(e as Error).message} (waiting for ${re})\n--- guest console (tail) ---\n${con.text().slice(-4000)}`);
        }
        times[name] = ((performance.now() - t0) / 1000).toFixed(1);
      };
      await at('vda', /virtio_blk virtio\d+: \[vda\] 32768 512-byte logical blocks/);
      await at('mount', /EXT4-fs \(vda\): mounted filesystem/);
      await at('init', /Run \/init as init process/);
      const ping = await runAsync('ip', ['netns', 'exec', ns, 'ping', '-c', '5', '-i', '0.5', '-W', '10', '10.77.0.2']);
      const blk = m.api.use<VirtioBlkApi>('virtio-blk')!;
      const rng = m.api.use<{ registration(): { transport: { device: { bytesServed: number } } } }>('virtio-rng')!;
      const net = m.api.use<VirtioNetApi>('virtio-net')!;
      console.log(`[linux virtio e2e] s since start: ${JSON.stringify(times)}; blk ${JSON.stringify(blk.device!.stats)}; ` +
        `rng ${rng.registration().transport.device.bytesServed} bytes; net ${JSON.stringify(net.device!.stats)}\n${ping.trim().split('\n').slice(-2).join('\n')}`);
      expect(ping).toMatch(/5 packets transmitted, 5 received/);
      expect(blk.device!.stats.writes).toBeGreaterThan(0);
      expect(rng.registration().transport.device.bytesServed).toBeGreaterThan(0);
      for (const name of ['virtio-blk', 'virtio-rng', 'virtio-net']) {
        const r = m.api.use<{ registration(): { transport: { status: number } } }>(name)!.registration();
        expect(r.transport.status & 64, `${name} DEVICE_NEEDS_RESET`).toBe(0);
      }
      await m.stop();
      stoppedVm = true;
      const after = superblock(img);
      console.log(`[linux virtio e2e] superblock before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`);
      expect(after.mountCount).toBe(1);
      expect(after.lastMount).not.toBe(before.lastMount);
      expect(after.lastMount).not.toMatch(/n\/a/);
    } finally {
      if (!stoppedVm) await m.stop();
      try { run('ip', ['netns', 'del', ns]); } catch { /* already gone */ }
      rmSync(dir, { recursive: true, force: true });
    }
  }, LIMIT_MS + 120_000);
});
