import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  decodeQemuExit,
  findExecutable,
  parseProbeOutput,
  probeCmdline,
  runCfloor,
  runCfloorProbe,
  runQemuProbe,
  cfloorFlatGuestPath,
  netnsUnavailable,
  probeUdpPayload,
  runNetnsUdpSender,
  startNetnsUdpReceiver,
  TestNetns,
} from './probe.js';

describe('parseProbeOutput', () => {
  it('parses test lines, fields, bare words and DONE', () => {
    const text = [
      'qboot noise',
      'PROBE hello vcpus=2',
      'PROBE smp cpu=1 up',
      'PROBE pio ring=3 iters=100 cycles=12345 cycles_per_exit=123 tsc_src=kvmclock',
      'PROBE DONE status=0',
    ].join('\r\n');
    const p = parseProbeOutput(text);
    expect(p.lines.map((l) => l.test)).toEqual(['hello', 'smp', 'pio']);
    expect(p.lines[0]!.fields).toEqual({ vcpus: '2' });
    expect(p.lines[1]!.fields).toEqual({ cpu: '1' });
    expect(p.lines[1]!.words).toEqual(['up']);
    expect(p.lines[2]!.fields['cycles_per_exit']).toBe('123');
    expect(p.lines[2]!.fields['tsc_src']).toBe('kvmclock');
    expect(p.done).toEqual({ status: 0 });
  });

  it('has no done without a DONE line, and keeps the first DONE', () => {
    expect(parseProbeOutput('PROBE hello vcpus=1\n').done).toBeUndefined();
    expect(parseProbeOutput('PROBE DONE status=7\nPROBE DONE status=0\n').done).toEqual({ status: 7 });
    expect(parseProbeOutput('PROBE DONE status=x\n').done).toBeUndefined();
  });

  it('finds PROBE after other text on the line but not inside a word', () => {
    const p = parseProbeOutput('\x1b[0mPROBE exit status=3\nXPROBE bogus a=1\nPROBE FAULT vector=13 rip=0x100\n');
    expect(p.lines.map((l) => l.test)).toEqual(['exit', 'FAULT']);
    expect(p.lines[1]!.fields).toEqual({ vector: '13', rip: '0x100' });
    expect(p.lines[0]!.raw).toBe('PROBE exit status=3');
  });

  it('handles empty input and bare PROBE lines', () => {
    expect(parseProbeOutput('')).toEqual({ lines: [] });
    expect(parseProbeOutput('PROBE \n')).toEqual({ lines: [] });
  });
});

describe('probeCmdline / decodeQemuExit', () => {
  it('builds probe.* tokens and rejects unsafe values', () => {
    expect(probeCmdline('pio', { iters: 1000, ring: 0 })).toBe('probe.test=pio probe.iters=1000 probe.ring=0');
    expect(() => probeCmdline('pio', { iters: '1 x=y' })).toThrow(/not a plain token/);
  });
  it('decodes isa-debug-exit codes', () => {
    expect(decodeQemuExit(1)).toBe(0);
    expect(decodeQemuExit(11)).toBe(5);
    expect(decodeQemuExit(255)).toBe(127);
    expect(decodeQemuExit(0)).toBeNull();
    expect(decodeQemuExit(null)).toBeNull();
  });
});

const kvm = existsSync('/dev/kvm');
const gcc = !!findExecutable('gcc') && !!findExecutable('make');
const qemu = !!findExecutable('qemu-system-x86_64');
const qemuSkip = !qemu ? 'qemu-system-x86_64 not installed' : !kvm ? '/dev/kvm missing' : !gcc ? 'gcc/make missing' : '';
const cfloorSkip = !kvm ? '/dev/kvm missing' : !gcc ? 'gcc/make missing' : '';
if (qemuSkip) console.warn(`probe QEMU tests skipped: ${qemuSkip}`);
if (cfloorSkip) console.warn(`cfloor tests skipped: ${cfloorSkip}`);

describe('probe guest on QEMU microvm', () => {
  it.skipIf(!!qemuSkip)(`boots probe hello${qemuSkip ? ` (SKIPPED: ${qemuSkip})` : ''}`, async () => {
    const r = await runQemuProbe({ test: 'hello', timeoutMs: 60_000 });
    expect(r.probe.lines).toEqual([{ test: 'hello', fields: { vcpus: '1' }, words: [], raw: 'PROBE hello vcpus=1' }]);
    expect(r.probe.done).toEqual({ status: 0 });
    expect(r.exitStatus).toBe(0);
  });
  it.skipIf(!!qemuSkip)(`passes probe.status through the debug-exit port${qemuSkip ? ` (SKIPPED: ${qemuSkip})` : ''}`, async () => {
    const r = await runQemuProbe({ test: 'exit', params: { status: 5 } });
    expect(r.exitStatus).toBe(5);
    expect(r.qemuExitCode).toBe(11);
    expect(r.probe.done).toEqual({ status: 5 });
  });
});

describe('probe guest tests on QEMU microvm', () => {
  it.skipIf(!!qemuSkip)(`mmio from ring 3 and the LAPIC timer${qemuSkip ? ` (SKIPPED: ${qemuSkip})` : ''}`, async () => {
    const mmio = await runQemuProbe({ test: 'mmio', params: { iters: 200 } });
    expect(mmio.exitStatus).toBe(0);
    const line = mmio.probe.lines.find((l) => l.test === 'mmio')!;
    expect(line.fields['ring']).toBe('3');
    expect(line.fields['iters']).toBe('200');
    expect(Number(line.fields['cycles_per_exit'])).toBeGreaterThan(0);
    const tsc = await runQemuProbe({ test: 'tsc', params: { iters: 1000 } });
    expect(tsc.exitStatus).toBe(0);
    expect(Number(tsc.probe.lines.find((l) => l.test === 'tsc')!.fields['cycles_per_exit'])).toBeGreaterThan(0);
    const timer = await runQemuProbe({ test: 'timer', params: { ms: 100 } });
    expect(timer.exitStatus).toBe(0);
    expect(Number(timer.probe.lines.find((l) => l.test === 'timer')!.fields['ticks'])).toBeGreaterThan(0);
  });
  it.skipIf(!!qemuSkip)(`reports an unexpected exception with status 0x7f${qemuSkip ? ` (SKIPPED: ${qemuSkip})` : ''}`, async () => {
    const r = await runQemuProbe({ test: 'fault', params: { ring: 3 } });
    expect(r.exitStatus).toBe(0x7f);
    const f = r.probe.lines.find((l) => l.test === 'FAULT')!;
    expect(f.fields).toMatchObject({ vector: '14', cs: '0x23', cr2: '0x100000000' });
  });
});

describe('cfloor', () => {
  it.skipIf(!!cfloorSkip)(`counts every probe pio exit (ring 3 through the TSS I/O bitmap)${cfloorSkip ? ` (SKIPPED: ${cfloorSkip})` : ''}`, async () => {
    const r = await runCfloorProbe({ test: 'pio', params: { iters: 500 } });
    expect(r.exitCode).toBe(0);
    expect(r.probe.lines.find((l) => l.test === 'pio')!.fields['ring']).toBe('3');
    expect(r.exits).toBeGreaterThanOrEqual(500);
  });
  it.skipIf(!!cfloorSkip)(`runs a flat ring-3 port loop and exits with the counter${cfloorSkip ? ` (SKIPPED: ${cfloorSkip})` : ''}`, async () => {
    const r = await runCfloor(['flat', cfloorFlatGuestPath('count-exit'), '--arg', '42']);
    expect(r.exitCode).toBe(42);
    expect(r.exits).toBe(44); // 42 out + 1 in + 1 exit
    expect(r.wallUs).toBeGreaterThan(0);
  });
  it.skipIf(!!cfloorSkip)(`boots probe smp with 2 vCPUs${cfloorSkip ? ` (SKIPPED: ${cfloorSkip})` : ''}`, async () => {
    const r = await runCfloorProbe({ test: 'smp', cpus: 2 });
    expect(r.exitCode).toBe(0);
    const up = r.probe.lines.filter((l) => l.test === 'smp' && l.words.includes('up')).map((l) => l.fields['cpu']);
    expect(up.sort()).toEqual(['0', '1']);
    expect(r.probe.lines.at(-1)!.fields).toEqual({ cpus: '2', expected: '2' });
    expect(r.probe.done).toEqual({ status: 0 });
  });
});

describe('probe UDP payload and netns helpers', () => {
  it('probeUdpPayload: seq big endian, then (seq + i) & 0xff', () => {
    const b = probeUdpPayload(0x01020304, 8);
    expect([...b]).toEqual([1, 2, 3, 4, (0x01020304 + 4) & 0xff, (0x01020304 + 5) & 0xff, (0x01020304 + 6) & 0xff, (0x01020304 + 7) & 0xff]);
    expect(probeUdpPayload(255, 300)[299]).toBe((255 + 299) & 0xff);
  });

  it.skipIf(!gcc)('runQemuProbe: wrap runs QEMU under a prefix command, onOutput sees stdout as it comes', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmkit-fakeqemu-'));
    try {
      const fake = join(dir, 'qemu');
      writeFileSync(fake, `#!/bin/sh\necho "$@" > ${dir}/args\necho "PROBE hello wrapped=$PROBE_WRAPPED"\necho "PROBE DONE status=3"\nexit 7\n`);
      chmodSync(fake, 0o755);
      let seen = '';
      const r = await runQemuProbe({ test: 'hello', qemu: fake, wrap: ['env', 'PROBE_WRAPPED=yes'], onOutput: (c) => (seen += c) });
      expect(r.probe.lines[0]?.fields).toEqual({ wrapped: 'yes' });
      expect(r.exitStatus).toBe(3);
      expect(seen).toContain('PROBE DONE status=3');
      expect(readFileSync(join(dir, 'args'), 'utf8')).toContain('-append probe.test=hello');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  const why = netnsUnavailable();
  it.skipIf(!!why)(`TestNetns + UDP receiver/sender check seq and pattern inside a namespace${why ? ` (SKIPPED: ${why})` : ''}`, async () => {
    const ns = TestNetns.create('tk');
    try {
      expect(ns.ip('link', 'show', 'lo')).toMatch(/UP/);
      const rx = await startNetnsUdpReceiver(ns, { address: '127.0.0.1', port: 7001, count: 300, size: 100 });
      const sent = await runNetnsUdpSender(ns, { address: '127.0.0.1', port: 7001, count: 300, size: 100, pps: 20_000 });
      await new Promise((r) => setTimeout(r, 100));
      const st = await rx.stop();
      expect(sent).toMatchObject({ sent: 300, errors: 0 });
      expect(st).toMatchObject({ received: 300, bad: 0, dup: 0, bytes: 30_000 });
      // A wrong size counts as bad (the receiver expects 100-byte datagrams).
      const rx2 = await startNetnsUdpReceiver(ns, { address: '127.0.0.1', port: 7002, count: 10, size: 100 });
      await runNetnsUdpSender(ns, { address: '127.0.0.1', port: 7002, count: 10, size: 50, pps: 10_000 });
      await new Promise((r) => setTimeout(r, 100));
      expect(await rx2.stop()).toMatchObject({ received: 0, bad: 10 });
    } finally {
      ns.destroy();
    }
    expect(() => ns.ip('link')).toThrow(/failed/);
  });
});
