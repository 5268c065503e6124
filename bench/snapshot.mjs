#!/usr/bin/env node
// Snapshot / restore / live-migration benchmark (one run each). Writes bench/results/snapshot.json.
//   node bench/snapshot.mjs [--sizes 256,1024] [--skip-migrate] [--qemu]
// Guests: the ring-3 workload of plugins/snapshot/fixtures/workload.mjs (boot-flat). "dense" = every RAM page
// past the workload area filled by the host with non-zero bytes before the snapshot (worst case: nothing is a
// hole); "idle" = untouched RAM (zero pages become holes in the sparse memory file / are skipped in migration).
// Restores and migration destinations run in separate processes (plugins/*/fixtures). Full saves write the
// memory file with O_DIRECT, so the restores right after a save find it outside the page cache (read from disk).
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
const { values } = parseArgs({ options: { sizes: { type: 'string', default: '256,1024' }, 'skip-migrate': { type: 'boolean', default: false }, qemu: { type: 'boolean', default: false }, 'only-qemu': { type: 'boolean', default: false }, 'only-migrate': { type: 'boolean', default: false } } });
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

const results = { host: { cpus: 2, note: 'shared, loaded development VM (nested PVM); one run each' }, snapshot: [], migration: [], qemu: [] };

for (const size of values['only-qemu'] || values['only-migrate'] ? [] : sizes) {
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

if (!values['skip-migrate'] && !values['only-qemu']) {
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

// ---- QEMU comparison (same host): migrate to file (QEMU's savevm path without a qcow2 disk), restore with
// -incoming from that file, and QEMU→QEMU live migration over a unix socket. The QEMU guest idles in SeaBIOS
// (no boot device); "dense" RAM = a non-zero file loaded into guest RAM with -device loader, like the kvmkit rows.
if (values.qemu || values['only-qemu']) {
  const { connect } = await import('node:net');
  const qmp = async (path) => {
    for (let i = 0; i < 200; i++) {
      try {
        const s = await new Promise((res, rej) => { const c = connect(path); c.once('connect', () => res(c)); c.once('error', rej); });
        let buf = ''; const waiters = [];
        s.on('data', (d) => { buf += d; let i; while ((i = buf.indexOf('\n')) >= 0) { const o = JSON.parse(buf.slice(0, i)); buf = buf.slice(i + 1); if (o.return !== undefined || o.error) waiters.shift()?.(o); } });
        const cmd = (execute, args) => new Promise((res) => { waiters.push(res); s.write(JSON.stringify({ execute, ...(args ? { arguments: args } : {}) }) + '\n'); });
        await cmd('qmp_capabilities');
        return { cmd, close: () => s.destroy() };
      } catch { await sleep(25); }
    }
    throw new Error(`no QMP at ${path}`);
  };
  const qemu = (name, size, extra) => {
    const sock = join(dir, `${name}.qmp`);
    const p = spawn('qemu-system-x86_64', ['-accel', 'kvm', '-m', String(size), '-display', 'none', '-nodefaults', '-serial', 'none', '-monitor', 'none', '-qmp', `unix:${sock},server=on,wait=off`, ...extra], { stdio: ['ignore', 'ignore', 'ignore'] });
    return { p, sock };
  };
  const waitMig = async (q) => {
    for (;;) { const r = (await q.cmd('query-migrate')).return; if (r.status === 'completed' || r.status === 'failed') return r; await sleep(5); }
  };
  for (const size of sizes) {
    const fill = join(dir, `fill${size}.bin`);
    const fillBytes = (size - 32) << 20;
    const b = Buffer.alloc(fillBytes); for (let off = 0; off < fillBytes; off += 4096) b.fill((off >>> 12) & 0xff | 1, off, off + 4096);
    writeFileSync(fill, b);
    const loader = ['-device', `loader,file=${fill},addr=0x1000000,force-raw=on`];
    // save to file
    const src = qemu(`s${size}`, size, loader);
    let q = await qmp(src.sock);
    await sleep(300);
    const file = join(dir, `q${size}.mig`);
    await q.cmd('migrate-set-parameters', { 'max-bandwidth': 100 * 1024 * 1024 * 1024 });
    const t0 = performance.now();
    await q.cmd('stop'); // like savevm: not live
    await q.cmd('migrate', { uri: `exec:cat > ${file}` });
    const saved = await waitMig(q);
    const saveMs = performance.now() - t0;
    q.close(); src.p.kill('SIGKILL');
    // restore from file
    const t1 = performance.now();
    const dst = qemu(`r${size}`, size, ['-incoming', `exec:cat ${file}`]);
    q = await qmp(dst.sock);
    const loaded = await waitMig(q);
    const restoreMs = performance.now() - t1;
    q.close(); dst.p.kill('SIGKILL');
    const row = { memoryMiB: size, memory: 'dense', saveToFile: { ms: r1(saveMs), qemuTotalMs: saved['total-time'], downtimeMs: saved.downtime, status: saved.status, fileBytes: statSync(file).size }, restoreFromFile: { ms: r1(restoreMs), status: loaded.status, note: 'includes QEMU process start' } };
    if (size === 256) {
      const a = qemu('ma', size, loader);
      const d = qemu('md', size, ['-incoming', `unix:${join(dir, 'qm.sock')}`]);
      const qa = await qmp(a.sock);
      const qd = await qmp(d.sock);
      await sleep(300);
      await qa.cmd('migrate-set-parameters', { 'max-bandwidth': 100 * 1024 * 1024 * 1024, 'downtime-limit': 50 });
      const t2 = performance.now();
      await qa.cmd('migrate', { uri: `unix:${join(dir, 'qm.sock')}` });
      const m = await waitMig(qa);
      row.liveMigration = { ms: r1(performance.now() - t2), qemuTotalMs: m['total-time'], downtimeMs: m.downtime, status: m.status, ramTransferred: m.ram?.transferred, ramPages: m.ram?.normal, dirtySyncs: m.ram?.['dirty-sync-count'] };
      qa.close(); qd.close(); a.p.kill('SIGKILL'); d.p.kill('SIGKILL');
    }
    console.log(JSON.stringify({ qemu: row }));
    results.qemu.push(row);
  }
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(join(here, 'results'), { recursive: true });
writeFileSync(join(here, 'results/snapshot.json'), JSON.stringify(results, null, 2));
console.log('written bench/results/snapshot.json');
process.exit(0);
