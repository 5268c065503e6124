/**
 * virtio-mmio on a real VM (skipped without /dev/kvm): a ring-3 guest writes QueueNotify in a loop; KVM
 * completes those writes through the ioeventfd (no exit reaches the VMM), fdwatch wakes the main thread,
 * and the device processes the chain the host laid out in guest memory before the vCPUs started.
 */
import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import platformPc from '@kvmkit/plugin-platform-pc';
import { useVirtioMmio, type VirtioMmioRegistration } from './register.js';
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

describe.skipIf(!hasKvm)('virtio-mmio on /dev/kvm', () => {
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
});
