#!/usr/bin/env node
// Snapshot / restore / live-migration benchmark (one run each). Writes bench/results/snapshot.json.
//   node bench/snapshot.mjs [--sizes 256,1024] [--skip-migrate] [--qemu]
// Guests: the ring-3 workload of plugins/snapshot/fixtures/workload.mjs (boot-flat). "dense" = every RAM page
// past the workload area filled by the host with non-zero bytes before the snapshot (worst case: nothing is a
// hole); "idle" = untouched RAM (zero pages become holes in the sparse memory file / are skipped in migration).
// Restores and migration destinations run in separate processes (plugins/*/fixtures). The page cache is warm.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import snapshotPlugin, { snapshot } from '@kvmkit/plugin-snapshot';
import migratePrecopy, { migrate } from '@kvmkit/plugin-migrate-precopy';
import { workloadImage, exitPort, AREA_GPA } from '../plugins/snapshot/fixtures/workload.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({ options: { sizes: { type: 'string', default: '256,1024' }, 'skip-migrate': { type: 'boolean', default: false }, qemu: { type: 'boolean', default: false } } });
const sizes = values.sizes.split(',').map(Number);
const log = silentLogger();
const dir = mkdtempSync(join(tmpdir(), 'kvmkit-bench-snap-'));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const r1 = (x) => Math.round(x * 10) / 10;
const AREA = 64 * 1024; // small write set: 16 pages + the progress page

function child(script, args, onLine) {
  return new Promise((res, rej) => {
    const p = spawn(process.execPath, [script, JSON.stringify(args)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let last; let buf = '';
    p.stdout.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) { last = JSON.parse(buf.slice(0, i)); buf = buf.slice(i + 1); onLine?.(last); }
    });
    p.on('error', rej);
    p.on('close', () => res(last));
  });
}
const SNAP_CHILD = join(here, '../plugins/snapshot/fixtures/child.mjs');
const DEST = join(here, '../plugins/migrate-precopy/fixtures/dest.mjs');

async function machine(memory, { image = workloadImage({ areaBytes: AREA }), dense = true } = {}) {
  const m = new Machine({ config: { name: `b${memory}`, memory, cpus: 1 }, plugins: [exitPort(), snapshotPlugin(), migratePrecopy(), bootFlat({ image, ring: 3, arg: 2 ** 40 })], log });
  await m.start();
  await sleep(50);
  if (dense) {
    await m.pause();
    const r = m.memory.regions[0];
    const from = AREA_GPA + (4 << 20);
    for (let off = from; off < r.size; off += 4096) r.bytes.fill((off >>> 12) & 0xff | 1, off, off + 4096);
    await m.resume();
  }
  return m;
}

const results = { host: { cpus: 2, note: 'shared, loaded development VM (nested PVM); one run each' }, snapshot: [], migration: [] };

for (const size of sizes) {
  for (const dense of size === Math.max(...sizes) ? [true, false] : [true]) {
    const m = await machine(size, { dense });
    const path = join(dir, `s${size}${dense ? 'd' : 'i'}.snap`);
    const full = await snapshot(m, { path, progress: false });
    await sleep(100); // the guest writes its 64 KiB area
    const diff = await snapshot(m, { strategy: 'diff', path: join(dir, `s${size}${dense ? 'd' : 'i'}.1.snap`), then: 'stop', progress: false });
    await m.waitForStop();
    const fileBytes = statSync(full.memoryPath).blocks * 512;
    const row = {
      memoryMiB: size, memory: dense ? 'dense' : 'idle',
      save: { ms: r1(full.ms), pausedMs: r1(full.pausedMs), memoryBytes: full.memoryBytes, diskBytes: fileBytes },
      diff: { ms: r1(diff.ms), pages: diff.pages, memoryBytes: diff.memoryBytes },
    };
    for (const [name, mode, verify] of [['eager', 'eager', false], ['lazy', 'lazy', false], ['lazyVerified', 'lazy', true]]) {
      const r = await child(SNAP_CHILD, { op: 'restore', path, mode, verify, memory: size, areaBytes: AREA, runMs: 50 });
      if (r.error) throw new Error(`${mode} restore: ${r.error.code} ${r.error.message}`);
      const p = r.info.phases;
      // pluginMs: the restore plugin's own work (load+check files, memory, state, dirty tracking); startMs: whole Machine start.
      row[name] = { pluginMs: r1(p.load + p.memory + p.state + p.track), phases: Object.fromEntries(Object.entries(p).map(([k, v]) => [k, r1(v)])), startMs: r1(r.restoreMs), bytesRead: r.info.bytesRead, verified: r.info.verified, guestOk: r.verify.ok };
    }
    console.log(JSON.stringify(row));
    results.snapshot.push(row);
  }
}

if (!values['skip-migrate']) {
  for (const [kind, image] of [['idle', new Uint8Array([0xeb, 0xfe])], ['busy', workloadImage({ areaBytes: 4 << 20, delay: 50 })]]) {
    const size = 256;
    const m = await machine(size, { image });
    const sock = join(dir, `m-${kind}.sock`);
    let ready;
    const listening = new Promise((r) => (ready = r));
    const dest = child(DEST, { listen: sock, memory: size, runMs: 50, ...(kind === 'busy' ? { areaBytes: 4 << 20 } : {}) }, (o) => o.listening && ready());
    await listening;
    const rep = await migrate(m, { to: sock });
    const d = await dest;
    if (d.error) throw new Error(`destination: ${d.error.code} ${d.error.message}`);
    const row = { memoryMiB: size, guest: kind, totalMs: r1(rep.totalMs), downtimeMs: r1(rep.downtimeMs), rounds: rep.rounds, pagesSent: rep.pagesSent, zeroSkipped: rep.zeroSkipped, finalPages: rep.finalPages, bytesSent: rep.bytesSent, rateMBs: r1(rep.rateMBs), phases: Object.fromEntries(Object.entries(rep.phases).map(([k, v]) => [k, r1(v)])), destGuestOk: d.verify ? d.verify.ok : null };
    console.log(JSON.stringify(row));
    results.migration.push(row);
  }
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/snapshot.json'), JSON.stringify(results, null, 2));
console.log('written bench/results/snapshot.json');
process.exit(0);
