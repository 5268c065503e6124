// Resolves the probe VM for a host profile, boots it here, and reports what the host could not provide.
//   node examples/per-host/boot-report.mjs [--host numa-big|laptop|pvm-nested]
// A plugin that fails with its coded error (e.g. KVMKIT_ERR_HUGEPAGES_INSUFFICIENT when no 1 GiB pages are
// reserved) is reported as unavailable with that code and message, and the VM is booted again without it;
// warnings that plugins publish (fallbacks, unsupported features) are collected too. Nothing is dropped silently.
import { fileURLToPath } from 'node:url';
import { loadConfig, resolveVm, instantiatePlugins } from '@kvmkit/config';
import { Machine, silentLogger, isKvmkitError } from '@kvmkit/kernel';

export const CONFIG = fileURLToPath(new URL('./kvmkit.config.mjs', import.meta.url));

/** Which plugin raises which error codes. */
const OWNER = [
  [/^KVMKIT_ERR_PINNING/, 'pinning'],
  [/^KVMKIT_ERR_HUGEPAGES_/, 'hugepages'],
  [/^KVMKIT_ERR_NUMA_/, 'numa'],
  [/^KVMKIT_ERR_CPU_/, 'cpu-template'],
  [/^KVMKIT_ERR_NESTED_/, 'nested-virt'],
  [/^KVMKIT_ERR_HOST_PROFILE/, 'host-pvm'],
];

const short = (name) => name.replace(/^@kvmkit\/plugin-/, '');

/** Resolves the VM for `host` (undefined = match this machine). */
export async function resolveFor(host, opts = {}) {
  const loaded = await loadConfig({ file: opts.config ?? CONFIG });
  const r = resolveVm(loaded, { vm: 'probe', ...(host ? { host } : {}) });
  return { loaded, resolved: r, names: r.plugins.map((p) => short(p.name)) };
}

/**
 * Boots the resolved VM; on a coded error owned by a tuning plugin, records it as unavailable and retries
 * without that plugin. Returns the stop reason, the plugins that ran, and every unavailable part / warning.
 */
export async function bootReport(host, opts = {}) {
  const { loaded, resolved } = await resolveFor(host, opts);
  let specs = [...resolved.plugins];
  const unavailable = [];
  for (let attempt = 0; attempt < 6; attempt++) {
    const plugins = await instantiatePlugins(specs, { baseDir: resolved.sources.dir, configFile: loaded.file });
    const m = new Machine({ config: { ...resolved.machineConfig, plugins: undefined }, plugins, log: opts.log ?? silentLogger() });
    try {
      await m.start();
    } catch (e) {
      const owner = isKvmkitError(e) ? OWNER.find(([re]) => re.test(e.code))?.[1] : undefined;
      if (!owner || !specs.some((s) => short(s.name) === owner)) throw e;
      unavailable.push({ plugin: owner, code: e.code, message: e.message });
      specs = specs.filter((s) => short(s.name) !== owner);
      continue;
    }
    const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99, message: 'timeout' }), opts.timeoutMs ?? 60_000);
    const warnings = [];
    for (const p of specs.map((s) => short(s.name))) {
      const api = m.api.use(p);
      if (api && typeof api.warnings === 'function') for (const w of api.warnings()) warnings.push({ plugin: p, ...w });
    }
    const stop = await m.waitForStop();
    clearTimeout(timer);
    return { host: resolved.sources.host, plugins: specs.map((s) => short(s.name)), stop: { reason: stop.reason, exitCode: stop.exitCode }, unavailable, warnings };
  }
  throw new Error('too many unavailable plugins');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const i = process.argv.indexOf('--host');
  const host = i > 0 ? process.argv[i + 1] : undefined;
  const r = await bootReport(host);
  console.log(JSON.stringify(r, null, 2));
  process.exitCode = r.stop.exitCode;
}
