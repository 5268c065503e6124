import { describe, it, expect } from 'vitest';
import { validateMachineConfig, defaultMemoryLayout } from './config.js';
import { encodeState, decodeState, StateReader, StateWriter } from './state.js';
import { isKvmkitError } from './errors.js';

const codeOf = (f: () => unknown) => { try { f(); return 'none'; } catch (e) { return isKvmkitError(e) ? `${e.code} ${(e.details as { path?: string }).path ?? ''}`.trim() : 'uncoded'; } };

describe('machine config', () => {
  it('accepts a minimal config and names the bad key otherwise', () => {
    expect(codeOf(() => validateMachineConfig({ name: 'vm', memory: 64, cpus: 2 }))).toBe('none');
    expect(codeOf(() => validateMachineConfig({ name: 'vm', memory: 0, cpus: 2 }))).toBe('KVMKIT_ERR_CONFIG memory');
    expect(codeOf(() => validateMachineConfig({ name: 'vm', memory: 64, cpus: 1000 }))).toBe('KVMKIT_ERR_CONFIG cpus');
    expect(codeOf(() => validateMachineConfig({ name: 'a b', memory: 64, cpus: 1 }))).toBe('KVMKIT_ERR_CONFIG name');
    expect(codeOf(() => validateMachineConfig({ name: 'vm', memory: 64, cpus: 1, plugins: [1] }))).toBe('KVMKIT_ERR_CONFIG plugins[0]');
    expect(codeOf(() => validateMachineConfig(null))).toBe('KVMKIT_ERR_CONFIG (root)');
  });
  it('splits RAM around the 32-bit hole', () => {
    expect(defaultMemoryLayout(256).ram).toEqual([{ gpa: 0n, size: 256 << 20, name: 'ram-low' }]);
    const big = defaultMemoryLayout(4096).ram;
    expect(big.map((r) => [r.gpa, r.size])).toEqual([[0n, 0xc0000000], [0x100000000n, 0x40000000]]);
  });
});

describe('state encoding', () => {
  it('round-trips bigint and bytes, and checks section versions', () => {
    const w = new StateWriter();
    w.write('dev', 2, { a: 1n << 60n, b: new Uint8Array([1, 2, 3]), c: 'x' });
    const decoded = decodeState(encodeState(Object.fromEntries(w.sections))) as Record<string, { version: number; data: unknown }>;
    const r = new StateReader(new Map(Object.entries(decoded)));
    expect(r.read('dev', [1, 2])).toEqual({ a: 1n << 60n, b: new Uint8Array([1, 2, 3]), c: 'x' });
    expect(codeOf(() => r.read('dev', 1))).toBe('KVMKIT_ERR_STATE_FORMAT');
    expect(codeOf(() => r.read('nope', 1))).toBe('KVMKIT_ERR_STATE_FORMAT');
    expect(codeOf(() => w.write('dev', 1, {}))).toBe('KVMKIT_ERR_STATE_FORMAT');
  });
});
