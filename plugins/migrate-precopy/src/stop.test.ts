import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[plugin-migrate-precopy] /dev/kvm not present: the stop-during-migration test is skipped');
const FIXTURE = fileURLToPath(new URL('../fixtures/stop-source.mjs', import.meta.url));

describe.skipIf(!hasKvm)('a source stopped while round 0 is being sent', () => {
  it('fails the migration with KVMKIT_ERR_MIGRATE_STATE instead of reading unmapped RAM (was a SIGSEGV); the destination gives up', () => {
    const p = spawnSync(process.execPath, [FIXTURE], { encoding: 'utf8', timeout: 60_000 });
    expect(p.signal).toBeNull();
    expect(p.status).toBe(0);
    const o = JSON.parse(p.stdout.trim().split('\n').at(-1)!);
    expect(o).toMatchObject({ migrate: 'KVMKIT_ERR_MIGRATE_STATE', dest: 'KVMKIT_ERR_MIGRATE_REFUSED', state: 'stopped', why: 'user' });
  }, 70_000);
});
