/**
 * virtio-mmio on a real VM (skipped without /dev/kvm): a ring-3 guest writes QueueNotify in a loop; KVM
 * completes those writes through the ioeventfd (no exit reaches the VMM), fdwatch wakes the main thread,
 * and the device processes the chain the host laid out in guest memory before the vCPUs started.
 */
import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { readdirSync } from 'node:fs';
import { Machine, fdWatchCount, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import platformPc from '@kvmkit/plugin-platform-pc';
import { registerVirtioMmio, useVirtioMmio, type VirtioMmioRegistration, type VirtioRegistry } from './register.js';
import { VirtioTestDriver } from './driver.js';
import { MMIO, VIRTIO_MMIO_INT } from './constants.js';
import { EchoDevice } from './testdevice.test-util.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[virtio kvm test] /dev/kvm not present: skipped');

/** N x `mov [addr], eax` (eax = 0 = queue 0), then `out 0xf4, 0`. Entry: RDX = N. */
function notifyLoop(addr: number): Uint8Array {
  return new Uint8Array([
    0x48, 0x89, 0xd1, //                      mov rcx, rdx
    0xbb, addr & 0xff, (addr >>> 8) & 0xff, (addr >>> 16) & 0xff, (addr >>> 24) & 0xff, // mov ebx, addr
    0x31, 0xc0, //                            xor eax, eax
    0x89, 0x03, //                         L: mov [rbx], eax
    0x48, 0xff, 0xc9, //                      dec rcx
    0x75, 0xf9, //                            jnz L
    0x31, 0xc0, //                            xor eax, eax
    0xe6, 0xf4, //                            out 0xf4, al
    0xeb, 0xfe, //                            jmp $
  ]);
}

/**
 * A ring-3 guest *driver* loop (assembled with GNU as from the source below): N times, re-post descriptor
 * chain 0 on the avail ring, notify queue 0, spin until used.idx catches up; then `out 0xf4, 0`.
 * Reads its parameters from 0x9000: avail ring GPA, used ring GPA, notify address, queue size - 1.
 *     mov rcx, rdx; mov r9, [0x9000]; mov r10, [0x9008]; mov rbx, [0x9010]; mov r11d, [0x9018]; xor esi, esi
 *   L: mov eax, esi; and eax, r11d; mov word [r9+4+rax*2], 0; lea edx, [rsi+1]; mov word [r9+2], dx
 *     mov dword [rbx], 0
 *   W: movzx eax, word [r10+2]; cmp ax, dx; jne W
 *     inc esi; dec rcx; jnz L; xor eax, eax; out 0xf4, al; jmp $
 */
const ROUND_TRIP = Uint8Array.from([
  0x48, 0x89, 0xd1, 0x4c, 0x8b, 0x0c, 0x25, 0x00, 0x90, 0x00, 0x00, 0x4c, 0x8b, 0x14, 0x25, 0x08, 0x90, 0x00, 0x00, 0x48, 0x8b, 0x1c,
  0x25, 0x10, 0x90, 0x00, 0x00, 0x44, 0x8b, 0x1c, 0x25, 0x18, 0x90, 0x00, 0x00, 0x31, 0xf6, 0x89, 0xf0, 0x44, 0x21, 0xd8, 0x66, 0x41,
  0xc7, 0x44, 0x41, 0x04, 0x00, 0x00, 0x8d, 0x56, 0x01, 0x66, 0x41, 0x89, 0x51, 0x02, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x41, 0x0f,
  0xb7, 0x42, 0x02, 0x66, 0x39, 0xd0, 0x75, 0xf6, 0xff, 0xc6, 0x48, 0xff, 0xc9, 0x75, 0xd4, 0x31, 0xc0, 0xe6, 0xf4, 0xeb, 0xfe,
]);

/** Runs ROUND_TRIP for `n` requests; `ioeventfd: false` hides KVM's ioeventfd so notifies take MMIO exits. */
async function roundTrips(n: number, ioeventfd: boolean): Promise<{ ms: number; usPerRequest: number; mainExits: number; processed: number; wiring: { ioeventfds: number; irqfd: boolean } }> {
  // Timestamps of the first and last completed request: start/stop costs stay out of the measurement.
  let first = 0;
  let last = 0;
  class TimedEcho extends EchoDevice {
    override processQueue(q: number): void {
      super.processQueue(q);
      last = performance.now();
      if (!first) first = last;
    }
  }
  const dev = new TimedEcho([8]);
  let r: VirtioMmioRegistration | undefined;
  let processed = -1;
  const plugin: Plugin = {
    name: 'virtio-rt',
    version: '0.1.0',
    apply(m) {
      m.hooks.devices.tapPromise('virtio-rt', async (reg) => {
        const vm = reg.vm;
        const view: VirtioRegistry = {
          memory: reg.memory,
          vm: ioeventfd ? vm : { hasIrqchip: vm.hasIrqchip, ioeventfd: () => { throw new Error('hidden for the test'); }, irqfd: (o) => vm.irqfd(o) },
          allocateMmio: (size, name, align) => reg.allocateMmio(size, name, align),
          allocateIrq: (name, want) => reg.allocateIrq(name, want),
          addMmio: (base, size, d, name) => reg.addMmio(base, size, d, name),
          addCmdline: (p) => reg.addCmdline(p),
          pulseIrq: (g) => reg.pulseIrq(g),
        };
        r = registerVirtioMmio(view, dev, { name: 'virtio-rt' });
      });
      m.hooks.beforeRun.tapPromise('virtio-rt', async () => {
        const mem = m.memory!;
        const drv = new VirtioTestDriver(r!.transport, mem, 0x200000n, 0x400000n);
        drv.init({ want: 1n << 32n }); // VERSION_1 only: no EVENT_IDX, no indirect
        const q = drv.queues[0]!;
        drv.add(0, [{ len: 4, data: new Uint8Array(4) }, { len: 4, write: true }]);
        mem.writeU16(q.avail + 2n, 0); // the guest publishes it
        mem.writeU64(0x9000, q.avail);
        mem.writeU64(0x9008, q.used);
        mem.writeU64(0x9010, r!.base + BigInt(MMIO.QUEUE_NOTIFY));
        mem.writeU32(0x9018, q.size - 1);
      });
      m.hooks.afterStop.tapPromise('virtio-rt', async () => {
        processed = dev.processed;
        await r!.transport.close(); // registerVirtioMmio alone does not tap afterStop (useVirtioMmio does)
      });
    },
  };
  const m = new Machine({ config: { name: 'virtio-rt', memory: 16, cpus: 1 }, plugins: [platformPc(), plugin, bootFlat({ image: ROUND_TRIP, ring: 3, arg: n })], log: silentLogger() });
  await m.start();
  const wiring = r!.transport.wiring;
  const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'timeout' }), 120_000);
  const stop = await m.waitForStop();
  const ms = last - first;
  clearTimeout(timer);
  expect(stop).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
  return { ms, usPerRequest: (ms * 1000) / (n - 1), mainExits: m.stats.mainExits, processed, wiring };
}

describe.skipIf(!hasKvm)('virtio-mmio on /dev/kvm', () => {
  it('request round trip: guest driver loop via ioeventfd+fdwatch vs MMIO exits (measured, reported)', async () => {
    const n = 3000;
    const viaEventfd = await roundTrips(n, true);
    const viaExit = await roundTrips(n, false);
    expect(viaEventfd.processed).toBe(n);
    expect(viaExit.processed).toBe(n);
    expect(viaEventfd.wiring.ioeventfds).toBe(1);
    expect(viaExit.wiring.ioeventfds).toBe(0);
    expect(viaEventfd.mainExits).toBeLessThanOrEqual(1);
    expect(viaExit.mainExits).toBeGreaterThanOrEqual(n);
    console.log(
      `virtio request round trip (guest posts, notifies, polls used.idx): ioeventfd+fdwatch ${viaEventfd.usPerRequest.toFixed(1)} us/request; ` +
        `QueueNotify as an MMIO exit handled on the main thread ${viaExit.usPerRequest.toFixed(1)} us/request (n=${n}, first to last completion)`,
    );
  }, 300_000);

  it('processes a queue notified by the guest through ioeventfd, without userspace exits, irqfd wired', async () => {
    const dev = new EchoDevice([8]);
    let reg: (() => VirtioMmioRegistration | undefined) | undefined;
    let drv: VirtioTestDriver | undefined;
    let seen: { processed: number; used: number; isr: number } | undefined;
    const echo: Plugin = {
      name: 'virtio-echo',
      version: '0.1.0',
      apply(m) {
        // Recorded before useVirtioMmio's afterStop closes the transport (taps run in order).
        m.hooks.afterStop.tapPromise('virtio-echo-check', async () => {
          seen = { processed: dev.processed, used: m.memory!.readU16(drv!.queues[0]!.used + 2n), isr: reg!()!.transport.interruptStatus };
        });
        reg = useVirtioMmio(m, 'virtio-echo', () => dev);
        m.hooks.beforeRun.tapPromise('virtio-echo', async () => {
          const r = reg!()!;
          // The host plays the driver: negotiate, lay out the ring, post one chain (vCPUs not running yet).
          drv = new VirtioTestDriver(r.transport, m.memory!, 0x200000n, 0x400000n);
          drv.init();
          drv.add(0, [{ len: 4, data: new TextEncoder().encode('ping') }, { len: 4, write: true }]);
        });
      },
    };
    const base = 0xd0000000;
    const n = 5000;
    const m = new Machine({
      config: { name: 'virtio-kvm', memory: 16, cpus: 1 },
      plugins: [platformPc(), echo, bootFlat({ image: notifyLoop(base + MMIO.QUEUE_NOTIFY), ring: 3, arg: n })],
      log: silentLogger(),
    });
    await m.start();
    const r = reg!()!;
    expect(Number(r.base)).toBe(base);
    expect(r.transport.wiring).toEqual({ ioeventfds: 1, irqfd: true });
    const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'timeout' }), 60_000);
    const stop = await m.waitForStop();
    clearTimeout(timer);
    expect(stop).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(seen).toEqual({ processed: 1, used: 1, isr: VIRTIO_MMIO_INT.VRING });
    // 5000 notify writes and none reached the VMM (only the debug-exit `out` did, on the vCPU thread or main).
    expect(m.stats.mainExits).toBeLessThanOrEqual(1);
  }, 90_000);

  it('releases ioeventfds, irqfd, eventfds and watches: fd count stable over 15 machines', async () => {
    const fds = () => readdirSync('/proc/self/fd').length;
    const once = async () => {
      const echo: Plugin = { name: 'virtio-echo', version: '0.1.0', apply: (m) => void useVirtioMmio(m, 'virtio-echo', () => new EchoDevice([8, 8])) };
      const m = new Machine({
        config: { name: 'virtio-leak', memory: 16, cpus: 1 },
        plugins: [platformPc(), echo, bootFlat({ image: Uint8Array.from([0x31, 0xc0, 0xe6, 0xf4, 0xeb, 0xfe]), ring: 3 })],
        log: silentLogger(),
      });
      await m.start();
      expect(await m.waitForStop()).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    };
    await once();
    await new Promise((r) => setTimeout(r, 50));
    const before = fds();
    const watches = fdWatchCount().live;
    for (let i = 0; i < 15; i++) await once();
    await new Promise((r) => setTimeout(r, 50));
    expect(fds()).toBe(before);
    expect(fdWatchCount().live).toBe(watches);
  }, 300_000);
});
