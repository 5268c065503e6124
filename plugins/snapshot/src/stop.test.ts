import { describe, it, expect } from 'vitest';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, KvmkitError, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import snapshotPlugin, { snapshot, readStateFile } from './index.js';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[plugin-snapshot] /dev/kvm not present: the stop-during-save test is skipped');

describe.skipIf(!hasKvm)('a stop requested while a full save is writing', () => {
  it('waits for the save (afterStop) before guest RAM is released: no crash, the snapshot is complete or a coded error', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmkit-stopsave-'));
    try {
      const m = new Machine({ config: { name: 'stopsave', memory: 128, cpus: 1 }, plugins: [snapshotPlugin(), bootFlat({ image: new Uint8Array([0xeb, 0xfe]), ring: 3 })], log: silentLogger() });
      await m.start();
      await m.pause();
      const r = m.memory!.regions[0]!;
      for (let off = 1 << 20; off < r.size; off += 4096) r.bytes.fill(((off >>> 12) & 0xff) | 1, off, off + 4096);
      let stopAsked = false;
      const path = join(dir, 's.snap');
      const save = snapshot(m, {
        path, then: 'pause', progress: false,
        onProgress: () => {
          if (stopAsked) return;
          stopAsked = true;
          m.requestStop({ reason: 'user', exitCode: 0, message: 'stop during save' }); // runs on a later turn
        },
      }).then((x) => x, (e: unknown) => e);
      const stopped = await m.waitForStop();
      const res = await save;
      expect(stopAsked).toBe(true);
      expect(stopped.reason).toBe('user');
      expect(m.state).toBe('stopped');
      if (res instanceof Error) expect(res).toBeInstanceOf(KvmkitError);
      else expect(readStateFile(path).body.memory.size).toBe(128 << 20);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
