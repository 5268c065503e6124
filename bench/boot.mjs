#!/usr/bin/env node
// Boot and probe-exit benchmark (issue 3): kvmkit vs QEMU microvm vs the C floor (bench/cfloor), in ONE run,
// alternating the VMMs round by round, median of R rounds. Prints a table (absolute numbers + ratios) and
// writes bench/results/boot.json.
//   node bench/boot.mjs [--rounds R] [--iters N] [--linux] [--linux-rounds L] [--linux-timeout S] [--skip-start] [--skip-exits]
//
// 1. start: VMM process spawn → first byte on stdout (the probe guest's first serial byte) and → process exit,
//    probe.test=hello. kvmkit = `kvmkit run` (packages/cli/dist/bin.js, flag-only mode, default plugins
//    serial + platform-pc); QEMU = microvm with the PVH ELF as -kernel; cfloor = `cfloor pvh`.
// 2. exits: probe.test=pio / mmio, ring 3 and ring 0, cycles per exit as the probe measures them (rdtsc around
//    its loop), converted to µs with the TSC frequency the probe reports (tsc_khz). kvmkit gets the counter
//    example plugin (kvmkit-plugin-example-counter: port 0xe0 + the 4 KiB MMIO window at 0xd0000000), with its
//    vCPU-thread fast path (default) and without it (every access answered on the main thread).
// 3. --linux: spawn → `Run /init as init process` (and → first serial byte), same vmlinux + spin.cpio +
//    cmdline on kvmkit (--plugin host-pvm) and QEMU microvm; QEMU gets the exact cmdline kvmkit logged. Each
//    boot's serial output, each line stamped with its arrival time (s since spawn), goes to
//    bench/results/boot-linux-<vmm>-<round>.log; a boot is killed after S s (default 900).
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { cfloorPath, decodeQemuExit, findExecutable, findGuestKernel, parseProbeOutput, probeElfPath, qemuProbeArgs } from '@kvmkit/testkit';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    iters: { type: 'string', default: '10000' },
    linux: { type: 'boolean', default: false },
    'linux-rounds': { type: 'string', default: '1' },
    'linux-timeout': { type: 'string', default: '900' },
    'skip-start': { type: 'boolean', default: false },
    'skip-exits': { type: 'boolean', default: false },
    // A prebuilt probe ELF instead of `make -C test/guests/probe` (e.g. while the probe sources are being edited).
    probe: { type: 'string' },
    // Another build's packages/cli/dist/bin.js (e.g. a `git archive` of an older commit, built): timed in part 1 as
    // "kvmkit (baseline)" in the same rotation, run from that checkout's root so its own plugins resolve.
    'baseline-cli': { type: 'string' },
  },
});
const R = Number(values.rounds);
const ITERS = Number(values.iters);
const LR = Number(values['linux-rounds']);
if (!(R >= 1 && ITERS >= 1 && LR >= 1)) throw new Error('--rounds, --iters and --linux-rounds must be positive integers');

// ---- prerequisites -------------------------------------------------------------------------------------------
const cliBin = join(root, 'packages/cli/dist/bin.js');
for (const f of [cliBin, join(root, 'examples/custom-plugin/dist/index.js'), join(root, 'plugins/boot-linux/dist/index.js'), join(root, 'plugins/host-pvm/dist/index.js')]) {
  if (!existsSync(f)) throw new Error(`${f} is missing: build first (npx tsc -b packages/cli examples/custom-plugin plugins/host-pvm)`);
}
const qemu = findExecutable('qemu-system-x86_64');
if (!qemu) throw new Error('qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)');
const elf = values.probe ?? probeElfPath(); // make -C test/guests/probe
if (!existsSync(elf)) throw new Error(`--probe ${elf}: no such file`);
const baselineCli = values['baseline-cli'];
if (baselineCli !== undefined && !existsSync(baselineCli)) throw new Error(`--baseline-cli ${baselineCli}: no such file`);
const cfloor = cfloorPath(); // make -C bench/cfloor

const loadSamples = [];
const load = (where) => {
  const [l1, l5, l15] = loadavg();
  const s = { where, at: new Date().toISOString(), load1: +l1.toFixed(2), load5: +l5.toFixed(2), load15: +l15.toFixed(2) };
  loadSamples.push(s);
  return s;
};
const fmtLoad = (s) => `load average ${s.load1} ${s.load5} ${s.load15}`;

// ---- one timed process ---------------------------------------------------------------------------------------
/**
 * Spawns cmd and times, from just before spawn(): the first stdout byte, the first stdout match of `until`
 * (then the process is sent SIGTERM, SIGKILL 5 s later), and the process exit.
 */
function timed(cmd, args, { until, timeoutMs = 60_000, cwd = root } = {}) {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    let tFirst, tMatch, killTimer, cpuAtMatch, cpuAtTimeout;
    let timedOut = false;
    const epoch = Date.now();
    const t0 = performance.now();
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const timer = setTimeout(() => {
      timedOut = true;
      cpuAtTimeout = cpuSeconds(child.pid);
      child.kill('SIGKILL');
    }, timeoutMs);
    let stamped = ''; // stdout with the arrival time (s since spawn) in front of each line
    let atLineStart = true;
    child.stdout.setEncoding('latin1').on('data', (d) => {
      const t = performance.now() - t0;
      tFirst ??= t;
      stdout += d;
      for (const part of d.split(/(?<=\n)/)) {
        if (atLineStart) stamped += `[${(t / 1000).toFixed(3).padStart(8)}] `;
        stamped += part;
        atLineStart = part.endsWith('\n');
      }
      if (until && tMatch === undefined && until.test(stdout)) {
        tMatch = t;
        cpuAtMatch = cpuSeconds(child.pid);
        child.kill('SIGTERM');
        killTimer = setTimeout(() => child.kill('SIGKILL'), 5000);
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      const tExit = performance.now() - t0;
      clearTimeout(timer);
      clearTimeout(killTimer);
      // Let the pipes drain before resolving.
      let open = 2;
      const done = () => --open === 0 && resolve({ code, signal, tFirst, tMatch, tExit, epoch, stdout, stamped, stderr, cpuAtMatch, cpuAtTimeout, timedOut });
      if (child.stdout.readableEnded) done(); else child.stdout.on('end', done);
      if (child.stderr.readableEnded) done(); else child.stderr.on('end', done);
    });
  });
}

/** CPU time (user + system, all threads) a live process has used so far, in seconds; undefined if unreadable. */
function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
    return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
  } catch {
    return undefined;
  }
}

/** Arrival time (s since spawn) of the first line matching each milestone, from timed()'s stamped output. */
function milestones(stamped, marks) {
  const out = {};
  for (const line of stamped.split(/\r?\n/)) {
    const m = /^\[\s*([\d.]+)\] (.*)$/.exec(line.replace(/\r/g, ''));
    if (!m) continue;
    for (const [name, re] of marks) if (out[name] === undefined && re.test(m[2])) out[name] = Number(m[1]);
  }
  return out;
}

/** pino JSON lines on kvmkit's stderr. */
function pinoLines(stderr) {
  return stderr.split('\n').flatMap((l) => {
    if (!l.startsWith('{')) return [];
    try { return [JSON.parse(l)]; } catch { return []; }
  });
}

const median = (xs) => {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const rotate = (xs, k) => xs.map((_, i) => xs[(i + k) % xs.length]);
const f1 = (x, w = 8) => (Number.isFinite(x) ? x.toFixed(1) : '—').padStart(w);
const f2 = (x, w = 8) => (Number.isFinite(x) ? x.toFixed(2) : '—').padStart(w);
const ratio = (a, b) => (Number.isFinite(a) && Number.isFinite(b) && b > 0 ? `${(a / b).toFixed(2)}x` : '—');

const kvmkitProbeArgs = (cmdline, extra = []) => [cliBin, 'run', '--kernel', elf, '--cmdline', cmdline, '--memory', '64', ...extra];
const qemuArgs = (cmdline) => qemuProbeArgs(elf, cmdline, 1, 64);
const cfloorArgs = (cmdline) => ['pvh', elf, '--cmdline', cmdline, '--mem', '64'];

const results = { date: new Date().toISOString(), rounds: R, iters: ITERS, commands: {}, load: loadSamples };
const printed = [];
const say = (s = '') => {
  console.log(s);
  printed.push(s);
};
say(`kvmkit boot/exit benchmark, ${new Date().toISOString()}, ${R} rounds (median), VMM order rotated each round; ${fmtLoad(load('begin'))}`);
say(`qemu: ${qemu}; node ${process.version}; probe ${elf}`);

// ---- 1. process start → first serial byte -------------------------------------------------------------------
if (!values['skip-start']) {
  const cmd = 'probe.test=hello';
  const vmms = {
    kvmkit: [process.execPath, kvmkitProbeArgs(cmd)],
    ...(baselineCli !== undefined ? { 'kvmkit (baseline)': [process.execPath, [baselineCli, ...kvmkitProbeArgs(cmd).slice(1)]] } : {}),
    qemu: [qemu, qemuArgs(cmd)],
    cfloor: [cfloor, cfloorArgs(cmd)],
    // Node's own floor: the first byte a one-line script writes (what any Node-based VMM pays before its first line).
    'node (one-line script)': [process.execPath, ['-e', 'process.stdout.write("x")']],
  };
  // The baseline runs from its own checkout's root (bin.js is <root>/packages/cli/dist/bin.js).
  const cwdOf = (name) => (name === 'kvmkit (baseline)' ? join(dirname(baselineCli), '../../..') : root);
  results.commands.start = Object.fromEntries(Object.entries(vmms).map(([k, [c, a]]) => [k, [c, ...a].join(' ')]));
  const samples = Object.fromEntries(Object.keys(vmms).map((k) => [k, { first: [], exit: [], firstLog: [], loaded: [], running: [] }]));
  const l0 = load('start: before');
  for (let r = 0; r < R; r++) {
    for (const name of rotate(Object.keys(vmms), r % Object.keys(vmms).length)) {
      const [c, a] = vmms[name];
      const res = await timed(c, a, { timeoutMs: 30_000, cwd: cwdOf(name) });
      const s = samples[name];
      if (name.startsWith('node')) {
        s.first.push(res.tFirst);
        s.exit.push(res.tExit);
        continue;
      }
      const p = parseProbeOutput(res.stdout);
      const okExit = name === 'qemu' ? decodeQemuExit(res.code) === 0 : res.code === 0;
      if (!okExit || p.done?.status !== 0 || p.lines[0]?.test !== 'hello') {
        throw new Error(`start ${name}: exit ${res.code ?? res.signal}, output ${JSON.stringify(res.stdout.slice(0, 300))} ${res.stderr.slice(-500)}`);
      }
      s.first.push(res.tFirst);
      s.exit.push(res.tExit);
      if (name === 'kvmkit') {
        const lines = pinoLines(res.stderr);
        const at = (msg) => lines.find((l) => l.msg === msg)?.time;
        if (lines[0]?.time !== undefined) s.firstLog.push(lines[0].time - res.epoch);
        const loaded = at('linux kernel loaded');
        const running = at('VM running');
        if (loaded !== undefined) s.loaded.push(loaded - res.epoch);
        if (running !== undefined) s.running.push(running - res.epoch);
      }
    }
  }
  const l1 = load('start: after');
  const med = Object.fromEntries(Object.entries(samples).map(([k, s]) => [k, { firstMs: median(s.first), exitMs: median(s.exit), samples: s }]));
  results.start = med;
  say();
  say(`1. process start → first serial byte of the probe guest (probe.test=hello), ms, median of ${R}   [${fmtLoad(l0)} → ${l1.load1}]`);
  say(`   ${'VMM'.padEnd(20)} ${'first byte'.padStart(10)} ${'exit'.padStart(8)}   kvmkit/this (first, exit)`);
  for (const [k, m] of Object.entries(med)) {
    say(`   ${k.padEnd(20)} ${f1(m.firstMs, 10)} ${f1(m.exitMs)}   ${k === 'kvmkit' ? '' : `${ratio(med.kvmkit.firstMs, m.firstMs)}, ${ratio(med.kvmkit.exitMs, m.exitMs)}`}`);
  }
  const k = samples.kvmkit;
  say(`   kvmkit phases (pino log times, ms resolution): first log line (node up, CLI + plugins imported) ${f1(median(k.firstLog), 0)} ms,` +
    ` "linux kernel loaded" ${f1(median(k.loaded), 0)} ms, "VM running" (vCPU workers up) ${f1(median(k.running), 0)} ms, first byte ${f1(med.kvmkit.firstMs, 0)} ms`);
  med.kvmkit.phases = { firstLogMs: median(k.firstLog), kernelLoadedMs: median(k.loaded), vmRunningMs: median(k.running) };
}

// ---- 2. exit round trip ------------------------------------------------------------------------------------
if (!values['skip-exits']) {
  const vmms = {
    cfloor: (cmd) => [cfloor, cfloorArgs(cmd)],
    qemu: (cmd) => [qemu, qemuArgs(cmd)],
    'kvmkit (fast path)': (cmd) => [process.execPath, kvmkitProbeArgs(cmd, ['--plugin', 'kvmkit-plugin-example-counter'])],
    'kvmkit (main thread)': (cmd) => [process.execPath, kvmkitProbeArgs(cmd, ['--plugin', 'kvmkit-plugin-example-counter:{"fastPath":false}'])],
  };
  const names = Object.keys(vmms);
  results.commands.exits = Object.fromEntries(names.map((k) => [k, vmms[k]('probe.test=pio probe.iters=N probe.ring=R').flat().join(' ')]));
  const cases = [['pio', 3], ['mmio', 3], ['pio', 0], ['mmio', 0]];
  const samples = {};
  for (const [t, ring] of cases) for (const n of names) samples[`${t} ring${ring}|${n}`] = [];
  const l0 = load('exits: before');
  for (let r = 0; r < R; r++) {
    for (const [t, ring] of cases) {
      const cmd = `probe.test=${t} probe.iters=${ITERS} probe.ring=${ring}`;
      for (const name of rotate(names, r % names.length)) {
        const [c, a] = vmms[name](cmd);
        const res = await timed(c, a, { timeoutMs: 120_000 });
        const p = parseProbeOutput(res.stdout);
        const line = p.lines.find((l) => l.test === t);
        const okExit = name === 'qemu' ? decodeQemuExit(res.code) === 0 : res.code === 0;
        if (!okExit || p.done?.status !== 0 || !line) {
          throw new Error(`${t} ring ${ring} on ${name}: exit ${res.code ?? res.signal}, output ${JSON.stringify(res.stdout.slice(0, 300))} ${res.stderr.slice(-500)}`);
        }
        const f = line.fields;
        if (Number(f.ring) !== ring) throw new Error(`${t} on ${name}: asked for ring ${ring}, the probe ran in ring ${f.ring} (${line.raw})`);
        if (Number(f.iters) !== ITERS) throw new Error(`${t} on ${name}: iters ${f.iters} != ${ITERS}`);
        const tscKhz = Number(f.tsc_khz);
        const cyclesPerExit = Number(f.cycles) / ITERS;
        if (name.startsWith('kvmkit')) {
          const count = pinoLines(res.stderr).find((l) => l.msg === 'counter at stop')?.count;
          if (count !== ITERS) throw new Error(`${t} on ${name}: the counter device saw ${count} accesses, expected ${ITERS}`);
        }
        samples[`${t} ring${ring}|${name}`].push({ cyclesPerExit, tscKhz, usPerExit: tscKhz > 0 ? (cyclesPerExit * 1000) / tscKhz : NaN, tscSrc: f.tsc_src });
      }
    }
  }
  const l1 = load('exits: after');
  say();
  say(`2. exit round trip from the probe guest (${ITERS} exits per run; µs/exit = cycles/exit ÷ the probe's tsc_khz), median of ${R}   [${fmtLoad(l0)} → ${l1.load1}]`);
  say(`   ${'case'.padEnd(11)} ${'cfloor'.padStart(8)} ${'QEMU'.padStart(8)} ${'kvmkit'.padStart(8)} ${'kvmkit/main'.padStart(11)}   kvmkit/QEMU  kvmkit/cfloor  QEMU/cfloor  kvmkit-main/QEMU`);
  results.exits = {};
  for (const [t, ring] of cases) {
    const key = `${t} ring${ring}`;
    const m = Object.fromEntries(names.map((n) => [n, median(samples[`${key}|${n}`].map((s) => s.usPerExit))]));
    const cyc = Object.fromEntries(names.map((n) => [n, median(samples[`${key}|${n}`].map((s) => s.cyclesPerExit))]));
    results.exits[key] = { usPerExit: m, cyclesPerExit: cyc, samples: Object.fromEntries(names.map((n) => [n, samples[`${key}|${n}`]])) };
    const k = m['kvmkit (fast path)'];
    const km = m['kvmkit (main thread)'];
    say(`   ${key.padEnd(11)} ${f2(m.cfloor)} ${f2(m.qemu)} ${f2(k)} ${f2(km, 11)}   ${ratio(k, m.qemu).padStart(11)}  ${ratio(k, m.cfloor).padStart(13)}  ${ratio(m.qemu, m.cfloor).padStart(11)}  ${ratio(km, m.qemu).padStart(16)}`);
  }
  const tsc = [...new Set(Object.values(samples).flat().map((s) => `${s.tscKhz} kHz (${s.tscSrc})`))];
  say(`   (µs per exit; TSC as reported by the probe: ${tsc.join(', ')})`);
}

// ---- 3. Linux: process start → Run /init --------------------------------------------------------------------
if (values.linux) {
  const gk = findGuestKernel();
  if (!gk?.vmlinux || !gk.initrd) throw new Error('--linux: no guest kernel (vmlinux + spin.cpio) found; see @kvmkit/testkit findGuestKernel');
  const userCmdline = 'panic=-1';
  const INIT_RE = /Run \/init as init process/;
  const kvmkitArgs = [cliBin, 'run', '--kernel', gk.vmlinux, '--initrd', gk.initrd, '--cmdline', userCmdline, '--memory', '256', '--cpus', '1', '--plugin', 'host-pvm'];
  let cmdline; // filled from kvmkit's "linux kernel loaded" log line: the complete cmdline the guest gets
  const qemuArgsLinux = () => ['-M', 'microvm,acpi=off,rtc=off', '-enable-kvm', '-cpu', 'host,-arch-capabilities', '-smp', '1', '-m', '256', '-nographic', '-no-reboot',
    '-kernel', gk.vmlinux, '-initrd', gk.initrd, '-append', cmdline];
  const MARKS = [
    ['smp: Brought up', /smp: Brought up/], ['devtmpfs', /devtmpfs: initialized/], ['clocksource switch', /clocksource: Switched to clocksource/],
    ['Unpacking initramfs', /Unpacking initramfs/], ['io scheduler', /io scheduler mq-deadline/], ['Run /init', INIT_RE],
  ];
  const samples = { kvmkit: { first: [], init: [], cpu: [], marks: [] }, qemu: { first: [], init: [], cpu: [], marks: [] } };
  const errors = [];
  const l0 = load('linux: before');
  for (let r = 0; r < LR; r++) {
    for (const name of r % 2 === 0 ? ['kvmkit', 'qemu'] : ['qemu', 'kvmkit']) {
      const [c, a] = name === 'kvmkit' ? [process.execPath, kvmkitArgs] : [qemu, qemuArgsLinux()];
      const res = await timed(c, a, { until: INIT_RE, timeoutMs: Number(values['linux-timeout']) * 1000 });
      mkdirSync(join(here, 'results'), { recursive: true });
      writeFileSync(join(here, `results/boot-linux-${name}-${r}.log`), `${res.stamped}\n--- stderr ---\n${res.stderr}`);
      if (name === 'kvmkit') {
        const got = pinoLines(res.stderr).find((l) => l.msg === 'linux kernel loaded')?.cmdline;
        if (!got) throw new Error(`linux on kvmkit: no "linux kernel loaded" log line: ${res.stderr.slice(-800)}`);
        if (cmdline !== undefined && got !== cmdline) throw new Error(`kvmkit's cmdline changed between rounds: ${got}`);
        cmdline = got;
      }
      if (res.tMatch === undefined) {
        // Recorded, not fatal: the other VMM's boot is still worth measuring.
        const lastLine = res.stdout.trim().split(/\r?\n/).at(-1) ?? '';
        const cpu = res.cpuAtTimeout !== undefined ? `, ${res.cpuAtTimeout.toFixed(0)} s CPU` : '';
        const err = `${name} round ${r}: no "Run /init" line after ${(res.tExit / 1000).toFixed(0)} s (exit ${res.code ?? res.signal}${res.timedOut ? `, killed at the timeout${cpu}` : ''}); last serial line: ${JSON.stringify(lastLine)}`;
        errors.push(err);
        console.error(`linux: ${err}`);
      }
      samples[name].first.push(res.tFirst);
      samples[name].init.push(res.tMatch ?? NaN);
      samples[name].cpu.push(res.cpuAtMatch ?? NaN);
      samples[name].marks.push(milestones(res.stamped, MARKS));
    }
  }
  const l1 = load('linux: after');
  const med = Object.fromEntries(Object.entries(samples).map(([k, s]) => [k, {
    firstByteMs: median(s.first), runInitMs: median(s.init), cpuAtRunInitS: median(s.cpu),
    milestonesS: Object.fromEntries(MARKS.map(([n]) => [n, median(s.marks.map((x) => x[n]))])), samples: s,
  }]));
  results.linux = { kernel: gk.vmlinux, initrd: gk.initrd, kvmkitCmdlineLogged: cmdline, qemuAppend: cmdline, rounds: LR, errors, ...med };
  results.commands.linux = { kvmkit: [process.execPath, ...kvmkitArgs].join(' '), qemu: [qemu, ...qemuArgsLinux()].map((x) => (/\s/.test(x) ? `'${x}'` : x)).join(' ') };
  say();
  say(`3. Linux: process start → "Run /init as init process" (${gk.vmlinux}, ${gk.initrd}, 1 vCPU, 256 MiB), s, median of ${LR}   [${fmtLoad(l0)} → ${l1.load1}]`);
  say(`   kvmkit cmdline (logged by boot-linux): ${cmdline}`);
  say(`   QEMU -append:                          ${cmdline}`);
  say(`   ${'VMM'.padEnd(8)} ${'first serial byte'.padStart(18)} ${'Run /init'.padStart(10)} ${'CPU s at Run /init'.padStart(19)}`);
  for (const [k, m] of Object.entries(med)) say(`   ${k.padEnd(8)} ${f2(m.firstByteMs / 1000, 18)} ${f2(m.runInitMs / 1000, 10)} ${f1(m.cpuAtRunInitS, 19)}`);
  say(`   kvmkit/QEMU: first byte ${ratio(med.kvmkit.firstByteMs, med.qemu.firstByteMs)}, Run /init ${ratio(med.kvmkit.runInitMs, med.qemu.runInitMs)}, CPU ${ratio(med.kvmkit.cpuAtRunInitS, med.qemu.cpuAtRunInitS)}`);
  say(`   serial milestones, s since spawn (kvmkit / QEMU / ratio):`);
  for (const [n] of MARKS) {
    const a = med.kvmkit.milestonesS[n];
    const b = med.qemu.milestonesS[n];
    say(`     ${n.padEnd(20)} ${f1(a)} / ${f1(b)}  ${ratio(a, b)}`);
  }
  for (const e of errors) say(`   FAILED: ${e}`);
}

say();
say(`end: ${fmtLoad(load('end'))}`);
results.printed = printed;
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/boot.json'), JSON.stringify(results, null, 2));
console.log('wrote bench/results/boot.json');
