#!/usr/bin/env node
// Exit round-trip benchmark: the same ring-3 guest bytes (bench/guests.mjs) on kvmkit and on the C floor
// (bench/cfloor), in one run, alternating, median of R rounds. Prints µs/exit and ratios; writes JSON to
// bench/results/exit-latency.json.
//   node bench/exit-latency.mjs [--iters N] [--rounds R]
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter from 'kvmkit-plugin-example-counter';
import { pioLoop, mmioLoop } from './guests.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({ options: { iters: { type: 'string', default: '100000' }, rounds: { type: 'string', default: '3' } } });
const N = Number(values.iters);
const R = Number(values.rounds);

execFileSync('make', ['-s', '-C', join(here, 'cfloor'), 'build/cfloor'], { stdio: 'inherit' });
const cfloor = join(here, 'cfloor/build/cfloor');
const buildDir = join(here, 'build');
mkdirSync(buildDir, { recursive: true });
const images = { pio: pioLoop(), mmio: mmioLoop() };
for (const [k, v] of Object.entries(images)) writeFileSync(join(buildDir, `${k}.bin`), v);

/** Runs the loop on kvmkit; returns µs per exit, timed from vCPU start to the guest's exit write. */
async function kvmkit(kind, cpus, fastPath, mailboxWake = 'waitAsync') {
  let tEnd = 0;
  const exitDev = {
    name: 'bench-exit', version: '1.0.0',
    apply(m) { m.hooks.devices.tap('bench-exit', (reg) => reg.addPio(0xf4, 1, { read() {}, write: (_o, d) => { tEnd = performance.now(); m.requestStop({ reason: 'guest-exit', exitCode: d[0] }); } }, 'exit')); },
  };
  let tStart = 0;
  const timer = { name: 'bench-timer', version: '1.0.0', apply(m) { m.hooks.vcpuThread.tap('bench-timer', () => { tStart = performance.now(); }); } };
  const m = new Machine({ config: { name: 'bench', memory: 16, cpus }, plugins: [timer, exitDev, counter({ fastPath }), bootFlat({ image: images[kind], ring: 3, arg: N })], log: silentLogger(), mailboxWake });
  await m.start();
  const r = await m.waitForStop();
  const count = m.api.use('counter').value();
  if (r.reason !== 'guest-exit' || count !== N * cpus) throw new Error(`kvmkit ${kind}: ${r.reason} ${r.message ?? ''} count=${count}`);
  return ((tEnd - tStart) * 1000) / (N * cpus);
}

function floor(kind, cpus) {
  const p = spawnSync(cfloor, ['flat', join(buildDir, `${kind}.bin`), '--cpus', String(cpus), '--arg', String(N), '--ring', '3', '--mem', '16'], { encoding: 'utf8' });
  const m = /wall_us=(\d+)/.exec(p.stderr);
  if (p.status !== 0 || !m) throw new Error(`cfloor ${kind}: status ${p.status} ${p.stderr}`);
  return Number(m[1]) / (N * cpus);
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const cases = [
  ['pio', 1], ['mmio', 1], ['pio', 2], ['mmio', 2],
];
const results = [];
console.log(`exit round trip, ring-3 guest loop, ${N} exits per vCPU, median of ${R} rounds (µs per exit; 2 vCPUs: wall / total exits)`);
console.log('case        C floor   kvmkit(vCPU thread)  ratio   kvmkit(main, waitAsync)  ratio   kvmkit(main, eventfd)  ratio');
for (const [kind, cpus] of cases) {
  const f = [], k = [], km = [], ke = [];
  for (let i = 0; i < R; i++) {
    f.push(floor(kind, cpus));
    k.push(await kvmkit(kind, cpus, true));
    km.push(await kvmkit(kind, cpus, false));
    ke.push(await kvmkit(kind, cpus, false, 'eventfd'));
  }
  const row = { case: `${kind} ${cpus}vcpu`, floorUs: median(f), kvmkitUs: median(k), kvmkitMainUs: median(km), kvmkitMainEventfdUs: median(ke) };
  row.ratio = row.kvmkitUs / row.floorUs;
  row.ratioMain = row.kvmkitMainUs / row.floorUs;
  row.ratioMainEventfd = row.kvmkitMainEventfdUs / row.floorUs;
  results.push(row);
  console.log(`${row.case.padEnd(10)} ${row.floorUs.toFixed(2).padStart(8)}   ${row.kvmkitUs.toFixed(2).padStart(18)}  ${row.ratio.toFixed(3).padStart(6)}x  ${row.kvmkitMainUs.toFixed(2).padStart(22)}  ${row.ratioMain.toFixed(3).padStart(6)}x  ${row.kvmkitMainEventfdUs.toFixed(2).padStart(20)}  ${row.ratioMainEventfd.toFixed(3).padStart(6)}x`);
}
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/exit-latency.json'), JSON.stringify({ date: new Date().toISOString(), iters: N, rounds: R, results }, null, 2));
