import { describe, it, expect, afterEach } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PluginHost, StateWriter, StateReader, silentLogger, type Plugin } from '@kvmkit/kernel';
import { pluginHarness } from '@kvmkit/testkit';
import serial, { consoleArg, type SerialApi } from './index.js';
import { IER, LSR } from './uart.js';

/** A fake machine + device registry (testkit): records IRQ levels, cmdline parts and bus registrations. */
function harness(plugin: Plugin) {
  const h = pluginHarness(plugin);
  return { ...h, reg: h.registry, devices: () => h.start(false) };
}

const tmp: string[] = [];
afterEach(() => {
  for (const f of tmp.splice(0)) fs.rmSync(f, { force: true, recursive: true });
});

describe('serial plugin', () => {
  it('registers COM1 at 0x3f8/IRQ 4, adds console=ttyS0 and provides the serial API', async () => {
    const p = serial({ output: 'none' });
    expect(p.name).toBe('serial');
    expect(p.provides).toEqual(['console']);
    const h = harness(p);
    await h.devices();
    expect(h.pio.find(0x3f8)?.name).toBe('serial');
    expect(h.pio.find(0x3ff)?.name).toBe('serial');
    expect(h.pio.find(0x400)).toBeUndefined();
    expect(h.cmdline).toEqual(['console=ttyS0']);
    expect(h.machine.use<SerialApi>('serial')).toBeDefined();
  });

  it('delivers guest output to the sink, onData, output() and waitFor()', async () => {
    const got: number[] = [];
    const h = harness(serial({ output: 'none', sink: (b) => got.push(...b) }));
    await h.devices();
    const api = h.machine.use<SerialApi>('serial')!;
    const seen: string[] = [];
    api.onData((b) => seen.push(Buffer.from(b).toString()));
    const waiting = api.waitFor(/ready: (\d+)/, 2000);
    for (const c of 'boot ok\nready: 42\n') h.out(0x3f8, c.charCodeAt(0));
    await expect(waiting).resolves.toBe('ready: 42');
    expect(Buffer.from(got).toString()).toBe('boot ok\nready: 42\n');
    expect(seen.join('')).toBe('boot ok\nready: 42\n');
    expect(Buffer.from(api.output()).toString()).toBe('boot ok\nready: 42\n');
    await expect(api.waitFor('boot ok', 10)).resolves.toBe('boot ok'); // already in the output
  });

  it('waitFor times out with KVMKIT_ERR_TIMEOUT and rejects pending waits when the machine stops', async () => {
    const h = harness(serial({ output: 'none' }));
    await h.devices();
    const api = h.machine.use<SerialApi>('serial')!;
    await expect(api.waitFor('never', 20)).rejects.toMatchObject({ code: 'KVMKIT_ERR_TIMEOUT' });
    const pending = api.waitFor('never', 10_000);
    await h.hooks.afterStop.promise(h.machine);
    await expect(pending).rejects.toMatchObject({ code: 'KVMKIT_ERR_STATE' });
  });

  it('caps the output history', async () => {
    const h = harness(serial({ output: 'none', history: 8 }));
    await h.devices();
    for (const c of '0123456789abcdef') h.out(0x3f8, c.charCodeAt(0));
    const api = h.machine.use<SerialApi>('serial')!;
    expect(Buffer.from(api.output()).toString()).toBe('89abcdef');
  });

  it('inject() reaches the guest through RBR and raises the receive interrupt on IRQ 4', async () => {
    const h = harness(serial({ output: 'none' }));
    await h.devices();
    const api = h.machine.use<SerialApi>('serial')!;
    h.out(0x3fa, 0x01); // FIFO on
    h.out(0x3f9, IER.RDA);
    api.inject('hello');
    expect(h.irqs).toEqual([[4, true]]);
    let s = '';
    while (h.inb(0x3fd) & LSR.DR) s += String.fromCharCode(h.inb(0x3f8));
    expect(s).toBe('hello');
    expect(h.irqs).toEqual([[4, true], [4, false]]);
  });

  it('a second UART with an id and its own port/IRQ coexists with COM1 (no console, own API)', async () => {
    const a = serial({ output: 'none' });
    const b = serial({ id: 'com2', port: 0x2f8, irq: 3, output: 'none' });
    expect(b.name).toBe('serial-com2');
    expect(b.provides).toEqual(['serial+']);
    const host = new PluginHost('0.1.0');
    host.register(a);
    host.register(b);
    const h = harness(a);
    b.apply(h.machine, { log: silentLogger(), options: b.options });
    await h.devices();
    expect(h.pio.find(0x2f8)?.name).toBe('serial-com2');
    expect(h.cmdline).toEqual(['console=ttyS0']);
    h.out(0x2f9, IER.THRE);
    expect(h.irqs).toEqual([[3, true]]);
    expect(h.machine.use('serial-com2')).toBeDefined();
  });

  it('maps ports to console= arguments', () => {
    expect(consoleArg(0x3f8)).toBe('console=ttyS0');
    expect(consoleArg(0x2f8)).toBe('console=ttyS1');
    expect(consoleArg(0x3e8)).toBe('console=ttyS2');
    expect(consoleArg(0x2e8)).toBe('console=ttyS3');
    expect(consoleArg(0x500)).toBe('console=uart8250,io,0x500');
  });

  it('console: false adds nothing to the cmdline', async () => {
    const h = harness(serial({ output: 'none', console: false }));
    await h.devices();
    expect(h.cmdline).toEqual([]);
  });

  it('writes output to a file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmkit-serial-'));
    tmp.push(dir);
    const file = path.join(dir, 'console.log');
    const h = harness(serial({ output: { file } }));
    await h.devices();
    for (const c of 'to file\n') h.out(0x3f8, c.charCodeAt(0));
    await h.hooks.afterStop.promise(h.machine);
    expect(fs.readFileSync(file, 'utf8')).toBe('to file\n');
  });

  it('a file that cannot be opened is KVMKIT_ERR_SERIAL_OUTPUT', async () => {
    const h = harness(serial({ output: { file: '/nonexistent-dir/x/console.log' } }));
    await expect(h.devices()).rejects.toMatchObject({ code: 'KVMKIT_ERR_SERIAL_OUTPUT' });
  });

  it('rejects invalid options with KVMKIT_ERR_PLUGIN_OPTIONS', () => {
    const bad: unknown[] = [
      { port: 0x10000 },
      { irq: 24 },
      { port: 'x' },
      { output: 'tty' },
      { output: { file: 3 } },
      { input: 'socket' },
      { sink: 'nope' },
      { id: 'a:b' },
      { bogus: 1 },
    ];
    for (const o of bad) {
      const host = new PluginHost('0.1.0');
      expect(() => host.register(serial(o as never)), JSON.stringify(o)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_PLUGIN_OPTIONS' }));
    }
  });

  it('saves and restores its section (version 1)', async () => {
    const h1 = harness(serial({ output: 'none' }));
    await h1.devices();
    h1.out(0x3fa, 0x01);
    h1.out(0x3f9, IER.RDA);
    h1.out(0x3ff, 0x77);
    h1.machine.use<SerialApi>('serial')!.inject('abc');
    const w = new StateWriter();
    await h1.hooks.saveState.promise(w);
    expect(w.sections.get('serial')?.version).toBe(1);

    const h2 = harness(serial({ output: 'none' }));
    await h2.devices();
    await h2.hooks.restoreState.promise(new StateReader(w.sections));
    expect(h2.irqs.at(-1)).toEqual([4, true]);
    expect(h2.inb(0x3ff)).toBe(0x77);
    expect([h2.inb(0x3f8), h2.inb(0x3f8), h2.inb(0x3f8)].map((c) => String.fromCharCode(c)).join('')).toBe('abc');
  });

  it('rejects a saved section of another version', async () => {
    const h = harness(serial({ output: 'none' }));
    await h.devices();
    const r = new StateReader(new Map([['serial', { version: 2, data: {} }]]));
    await expect(h.hooks.restoreState.promise(r)).rejects.toMatchObject({ code: 'KVMKIT_ERR_STATE_FORMAT' });
  });
});
