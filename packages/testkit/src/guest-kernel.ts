import { existsSync, statSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** A directory with a Linux guest kernel for tests (see README "Guest kernel"). */
export interface GuestKernel {
  dir: string;
  /** ELF vmlinux with a PVH entry note. */
  vmlinux?: string;
  bzImage?: string;
  /** spin.cpio: an initramfs whose /init spins in user mode without system calls. */
  initrd?: string;
}

export interface FindGuestKernelOptions {
  /** Environment to read KVMKIT_GUEST_DIR from (default process.env). */
  env?: Record<string, string | undefined>;
  /** Where to start looking for the repository root (default: this module's directory). */
  from?: string;
  /** Extra fixed fallbacks tried after the repo-relative one (default ['/work/shared/guest']). */
  fallbacks?: string[];
}

export const GUEST_DIR_ENV = 'KVMKIT_GUEST_DIR';
export const BUILD_SCRIPT = 'scripts/build-guest-kernel.sh';
/** Where scripts/build-guest-kernel.sh puts its output, relative to the repo root (git-ignored). */
export const BUILD_OUTPUT = 'guest-kernel/build';

const isFile = (p: string): boolean => {
  try {
    return statSync(p).isFile();
  } catch {
    return false;
  }
};

/** Walks up from `from` to the directory whose package.json declares workspaces (the monorepo root). */
export function findRepoRoot(from: string = dirname(fileURLToPath(import.meta.url))): string | undefined {
  let d = resolve(from);
  for (;;) {
    const pj = join(d, 'package.json');
    if (isFile(pj)) {
      try {
        const j = JSON.parse(readFileSync(pj, 'utf8')) as { workspaces?: unknown };
        if (j.workspaces !== undefined) return d;
      } catch {
        /* not the root */
      }
    }
    const up = dirname(d);
    if (up === d) return undefined;
    d = up;
  }
}

function inspect(dir: string): GuestKernel | undefined {
  const k: GuestKernel = { dir };
  if (isFile(join(dir, 'vmlinux'))) k.vmlinux = join(dir, 'vmlinux');
  if (isFile(join(dir, 'bzImage'))) k.bzImage = join(dir, 'bzImage');
  if (isFile(join(dir, 'spin.cpio'))) k.initrd = join(dir, 'spin.cpio');
  return k.vmlinux || k.bzImage ? k : undefined;
}

/** The directories searched, in order. */
export function guestKernelCandidates(opts: FindGuestKernelOptions = {}): string[] {
  const env = opts.env ?? process.env;
  const out: string[] = [];
  const fromEnv = env[GUEST_DIR_ENV];
  if (fromEnv) out.push(resolve(fromEnv));
  const root = findRepoRoot(opts.from);
  if (root) out.push(resolve(root, '..', 'shared', 'guest'));
  for (const f of opts.fallbacks ?? ['/work/shared/guest']) out.push(resolve(f));
  if (root) out.push(resolve(root, BUILD_OUTPUT));
  return [...new Set(out)];
}

/**
 * Finds a guest kernel: $KVMKIT_GUEST_DIR, then ../shared/guest beside the repo root (and /work/shared/guest),
 * then what scripts/build-guest-kernel.sh built (guest-kernel/build/). A directory counts when it holds
 * vmlinux or bzImage. When KVMKIT_GUEST_DIR is set but holds no kernel, the search continues (the
 * message of requireGuestKernel names it).
 */
export function findGuestKernel(opts: FindGuestKernelOptions = {}): GuestKernel | undefined {
  for (const dir of guestKernelCandidates(opts)) {
    if (!existsSync(dir)) continue;
    const k = inspect(dir);
    if (k) return k;
  }
  return undefined;
}

/** How to get a kernel, for skip messages and errors. */
export function guestKernelHelp(opts: FindGuestKernelOptions = {}): string {
  return (
    `no guest kernel found (looked in: ${guestKernelCandidates(opts).join(', ')}). ` +
    `Build one with \`${BUILD_SCRIPT}\` (needs root for apt-get; writes ${BUILD_OUTPUT}/vmlinux, bzImage, spin.cpio), ` +
    `or point ${GUEST_DIR_ENV} at a directory holding vmlinux and/or bzImage (+ spin.cpio).`
  );
}

/** Like findGuestKernel but throws an Error saying how to get one. */
export function requireGuestKernel(opts: FindGuestKernelOptions = {}): GuestKernel {
  const k = findGuestKernel(opts);
  if (!k) throw new Error(guestKernelHelp(opts));
  return k;
}
