import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { findGuestKernel, requireGuestKernel, guestKernelCandidates, findRepoRoot, GUEST_DIR_ENV } from './guest-kernel.js';

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'kvmkit-gk-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A fake monorepo: tmp/<name>/repo with a workspaces package.json and a nested package. */
function fakeRepo(name: string): { root: string; pkg: string } {
  const root = join(tmp, name, 'repo');
  const pkg = join(root, 'packages', 'x', 'dist');
  mkdirSync(pkg, { recursive: true });
  writeFileSync(join(root, 'package.json'), JSON.stringify({ name: 'r', workspaces: ['packages/*'] }));
  writeFileSync(join(root, 'packages', 'x', 'package.json'), JSON.stringify({ name: 'x' }));
  return { root, pkg };
}

describe('findGuestKernel', () => {
  it('finds the repo root by walking up to the workspaces package.json', () => {
    const { root, pkg } = fakeRepo('a');
    expect(findRepoRoot(pkg)).toBe(root);
  });

  it('prefers KVMKIT_GUEST_DIR, then ../shared/guest, then fallbacks, then guest-kernel/build', () => {
    const { root, pkg } = fakeRepo('b');
    const envDir = join(tmp, 'b', 'envdir');
    const c = guestKernelCandidates({ env: { [GUEST_DIR_ENV]: envDir }, from: pkg, fallbacks: ['/nonexistent/fb'] });
    expect(c).toEqual([envDir, join(tmp, 'b', 'shared', 'guest'), '/nonexistent/fb', join(root, 'guest-kernel', 'build')]);
  });

  it('returns the first directory holding a kernel, with the files it has', () => {
    const { root, pkg } = fakeRepo('c');
    const shared = join(tmp, 'c', 'shared', 'guest');
    mkdirSync(shared, { recursive: true });
    const build = join(root, 'guest-kernel', 'build');
    mkdirSync(build, { recursive: true });
    writeFileSync(join(build, 'bzImage'), 'x');
    const opts = { env: {}, from: pkg, fallbacks: [] };
    // shared/guest exists but is empty: skipped, build output found
    expect(findGuestKernel(opts)).toEqual({ dir: build, bzImage: join(build, 'bzImage') });
    writeFileSync(join(shared, 'vmlinux'), 'x');
    writeFileSync(join(shared, 'spin.cpio'), 'x');
    expect(findGuestKernel(opts)).toEqual({ dir: shared, vmlinux: join(shared, 'vmlinux'), initrd: join(shared, 'spin.cpio') });
    const envDir = join(tmp, 'c', 'env');
    mkdirSync(envDir);
    writeFileSync(join(envDir, 'vmlinux'), 'x');
    expect(findGuestKernel({ ...opts, env: { [GUEST_DIR_ENV]: envDir } })?.dir).toBe(envDir);
  });

  it('requireGuestKernel says how to build one when nothing is found', () => {
    const { pkg } = fakeRepo('d');
    const opts = { env: {}, from: pkg, fallbacks: [] };
    expect(findGuestKernel(opts)).toBeUndefined();
    expect(() => requireGuestKernel(opts)).toThrow(/scripts\/build-guest-kernel\.sh/);
    expect(() => requireGuestKernel(opts)).toThrow(/KVMKIT_GUEST_DIR/);
  });

  const shared = findGuestKernel();
  it.skipIf(!shared)('finds the shared fixtures of this checkout (skipped: no guest kernel on this machine)', () => {
    expect(shared!.vmlinux ?? shared!.bzImage).toMatch(/(vmlinux|bzImage)$/);
  });
});
