import { readFileSync } from 'node:fs';
import { KvmkitError, type Plugin, type MachineApi, type CpuidEntry } from '@kvmkit/kernel';
import { applyNamed, applyCustom, missingFeatures, TEMPLATE_NAMES, type TemplateName, type CustomTemplate, type LeafSpec, type RegSpec } from './templates.js';
import { applyTopology, apicIdOf, denseApicIds, topologyBits, type Topology } from './topology.js';

export { applyNamed, applyCustom, missingFeatures, featureOf, FEATURES, TEMPLATE_MASKS, LEVEL_FEATURES, TEMPLATE_NAMES, SIGNIFICANT_INDEX } from './templates.js';
export type { TemplateName, CustomTemplate, LeafSpec, RegSpec } from './templates.js';
export { applyTopology, apicIdOf, placeOf, denseApicIds, topologyBits } from './topology.js';
export type { Topology } from './topology.js';
export { doctorCheck } from './doctor.js';
export type { CpuidDoctorReport } from './doctor.js';

const NAME = 'cpu-template';

export const CPU_TEMPLATE_ERRORS = {
  /** sockets × cores × threads ≠ vCPUs, or a topology whose APIC ids the kernel cannot create. */
  TOPOLOGY: 'KVMKIT_ERR_CPU_TOPOLOGY',
  /** strict: the host (KVM) lacks features the template's level promises; a template file cannot be read. */
  TEMPLATE: 'KVMKIT_ERR_CPU_TEMPLATE',
  /** KVM_GET_CPUID2 differs from what KVM_SET_CPUID2 was given (e.g. nested PVM rewrites feature leaves). */
  NOT_HELD: 'KVMKIT_ERR_CPU_TEMPLATE_NOT_HELD',
  /** KVM refused an MSR of the `msrs` option (unknown index or value it does not accept). */
  MSR: 'KVMKIT_ERR_CPU_TEMPLATE_MSR',
} as const;

/** One MSR value to set on every vCPU (`value` as a number, bigint or "0x…" string). */
export interface MsrSetting {
  index: number;
  value: number | bigint | string;
}

function msrValue(v: MsrSetting['value']): bigint {
  return typeof v === 'bigint' ? v : BigInt(v);
}

/** One difference between the CPUID handed to KVM_SET_CPUID2 and what KVM_GET_CPUID2 returns. */
export interface CpuidDifference {
  function: number;
  index: number;
  /** A register, or 'leaf' when the whole (sub-)leaf is only on one side. */
  reg: 'eax' | 'ebx' | 'ecx' | 'edx' | 'leaf';
  applied: number | undefined;
  held: number | undefined;
}

/** Differences between two CPUID tables, keyed by (function, index). */
export function cpuidDiff(applied: readonly CpuidEntry[], held: readonly CpuidEntry[]): CpuidDifference[] {
  const key = (e: CpuidEntry) => `${e.function}:${e.index}`;
  const a = new Map(applied.map((e) => [key(e), e]));
  const h = new Map(held.map((e) => [key(e), e]));
  const out: CpuidDifference[] = [];
  for (const k of new Set([...a.keys(), ...h.keys()])) {
    const x = a.get(k);
    const y = h.get(k);
    const e = (x ?? y)!;
    if (!x || !y) {
      out.push({ function: e.function, index: e.index, reg: 'leaf', applied: x ? 1 : undefined, held: y ? 1 : undefined });
      continue;
    }
    for (const r of ['eax', 'ebx', 'ecx', 'edx'] as const) {
      if (x[r] >>> 0 !== y[r] >>> 0) out.push({ function: e.function, index: e.index, reg: r, applied: x[r] >>> 0, held: y[r] >>> 0 });
    }
  }
  return out.sort((p, q) => p.function - q.function || p.index - q.index);
}

export interface CpuTemplateOptions {
  /** 'host' (default: KVM's supported CPUID as is), 'minimal', 'baseline-v2', or a custom template object. */
  template?: TemplateName | CustomTemplate;
  /** A JSON file holding a custom template (`{ base?, leaves: [...] }`); wins over `template`. */
  templateFile?: string;
  /** Guest CPU topology; sockets × cores × threads must equal the VM's vCPU count. */
  topology?: Topology;
  /** Fail (KVMKIT_ERR_CPU_TEMPLATE) instead of warning when the host lacks features the level promises. */
  strict?: boolean;
  /**
   * MSR shaping: values written to every vCPU (KVM_SET_MSRS) after its CPUID is set, then read back
   * (KVM_GET_MSRS). A value KVM refuses is KVMKIT_ERR_CPU_TEMPLATE_MSR; one it changes is reported like CPUID
   * divergence (a warning, or an error with `strict`).
   */
  msrs?: MsrSetting[];
}

/** What `machine.use('cpu-template')` returns. */
export interface CpuTemplateApi {
  template(): string;
  topology(): Topology | undefined;
  /** APIC id per vCPU (index = vCPU). */
  apicIds(): number[];
  /** The CPUID table handed to KVM_SET_CPUID2 for vCPU i. */
  applied(i: number): CpuidEntry[] | undefined;
  warnings(): Array<{ code: string; message: string }>;
  /** Where KVM_GET_CPUID2 of vCPU i differs from what was set (empty when KVM holds the template exactly). */
  divergence(i: number): CpuidDifference[];
}

function optErr(message: string, key: string): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', `${NAME}: ${message}`, { details: { plugin: NAME, key } });
}

const u32 = (v: unknown): boolean => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 0xffffffff;

/** Checks a custom template's shape; returns it typed. */
export function validateCustomTemplate(t: unknown, where = 'template'): CustomTemplate {
  if (typeof t !== 'object' || t === null || Array.isArray(t)) throw optErr(`${where} must be a template name (${TEMPLATE_NAMES.join(', ')}) or { base?, leaves: [...] }`, where);
  const o = t as Record<string, unknown>;
  for (const k of Object.keys(o)) if (k !== 'base' && k !== 'leaves' && k !== '$schema' && k !== 'description') throw optErr(`${where}: unknown key ${k}`, `${where}.${k}`);
  if (o.base !== undefined && !TEMPLATE_NAMES.includes(o.base as TemplateName)) throw optErr(`${where}.base must be one of ${TEMPLATE_NAMES.join(', ')}`, `${where}.base`);
  if (!Array.isArray(o.leaves)) throw optErr(`${where}.leaves must be an array`, `${where}.leaves`);
  o.leaves.forEach((l: unknown, i) => {
    const p = `${where}.leaves[${i}]`;
    if (typeof l !== 'object' || l === null) throw optErr(`${p} must be an object`, p);
    const x = l as Record<string, unknown>;
    for (const k of Object.keys(x)) if (!['function', 'index', 'remove', 'eax', 'ebx', 'ecx', 'edx'].includes(k)) throw optErr(`${p}: unknown key ${k}`, `${p}.${k}`);
    if (!u32(x.function)) throw optErr(`${p}.function must be a leaf number 0..0xffffffff`, `${p}.function`);
    if (x.index !== undefined && !u32(x.index)) throw optErr(`${p}.index must be 0..0xffffffff`, `${p}.index`);
    if (x.remove !== undefined && typeof x.remove !== 'boolean') throw optErr(`${p}.remove must be a boolean`, `${p}.remove`);
    for (const r of ['eax', 'ebx', 'ecx', 'edx']) {
      const v = x[r];
      if (v === undefined || u32(v)) continue;
      if (typeof v === 'object' && v !== null && !Array.isArray(v)) {
        const m = v as Record<string, unknown>;
        if (Object.keys(m).every((k) => (k === 'set' || k === 'clear') && u32(m[k]))) continue;
      }
      throw optErr(`${p}.${r} must be a 32-bit value or { set?, clear? } masks`, `${p}.${r}`);
    }
  });
  return o as unknown as CustomTemplate;
}

function validateOptions(o: unknown): void {
  if (o === undefined || o === null) return;
  if (typeof o !== 'object' || Array.isArray(o)) throw optErr('options must be an object', '');
  const x = o as Record<string, unknown>;
  for (const k of Object.keys(x)) if (!['template', 'templateFile', 'topology', 'strict', 'msrs'].includes(k)) throw optErr(`unknown option ${k} (known: template, templateFile, topology, strict, msrs)`, k);
  if (x.msrs !== undefined) {
    if (!Array.isArray(x.msrs)) throw optErr('option msrs must be an array of { index, value }', 'msrs');
    x.msrs.forEach((m: unknown, i: number) => {
      const e = m as Record<string, unknown>;
      if (typeof e !== 'object' || e === null || !Number.isInteger(e.index) || (e.index as number) < 0 || (e.index as number) > 0xffffffff) throw optErr(`msrs[${i}].index must be a 32-bit MSR number`, `msrs[${i}].index`);
      try {
        const v = msrValue(e.value as MsrSetting['value']);
        if (v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new Error('range');
      } catch {
        throw optErr(`msrs[${i}].value must be a 64-bit value (number, bigint or "0x…" string)`, `msrs[${i}].value`);
      }
    });
  }
  if (x.template !== undefined && typeof x.template !== 'string') validateCustomTemplate(x.template);
  if (typeof x.template === 'string' && !TEMPLATE_NAMES.includes(x.template as TemplateName)) throw optErr(`option template must be one of ${TEMPLATE_NAMES.join(', ')} or a custom template (got ${JSON.stringify(x.template)})`, 'template');
  if (x.templateFile !== undefined && typeof x.templateFile !== 'string') throw optErr('option templateFile must be a path', 'templateFile');
  if (x.strict !== undefined && typeof x.strict !== 'boolean') throw optErr('option strict must be a boolean', 'strict');
  if (x.topology !== undefined) {
    const t = x.topology as Record<string, unknown>;
    if (typeof t !== 'object' || t === null) throw optErr('option topology must be { sockets, cores, threads }', 'topology');
    for (const k of ['sockets', 'cores', 'threads']) {
      if (!Number.isInteger(t[k]) || (t[k] as number) < 1 || (t[k] as number) > 255) throw optErr(`topology.${k} must be an integer 1..255`, `topology.${k}`);
    }
    for (const k of Object.keys(t)) if (!['sockets', 'cores', 'threads'].includes(k)) throw optErr(`topology: unknown key ${k}`, `topology.${k}`);
  }
}

/** Loads the template the options name (reads templateFile). */
export function resolveTemplate(options: CpuTemplateOptions): { name: string; apply(entries: readonly CpuidEntry[]): CpuidEntry[]; level?: 'minimal' | 'baseline-v2' } {
  if (options.templateFile) {
    let t: unknown;
    try {
      t = JSON.parse(readFileSync(options.templateFile, 'utf8'));
    } catch (e) {
      throw new KvmkitError(CPU_TEMPLATE_ERRORS.TEMPLATE, `${NAME}: cannot read template file ${options.templateFile}: ${(e as Error).message}`, { details: { file: options.templateFile } });
    }
    const c = validateCustomTemplate(t, `templateFile(${options.templateFile})`);
    return { name: `custom:${options.templateFile}`, apply: (e) => applyCustom(e, c), ...(c.base && c.base !== 'host' ? { level: c.base } : {}) };
  }
  const t = options.template ?? 'host';
  if (typeof t === 'string') return { name: t, apply: (e) => applyNamed(e, t), ...(t !== 'host' ? { level: t } : {}) };
  return { name: 'custom', apply: (e) => applyCustom(e, t), ...(t.base && t.base !== 'host' ? { level: t.base } : {}) };
}

/**
 * Shapes each vCPU's CPUID (the `cpuid` waterfall hook) with a named or custom template and writes a
 * sockets/cores/threads topology into leaves 1, 4, 0xB (and AMD's 0x80000008/0x8000001E).
 */
export default function cpuTemplate(options: CpuTemplateOptions = {}): Plugin {
  return {
    name: NAME,
    version: '0.1.0',
    kernel: '^0.1.0',
    options,
    validateOptions,
    apply(machine: MachineApi, { log }) {
      const tmpl = resolveTemplate(options);
      const topology = options.topology;
      const applied: CpuidEntry[][] = [];
      const divergence: CpuidDifference[][] = [];
      const warnings: Array<{ code: string; message: string }> = [];
      let checked = false;
      machine.provide(NAME, {
        template: () => tmpl.name,
        topology: () => (topology ? { ...topology } : undefined),
        apicIds: () => Array.from({ length: machine.config.cpus }, (_, i) => (topology ? apicIdOf(topology, i) : i)),
        applied: (i: number) => applied[i]?.map((e) => ({ ...e })),
        warnings: () => warnings.map((w) => ({ ...w })),
        divergence: (i: number) => (divergence[i] ?? []).map((d) => ({ ...d })),
      } satisfies CpuTemplateApi);

      // Read back what KVM holds: some hosts rewrite parts of the table (nested PVM puts the real CPU's
      // feature leaves back, since guest CPUID is not trapped there).
      machine.hooks.vcpuCreated.tapPromise(`${NAME}:msrs`, async ({ index, vcpu }) => {
        const want = (options.msrs ?? []).map((m) => ({ index: m.index, data: msrValue(m.value) }));
        if (want.length === 0) return;
        const n = vcpu.setMsrs(want);
        if (n < want.length) {
          const bad = want[n]!;
          throw new KvmkitError(CPU_TEMPLATE_ERRORS.MSR, `${NAME}: KVM refused MSR 0x${bad.index.toString(16)} = 0x${bad.data.toString(16)} on vCPU ${index}`, { details: { index: bad.index, value: `0x${bad.data.toString(16)}`, vcpu: index } });
        }
        const got = vcpu.getMsrs(want.map((m) => m.index));
        const differ = want.filter((m, i) => got[i]?.data !== m.data);
        if (differ.length > 0) {
          const message = `${NAME}: vCPU ${index}: KVM holds other values for MSR ${differ.map((m) => `0x${m.index.toString(16)}`).join(', ')} than were set`;
          if (options.strict) throw new KvmkitError(CPU_TEMPLATE_ERRORS.NOT_HELD, message, { details: { msrs: differ.map((m) => m.index) } });
          warnings.push({ code: CPU_TEMPLATE_ERRORS.NOT_HELD, message });
          log.warn({ code: CPU_TEMPLATE_ERRORS.NOT_HELD }, message);
        }
      });

      machine.hooks.vcpuCreated.tapPromise(NAME, async ({ index, vcpu }) => {
        const mine = applied[index];
        if (!mine) return;
        const d = cpuidDiff(mine, vcpu.getCpuid());
        divergence[index] = d;
        if (d.length > 0 && index === 0) {
          const where = [...new Set(d.map((x) => `0x${x.function.toString(16)}.${x.index}${x.reg === 'leaf' ? '' : `.${x.reg}`}`))];
          const message = `${NAME}: KVM does not hold the template as set: KVM_GET_CPUID2 differs in ${where.join(', ')} (this host rewrites those CPUID fields; the guest sees the host's values there)`;
          if (options.strict) throw new KvmkitError(CPU_TEMPLATE_ERRORS.NOT_HELD, message, { details: { differences: d } });
          warnings.push({ code: CPU_TEMPLATE_ERRORS.NOT_HELD, message });
          log.warn({ code: CPU_TEMPLATE_ERRORS.NOT_HELD, fields: where }, message);
        }
      });

      machine.hooks.validate.tap(NAME, (config) => {
        if (!topology) return;
        const n = topology.sockets * topology.cores * topology.threads;
        if (n !== config.cpus) {
          throw new KvmkitError(CPU_TEMPLATE_ERRORS.TOPOLOGY, `${NAME}: topology ${topology.sockets} sockets × ${topology.cores} cores × ${topology.threads} threads = ${n} vCPUs, but the VM has ${config.cpus}`, { details: { topology, cpus: config.cpus } });
        }
        if (!denseApicIds(topology)) {
          const ids = Array.from({ length: n }, (_, i) => apicIdOf(topology, i));
          throw new KvmkitError(CPU_TEMPLATE_ERRORS.TOPOLOGY,
            `${NAME}: topology ${topology.sockets}/${topology.cores}/${topology.threads} needs APIC ids ${ids.join(',')} (gaps), but the kernel creates vCPU i with APIC id i; use power-of-two threads (and power-of-two cores when sockets > 1)`,
            { details: { topology, apicIds: ids } });
        }
        log.info({ topology, bits: topologyBits(topology) }, 'guest CPU topology');
      });

      machine.hooks.cpuid.tap(NAME, (entries, i) => {
        if (!checked && tmpl.level) {
          checked = true;
          const missing = missingFeatures(entries, tmpl.level);
          if (missing.length > 0) {
            const message = `${NAME}: template ${tmpl.name} promises ${tmpl.level} features this host's KVM does not offer: ${missing.join(', ')}; the guest will not see them`;
            if (options.strict) throw new KvmkitError(CPU_TEMPLATE_ERRORS.TEMPLATE, message, { details: { template: tmpl.name, missing } });
            warnings.push({ code: CPU_TEMPLATE_ERRORS.TEMPLATE, message });
            log.warn({ code: CPU_TEMPLATE_ERRORS.TEMPLATE, missing }, message);
          }
        }
        let out = tmpl.apply(entries);
        if (topology) out = applyTopology(out, topology, i);
        applied[i] = out.map((e) => ({ ...e }));
        return out;
      });
    },
  };
}
