import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Machine, silentLogger, type Plugin, type StopReason } from '@kvmkit/kernel';
import bootLinux, { type BootLinuxOptions } from '@kvmkit/plugin-boot-linux';
import platformPc from '@kvmkit/plugin-platform-pc';
import serial from '@kvmkit/plugin-serial';
import { debugExitPlugin, parseProbeOutput, probeElfPath, spawnJsonLines, type JsonLinesChild, type JsonLinesOptions, type ProbeLine, type ProbeOutput } from '@kvmkit/testkit';

export const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[kvmkit e2e] /dev/kvm not present: KVM tests are skipped');

/** A minimal debug-exit device (port 0xf4) for tests that run without platform-pc. */
export { debugExitPlugin as exitPort } from '@kvmkit/testkit';

export function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

/** A fixture child (see spawnJsonChild); the implementation is @kvmkit/testkit's spawnJsonLines. */
export type JsonChild = JsonLinesChild;

/**
 * Runs a fixture script (`node script '<json args>'`) that reports on stdout one JSON object per line — the way
 * the snapshot, migration and device children talk to their tests. `opts.wrap` runs the child under a command,
 * e.g. `['ip', 'netns', 'exec', ns]`.
 */
export function spawnJsonChild(script: string, args: unknown, opts: JsonLinesOptions & { wrap?: string[] } = {}): JsonChild {
  const { wrap = [], ...rest } = opts;
  return spawnJsonLines([...wrap, process.execPath, script, JSON.stringify(args)], rest);
}

export interface KvmkitProbeOptions {
  /** The machine's name. */
  name: string;
  /** The probe's command line (probeCmdline(...) or written out). */
  cmdline: string;
  /** Device plugins, placed before platform-pc, serial (output collected) and boot-linux. */
  devices?: Plugin[];
  /** The probe ELF (default probeElfPath()). */
  kernel?: string;
  /** After this long the machine is stopped with exit code 124 (default 30 000 ms). */
  timeoutMs?: number;
  /** Each chunk of the guest's serial output as it arrives. */
  onOutput?: (text: string) => void;
  /** The machine starts paused, this runs, then it resumes (e.g. to move its TAP into a namespace). */
  beforeRun?: () => void | Promise<void>;
  /** The host side, run while the guest runs; its failure fails the run unless the guest stopped first. */
  during?: () => Promise<void>;
}

export interface KvmkitProbeRun {
  /** The guest's serial output. */
  out: string;
  r: StopReason;
  probe: ProbeOutput;
  /** The first `PROBE <test> ...` line. */
  line(test: string): ProbeLine | undefined;
}

/** Boots the probe guest on a kvmkit Machine (platform-pc, serial, boot-linux + `devices`) until it stops. */
export async function runProbeOnKvmkit(o: KvmkitProbeOptions): Promise<KvmkitProbeRun> {
  const chunks: Uint8Array[] = [];
  const sink = (b: Uint8Array) => {
    chunks.push(b);
    o.onOutput?.(Buffer.from(b).toString());
  };
  const m = new Machine({
    config: { name: o.name, memory: 64, cpus: 1, cmdline: o.cmdline },
    plugins: [...(o.devices ?? []), platformPc(), serial({ console: false, output: 'none', sink }), bootLinux({ kernel: o.kernel || probeElfPath() })],
    log: silentLogger(),
  });
  let r: StopReason;
  let timer: NodeJS.Timeout | undefined;
  try {
    await m.start({ paused: o.beforeRun !== undefined });
    if (o.beforeRun) {
      await o.beforeRun();
      await m.resume();
    }
    timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 124, message: 'test timeout' }), o.timeoutMs ?? 30_000);
    const stopped = m.waitForStop();
    if (o.during) await Promise.race([o.during(), stopped]);
    r = await stopped;
  } finally {
    clearTimeout(timer);
    await m.stop();
  }
  const out = Buffer.concat(chunks).toString();
  const probe = parseProbeOutput(out);
  return { out, r, probe, line: (test) => probe.lines.find((l) => l.test === test) };
}

// ---- synthetic kernels: a few instructions of our own behind boot-linux's hand-over ----

/** Assembles `src` (GNU as syntax, with gcc) in `dir` and returns the flat bytes of its .text (needs gcc and objcopy). */
export function assembleText(dir: string, name: string, src: string): Uint8Array {
  const s = join(dir, `${name}.S`);
  writeFileSync(s, src);
  execFileSync('gcc', ['-c', '-o', join(dir, `${name}.o`), s]);
  execFileSync('objcopy', ['-O', 'binary', '-j', '.text', join(dir, `${name}.o`), join(dir, `${name}.bin`)]);
  return readFileSync(join(dir, `${name}.bin`));
}

/** Creates the in-kernel irqchip (what platform-pc does), for machines without platform-pc. */
export const irqchipPlugin = (): Plugin => ({
  name: 'test-irqchip', version: '0.1.0',
  apply(m) {
    m.hooks.vmCreated.tapPromise('test-irqchip', async (vm) => vm.createIrqchip());
  },
});

/**
 * Boots a kernel with boot-linux (+ irqchip and the debug-exit port, 64 MiB) until the guest stops; after 60 s
 * the machine is stopped with exit code 99.
 */
export async function runSyntheticKernel(o: { name: string; cpus: number; cmdline: string; boot: BootLinuxOptions }): Promise<StopReason> {
  const m = new Machine({ config: { name: o.name, memory: 64, cpus: o.cpus, cmdline: o.cmdline }, plugins: [irqchipPlugin(), debugExitPlugin(), bootLinux(o.boot)], log: silentLogger() });
  try {
    await m.start();
    const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'test timeout' }), 60_000);
    const r = await m.waitForStop();
    clearTimeout(t);
    return r;
  } finally {
    await m.stop();
  }
}
