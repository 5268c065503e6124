import { describe, it, expect } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KVM, OFF, SIZE, KVM_CAP } from './ioctls.js';

/**
 * Compiles a C program against <linux/kvm.h> and compares every ioctl number, struct size and field offset
 * in ioctls.ts with what the compiler says.
 */
const hasHeader = existsSync('/usr/include/linux/kvm.h');

function cProgram(): string {
  const lines: string[] = [];
  const p = (name: string, expr: string) => lines.push(`  printf("%s=%llu\\n", "${name}", (unsigned long long)(${expr}));`);
  for (const [k, v] of Object.entries(SIZE)) {
    if (k === 'kvm_run_io' || k === 'kvm_run_mmio') continue;
    void v;
    p(`SIZE.${k}`, `sizeof(struct ${k})`);
  }
  p('SIZE.kvm_run_io', 'sizeof(((struct kvm_run*)0)->io)');
  p('SIZE.kvm_run_mmio', 'sizeof(((struct kvm_run*)0)->mmio)');
  const runField: Record<string, string> = {
    request_interrupt_window: 'request_interrupt_window', immediate_exit: 'immediate_exit', exit_reason: 'exit_reason',
    ready_for_interrupt_injection: 'ready_for_interrupt_injection', if_flag: 'if_flag', flags: 'flags', cr8: 'cr8', apic_base: 'apic_base',
    io_direction: 'io.direction', io_size: 'io.size', io_port: 'io.port', io_count: 'io.count', io_data_offset: 'io.data_offset',
    mmio_phys_addr: 'mmio.phys_addr', mmio_data: 'mmio.data', mmio_len: 'mmio.len', mmio_is_write: 'mmio.is_write',
    fail_entry_hardware_entry_failure_reason: 'fail_entry.hardware_entry_failure_reason', fail_entry_cpu: 'fail_entry.cpu',
    internal_suberror: 'internal.suberror', internal_ndata: 'internal.ndata', internal_data: 'internal.data',
    system_event_type: 'system_event.type', system_event_ndata: 'system_event.ndata', system_event_data: 'system_event.data',
  };
  for (const [k, f] of Object.entries(runField)) p(`OFF.kvm_run.${k}`, `offsetof(struct kvm_run, ${f})`);
  for (const [struct, fields] of Object.entries(OFF)) {
    if (struct === 'kvm_run') continue;
    for (const f of Object.keys(fields)) p(`OFF.${struct}.${f}`, `offsetof(struct ${struct}, ${f})`);
  }
  for (const k of Object.keys(KVM)) p(`KVM.${k}`, `KVM_${k}`);
  for (const k of Object.keys(KVM_CAP)) p(`KVM_CAP.${k}`, `KVM_CAP_${k}`);
  return `#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void) {\n${lines.join('\n')}\n  return 0;\n}\n`;
}

describe.skipIf(!hasHeader)('ioctl table vs <linux/kvm.h>', () => {
  it('matches every size, offset, ioctl number and capability', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmkit-layout-'));
    writeFileSync(join(dir, 'l.c'), cProgram());
    execFileSync('gcc', ['-o', join(dir, 'l'), join(dir, 'l.c')]);
    const out = execFileSync(join(dir, 'l'), { encoding: 'utf8' });
    rmSync(dir, { recursive: true, force: true });
    const actual = new Map(out.trim().split('\n').map((l) => l.split('=') as [string, string]));
    const expected = new Map<string, string>();
    for (const [k, v] of Object.entries(SIZE)) expected.set(`SIZE.${k}`, String(v));
    for (const [struct, fields] of Object.entries(OFF)) for (const [f, v] of Object.entries(fields)) expected.set(`OFF.${struct}.${f}`, String(v));
    for (const [k, v] of Object.entries(KVM)) expected.set(`KVM.${k}`, String(v));
    for (const [k, v] of Object.entries(KVM_CAP)) expected.set(`KVM_CAP.${k}`, String(v));
    const mismatches = [...expected].filter(([k, v]) => actual.get(k) !== v).map(([k, v]) => `${k}: ours ${v}, C ${actual.get(k)}`);
    expect(mismatches).toEqual([]);
    expect(actual.size).toBe(expected.size);
  });
});
