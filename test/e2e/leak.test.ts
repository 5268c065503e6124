import { describe, it, expect } from 'vitest';
import { Machine, silentLogger, type Plugin } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import counter from 'kvmkit-plugin-example-counter';
// @ts-expect-error plain ESM helper without types
import { pioLoop } from '../../bench/guests.mjs';
import { hasKvm, exitPort, fdCount } from './helpers.js';

const log = silentLogger();

/** Touches every page of guest RAM so that a leaked mapping shows in RSS. */
const toucher: Plugin = { name: 'toucher', version: '1.0.0', apply(m) { m.hooks.memoryMapped.tap('toucher', (mem) => { for (const r of mem.regions) r.bytes.fill(1); }); } };

async function cycle(i: number): Promise<void> {
  const m = new Machine({ config: { name: `leak${i}`, memory: 8, cpus: 2 }, plugins: [toucher, exitPort(), counter(), bootFlat({ image: pioLoop(), ring: 3, arg: 50 })], log });
  await m.start();
  const r = await m.waitForStop();
  if (r.reason !== 'guest-exit') throw new Error(`cycle ${i}: ${r.reason} ${r.message}`);
}

describe.skipIf(!hasKvm)('resource release', () => {
  it('100 create/run/stop cycles leave fd count and RSS flat', async () => {
    for (let i = 0; i < 10; i++) await cycle(i); // warm-up: module caches, JIT, worker code cache
    global.gc?.();
    const fd0 = fdCount();
    const rss0 = process.memoryUsage().rss;
    for (let i = 0; i < 100; i++) await cycle(i);
    global.gc?.();
    await new Promise((r) => setTimeout(r, 200));
    const fd1 = fdCount();
    const rss1 = process.memoryUsage().rss;
    expect(fd1).toBeLessThanOrEqual(fd0);
    // Each cycle maps 8 MiB of guest RAM and starts 2 worker isolates; a leak of either would add
    // ≥ 800 MiB over 100 cycles. Allow 64 MiB of allocator noise.
    expect(rss1 - rss0).toBeLessThan(64 * 1024 * 1024);
    console.log(`leak test: fds ${fd0} → ${fd1}, rss ${(rss0 / 2 ** 20).toFixed(1)} → ${(rss1 / 2 ** 20).toFixed(1)} MiB`);
  }, 300_000);
});
