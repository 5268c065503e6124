import { describe, it, expect } from 'vitest';
import { earlyVcpuCount } from './early.js';

describe('earlyVcpuCount (vCPU workers bin.ts starts before importing the CLI)', () => {
  it('is 0 for commands that start no VM, for help and for dry runs', () => {
    for (const argv of [[], ['help'], ['config', '--print'], ['doctor'], ['status', 'vm'], ['run', '--help'], ['run', '-h'], ['run', '--kernel', 'k', '--dry-run'], ['restore', '--help']]) {
      expect(earlyVcpuCount(argv)).toBe(0);
    }
  });
  it('follows --cpus (both spellings, the last wins) and defaults to 1', () => {
    expect(earlyVcpuCount(['run', '--kernel', 'k'])).toBe(1);
    expect(earlyVcpuCount(['run', 'web'])).toBe(1);
    expect(earlyVcpuCount(['restore', 'snap.state'])).toBe(1);
    expect(earlyVcpuCount(['run', '--cpus', '4', '--kernel', 'k'])).toBe(4);
    expect(earlyVcpuCount(['run', '--cpus=2'])).toBe(2);
    expect(earlyVcpuCount(['run', '--cpus', '3', '--cpus=2'])).toBe(2);
  });
  it('falls back to 1 for values the parser will reject, and caps at 64', () => {
    for (const v of ['0', '-1', 'x', '1.5', '', '0x2', '999']) expect(earlyVcpuCount(['run', '--cpus', v])).toBe(1);
    expect(earlyVcpuCount(['run', '--cpus'])).toBe(1);
    expect(earlyVcpuCount(['run', '--cpus', '64'])).toBe(64);
    expect(earlyVcpuCount(['run', '--cpus', '65'])).toBe(1);
  });
  it('stops at --', () => {
    expect(earlyVcpuCount(['run', '--', '--help'])).toBe(1);
  });
});
