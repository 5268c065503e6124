import { describe, it, expect, beforeAll } from 'vitest';
import { Machine, silentLogger, type StopReason } from '@kvmkit/kernel';
import bootLinux from '@kvmkit/plugin-boot-linux';
import serial from '@kvmkit/plugin-serial';
import platformPc from '@kvmkit/plugin-platform-pc';
import counter, { type CounterApi } from 'kvmkit-plugin-example-counter';
import { probeElfPath, parseProbeOutput } from '@kvmkit/testkit';
import { hasKvm } from './helpers.js';

let elf = '';
beforeAll(() => {
  if (hasKvm) elf = probeElfPath();
});

/** Boots the probe guest (PVH ELF) on kvmkit with the standard PC plugins and the counter device. */
async function probe(cmdline: string, cpus = 1, fastPath = true): Promise<{ out: string; r: StopReason; count: number; parsed: ReturnType<typeof parseProbeOutput> }> {
  const chunks: Uint8Array[] = [];
  const m = new Machine({
    config: { name: 'probe', memory: 64, cpus, cmdline },
    // counter first: its MMIO window is the first allocation, 0xd0000000, where the probe's mmio test writes.
    plugins: [counter({ fastPath }), platformPc(), serial({ console: false, output: 'none', sink: (b) => chunks.push(b) }), bootLinux({ kernel: elf })],
    log: silentLogger(),
  });
  await m.start();
  const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 124, message: 'test timeout' }), 120_000);
  const r = await m.waitForStop();
  clearTimeout(t);
  const out = Buffer.concat(chunks).toString();
  return { out, r, count: m.api.use<CounterApi>('counter')!.value(), parsed: parseProbeOutput(out) };
}

describe.skipIf(!hasKvm)('probe guest on kvmkit', () => {
  it('hello: boots through PVH, prints on the 16550 and exits through the debug-exit port', async () => {
    const { out, r, parsed } = await probe('probe.test=hello');
    expect(out).toMatch(/PROBE hello vcpus=1/);
    expect(parsed.done?.status).toBe(0);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
  });

  it('exit: the guest status becomes the stop exit code', async () => {
    const { r } = await probe('probe.test=exit probe.status=37');
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 37 });
  });

  it.each([['pio', true], ['mmio', true], ['pio', false]] as const)('%s exit loop from ring 3 reaches the counter device (fast path %s)', async (test, fast) => {
    const iters = 2000;
    const { out, r, count, parsed } = await probe(`probe.test=${test} probe.iters=${iters} probe.ring=3`, 1, fast);
    expect(r.exitCode).toBe(0);
    const line = parsed.lines.find((l) => l.test === test);
    expect(line?.fields.ring, out).toBe('3');
    expect(Number(line?.fields.cycles_per_exit)).toBeGreaterThan(0);
    expect(count).toBe(iters);
  });

  it('smp: the boot plugin MP table lets the guest bring up both vCPUs', async () => {
    const { out, r } = await probe('probe.test=smp', 2);
    expect(out).toMatch(/PROBE smp cpus=2 expected=2/);
    expect(out.match(/PROBE smp cpu=\d+ up/g)).toHaveLength(2);
    expect(r.exitCode).toBe(0);
  });

  it('timer: LAPIC timer interrupts are delivered by the in-kernel irqchip', async () => {
    const { out, r, parsed } = await probe('probe.test=timer probe.ms=100');
    const ticks = Number(parsed.lines.find((l) => l.test === 'timer')?.fields.ticks);
    expect(ticks, out).toBeGreaterThan(0);
    expect(r.exitCode).toBe(0);
  });

  it('fault: an unexpected guest exception is reported and the VM exits 0x7f', async () => {
    const { out, r } = await probe('probe.test=fault probe.ring=3');
    expect(out).toMatch(/PROBE FAULT vector=/);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0x7f });
  });
});
