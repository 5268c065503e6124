#!/usr/bin/env node
// Dev tool: boots the probe guest on kvmkit (kernel + plugin-boot-linux PVH + plugin-serial) with a
// tiny inline plugin for the debug-exit port 0xf4, the counter port 0xe0 and the MMIO page at
// 0xd0000000 (the same devices cfloor has). Needs the packages built: npx tsc -b plugins/boot-linux plugins/serial
//   node test/guests/probe/run-kvmkit.mjs <test> ["probe.iters=N probe.ring=0"] [cpus]
// Exits with the guest's status (or 124 on a 60 s timeout).
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const { Machine, silentLogger } = await import(join(root, 'packages/kernel/dist/index.js'));
const { default: bootLinux } = await import(join(root, 'plugins/boot-linux/dist/index.js'));
const { default: serial } = await import(join(root, 'plugins/serial/dist/index.js'));

const [test = 'hello', extra = '', cpus = '1'] = process.argv.slice(2);
let counter = 0;
const probeDevices = () => ({
  name: 'probe-devices', version: '0.1.0', kernel: '^0.1.0', options: {},
  apply(machine) {
    machine.hooks.vmCreated.tapPromise('probe-devices', async (vm) => {
      try { vm.createIrqchip(); } catch (e) { console.error(`createIrqchip: ${e.message} (another plugin made one?)`); } // LAPIC timer, SMP
    });
    machine.hooks.devices.tapPromise('probe-devices', async (reg) => {
      reg.addPio(0xf4, 1, { read() {}, write(_o, d) { machine.requestStop({ reason: 'guest-exit', exitCode: d[0] }); } }, 'debug-exit');
      reg.addPio(0xe0, 4, { read(_o, d) { d.set(new Uint8Array(new Uint32Array([counter]).buffer).subarray(0, d.length)); }, write() { counter++; } }, 'counter');
      reg.addMmio(0xd0000000, 0x1000, { read(_o, d) { d.fill(0); }, write() { counter++; } }, 'mmio-counter');
    });
  },
});

const m = new Machine({
  config: { name: 'probe', memory: 64, cpus: Number(cpus), cmdline: `probe.test=${test} ${extra}`.trim() },
  plugins: [serial({ console: false, output: 'stdout' }), bootLinux({ kernel: join(root, 'test/guests/probe/build/probe.elf') }), probeDevices()],
  log: silentLogger(),
});
const t0 = performance.now();
await m.start();
const r = await Promise.race([m.waitForStop(), new Promise((res) => setTimeout(() => res({ reason: 'timeout', exitCode: 124 }), 60_000))]);
await m.stop();
console.error(`kvmkit stop=${r.reason} exitCode=${r.exitCode} counter=${counter} wall_ms=${Math.round(performance.now() - t0)}`);
process.exit(r.exitCode ?? 0);
