import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, silentLogger, type Plugin, type StopReason } from '@kvmkit/kernel';
import platformPc, { type PlatformPcApi, type PlatformPcState } from './index.js';
import { realModeBoot, runToStop, REAL_MODE_LOAD as LOAD } from '@kvmkit/testkit';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[plugin-platform-pc] /dev/kvm not present: KVM integration tests are skipped');

function machine(name: string, code: number[], plugins: Plugin[] = [platformPc()]): Machine {
  return new Machine({ config: { name, memory: 16, cpus: 1 }, plugins: [...plugins, realModeBoot(code)], log: silentLogger() });
}

const run = runToStop;

const OUT_F4 = [0xe6, 0xf4]; // out 0xf4, al
const HLT = [0xf4, 0xeb, 0xfd]; // hlt; jmp hlt

describe.skipIf(!hasKvm)('platform-pc on /dev/kvm', () => {
  it('creates the in-kernel irqchip and PIT; `mov al,5; out 0xf4,al` stops the VM with exit code 5', async () => {
    const m = machine('pc-exit', [0xb0, 0x05, ...OUT_F4, ...HLT]);
    const r = await run(m);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 5 });
    expect(m.vm?.hasIrqchip).toBe(true);
    expect(m.vm?.hasPit).toBe(true);
  });

  it("KVM's PIT runs channel 2 behind port 0x61: Linux's calibration poll (gate on, mode 0, wait for OUT2) ends", async () => {
    const code = [
      0xe4, 0x61, 0x24, 0xfc, 0x0c, 0x01, 0xe6, 0x61, // in al,0x61; and al,0xfc; or al,1; out 0x61,al  (gate on, speaker off)
      0xb0, 0xb0, 0xe6, 0x43, // channel 2, lo/hi, mode 0
      0xb0, 0xff, 0xe6, 0x42, 0xe6, 0x42, // count 0xffff (~55 ms)
      // While counting OUT2 (bit 5) is low, and bits 6-7 are 0 (an unclaimed port would read 0xff): else exit 0xee.
      0xe4, 0x61, 0xa8, 0xe0, 0x74, 0x04, 0xb0, 0xee, ...OUT_F4,
      0xe4, 0x61, 0xa8, 0x20, 0x74, 0xfa, // l: in al,0x61; test al,0x20; jz l
      0xb0, 0x2a, ...OUT_F4, ...HLT,
    ];
    const r = await run(machine('pc-pit', code));
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0x2a });
  });

  it('without the in-kernel PIT, port 0x61 is ours and reads OUT2 high so the same poll ends', async () => {
    const code = [0xe4, 0x61, 0xa8, 0x20, 0x74, 0xfa, 0xb0, 0x2b, ...OUT_F4, ...HLT];
    const r = await run(machine('pc-nopit', code, [platformPc({ pit: false })]));
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0x2b });
  });

  it('CMOS: register D reads VRT (0x80) and the BCD year matches the host', async () => {
    const d = await run(machine('pc-cmos-d', [0xb0, 0x0d, 0xe6, 0x70, 0xe4, 0x71, ...OUT_F4, ...HLT]));
    expect(d).toMatchObject({ reason: 'guest-exit', exitCode: 0x80 });
    const y = await run(machine('pc-cmos-y', [0xb0, 0x09, 0xe6, 0x70, 0xe4, 0x71, ...OUT_F4, ...HLT]));
    expect((y.exitCode >> 4) * 10 + (y.exitCode & 15)).toBe(new Date().getUTCFullYear() % 100);
  });

  it('i8042: self-test answers 0x55; command 0xFE resets the machine', async () => {
    const st = await run(machine('pc-kbd-test', [0xb0, 0xaa, 0xe6, 0x64, 0xe4, 0x60, ...OUT_F4, ...HLT]));
    expect(st).toMatchObject({ reason: 'guest-exit', exitCode: 0x55 });
    const rs = await run(machine('pc-kbd-reset', [0xb0, 0xfe, 0xe6, 0x64, ...HLT]));
    expect(rs.reason).toBe('reset');
  });

  it('boot-timer writes are recorded with the time since process start', async () => {
    const m = machine('pc-timer', [0xb0, 0x01, 0xe6, 0xf5, 0xb0, 0x00, ...OUT_F4, ...HLT]);
    await run(m);
    const t = m.api.use<PlatformPcApi>('platform-pc')!.bootTimes();
    expect(t).toHaveLength(1);
    expect(t[0]!.value).toBe(1);
    expect(t[0]!.ms).toBeGreaterThan(0);
    expect(t[0]!.ms).toBeLessThan(performance.now());
  });

  it('saves irqchip (3 chips), PIT, clock and CMOS of a paused VM and restores them into a second VM', async () => {
    const spin = [0xeb, 0xfe]; // jmp $
    // m1 programs PIT channel 0 (mode 2, count 0x1234), marks the boot timer, spins; m2 leaves the PIT alone.
    const m1 = machine('pc-state-1', [0xb0, 0x34, 0xe6, 0x43, 0xb0, 0x34, 0xe6, 0x40, 0xb0, 0x12, 0xe6, 0x40, 0xe6, 0xf5, ...spin]);
    const pitCh0 = (pit: Uint8Array) => ({ count: pit[0]! | (pit[1]! << 8), mode: pit[13] });
    await m1.start();
    const api1 = m1.api.use<PlatformPcApi>('platform-pc')!;
    for (let i = 0; i < 300 && api1.bootTimes().length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(api1.bootTimes()).toHaveLength(1);
    await m1.pause();
    m1.api.use<PlatformPcApi>('platform-pc')!.cmos!.writeReg(0x40, 0x77);
    const sections = await m1.saveState();
    const s = sections.get('platform-pc')!;
    expect(s.version).toBe(1);
    const d = s.data as PlatformPcState;
    expect(d.irqchip).toHaveLength(3);
    expect(d.irqchip!.every((c) => c.byteLength === 512)).toBe(true);
    expect(d.pit?.byteLength).toBe(112);
    expect(typeof d.clock).toBe('bigint');
    expect(pitCh0(d.pit!)).toEqual({ count: 0x1234, mode: 2 });
    await m1.stop();

    const m2 = machine('pc-state-2', spin);
    await m2.start();
    await m2.pause();
    const cmos2 = m2.api.use<PlatformPcApi>('platform-pc')!.cmos!;
    expect(cmos2.readReg(0x40)).toBe(0);
    const before = (await m2.saveState()).get('platform-pc')!.data as PlatformPcState;
    expect(pitCh0(before.pit!).count).not.toBe(0x1234);
    await m2.restoreState(sections);
    expect(cmos2.readReg(0x40)).toBe(0x77);
    const back = (await m2.saveState()).get('platform-pc')!.data as PlatformPcState;
    // PIT channels read back as restored (struct kvm_pit_channel_state: 16 bytes of state, then the
    // host-relative count_load_time that KVM rebases, so it is left out).
    for (let c = 0; c < 3; c++) expect(back.pit!.subarray(c * 24, c * 24 + 16)).toEqual(d.pit!.subarray(c * 24, c * 24 + 16));
    expect(back.clock).toBeGreaterThanOrEqual(d.clock);
    await m2.resume();
    await m2.stop();
    expect(m2.state).toBe('stopped');
  });
});
