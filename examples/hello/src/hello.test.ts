import { describe, it, expect } from 'vitest';
import { existsSync } from 'node:fs';
import { Machine, silentLogger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';
import serial from '@kvmkit/plugin-serial';
import { helloImage, Asm } from './index.js';

describe('hello guest image', () => {
  it('assembles with resolved jumps and embeds the strings', () => {
    const img = helloImage();
    expect(img[0]).toBe(0xf0); // lock prefix of the spinlock
    expect(Buffer.from(img).includes(Buffer.from('Hello from vCPU \0'))).toBe(true);
    expect(() => helloImage('\x01bad')).toThrow();
  });
  it('the assembler rejects undefined labels and out-of-range rel8 jumps', () => {
    expect(() => new Asm().jmp8('nowhere').assemble()).toThrow(/undefined label/);
    const a = new Asm().label('start');
    for (let i = 0; i < 200; i++) a.db(0x90);
    expect(() => a.jmp8('start').assemble()).toThrow(/rel8/);
  });
});

describe.skipIf(!existsSync('/dev/kvm'))('hello on /dev/kvm', () => {
  it('every vCPU prints its greeting, then the VM halts with exit code 0', async () => {
    const chunks: Uint8Array[] = [];
    const m = new Machine({
      config: { name: 'hello', memory: 16, cpus: 3 },
      plugins: [serial({ console: false, output: 'none', sink: (b) => chunks.push(b) }), bootFlat({ image: helloImage() })],
      log: silentLogger(),
    });
    await m.start();
    const r = await m.waitForStop();
    const text = Buffer.concat(chunks).toString();
    expect(r).toMatchObject({ reason: 'halt', exitCode: 0 });
    const lines = text.trim().split('\n').sort();
    expect(lines).toEqual(['Hello from vCPU 0 of 3', 'Hello from vCPU 1 of 3', 'Hello from vCPU 2 of 3']);
  });
});
