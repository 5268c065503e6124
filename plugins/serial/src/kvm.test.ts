import { describe, it, expect } from 'vitest';
import { existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Machine, silentLogger, type Plugin, type StopReason } from '@kvmkit/kernel';
import serial, { type SerialApi } from './index.js';
import { realModeBoot, runToStop, REAL_MODE_LOAD as LOAD } from '@kvmkit/testkit';

const hasKvm = existsSync('/dev/kvm');
if (!hasKvm) console.warn('[plugin-serial] /dev/kvm not present: KVM integration tests are skipped');

/** Debug-exit at 0xf4 and (optionally) the in-kernel irqchip, without depending on platform-pc. */
function testPlatform(irqchip: boolean): Plugin {
  return {
    name: 'test-platform',
    version: '0.1.0',
    apply(m) {
      m.hooks.vmCreated.tapPromise('test-platform', async (vm) => {
        if (irqchip) vm.createIrqchip();
      });
      m.hooks.devices.tap('test-platform', (reg) =>
        reg.addPio(0xf4, 1, { read: (_o, d) => d.fill(0), write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0]! }) }, 'test-exit'));
    },
  };
}

const run = runToStop;

const MSG = 'Hello from the 16550A\n';

/** mov dx,0x3f8; mov si,msg; l: lodsb; test al,al; jz done; out dx,al; jmp l; done: mov al,0; out 0xf4,al; hlt */
function helloCode(msg: string): Uint8Array {
  const msgAddr = LOAD + 0x13;
  const code = [0xba, 0xf8, 0x03, 0xbe, msgAddr & 0xff, msgAddr >> 8, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xb0, 0x00, 0xe6, 0xf4, 0xf4];
  return Uint8Array.from([...code, ...Buffer.from(msg + '\0', 'latin1')]);
}

/**
 * Programs the PIC (IRQ 4 → vector 0x0c), installs an ISR in the IVT, sets MCR.OUT2 and IER.ETBEI, then
 * sti; hlt. The ISR reads IIR and writes it to the debug-exit port.
 */
function irqCode(): Uint8Array {
  const isr = LOAD + 0x31;
  return Uint8Array.from([
    0xfa, // cli
    0xb0, 0x11, 0xe6, 0x20, // ICW1
    0xb0, 0x08, 0xe6, 0x21, // ICW2: vector base 8
    0xb0, 0x04, 0xe6, 0x21, // ICW3
    0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
    0xb0, 0xef, 0xe6, 0x21, // mask all but IRQ 4
    0xc7, 0x06, 0x30, 0x00, isr & 0xff, isr >> 8, // IVT[0x0c].offset
    0xc7, 0x06, 0x32, 0x00, 0x00, 0x00, // IVT[0x0c].segment
    0xba, 0xfc, 0x03, 0xb0, 0x08, 0xee, // MCR = OUT2
    0xba, 0xf9, 0x03, 0xb0, 0x02, 0xee, // IER = ETBEI
    0xfb, // sti
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    0xba, 0xfa, 0x03, 0xec, // isr: in al, 0x3fa (IIR)
    0xe6, 0xf4, 0xf4, // out 0xf4, al; hlt
  ]);
}

/** l: in al,0x3fd; test al,1 (DR); jz l; in al,0x3f8; out 0xf4,al; hlt — exits with the first received byte. */
const ECHO_CODE = [0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf8, 0xba, 0xf8, 0x03, 0xec, 0xe6, 0xf4, 0xf4];

/** Polls LSR.THRE before every THR write (what Linux's console does): l: in 0x3fd; test 0x20; jz l; lodsb; … */
function politeHelloCode(msg: string): Uint8Array {
  const msgAddr = LOAD + 0x1b;
  const code = [
    0xbe, msgAddr & 0xff, msgAddr >> 8, // mov si, msg
    0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xf8, // l: mov dx,0x3fd; in al,dx; test al,0x20; jz l
    0xac, 0x84, 0xc0, 0x74, 0x06, // lodsb; test al,al; jz done
    0xba, 0xf8, 0x03, 0xee, 0xeb, 0xed, // mov dx,0x3f8; out dx,al; jmp l
    0xb0, 0x00, 0xe6, 0xf4, 0xf4, // done: mov al,0; out 0xf4,al; hlt
  ];
  return Uint8Array.from([...code, ...Buffer.from(msg + '\0', 'latin1')]);
}

describe.skipIf(!hasKvm)('serial on /dev/kvm', () => {
  it('answers LSR polls on the vCPU thread: one main-thread exit per character instead of two', async () => {
    const msg = 'x'.repeat(200) + '\n';
    const exits: Record<string, number> = {};
    for (const fastPath of [true, false]) {
      const chunks: Uint8Array[] = [];
      const m = new Machine({
        config: { name: `serial-fast-${fastPath}`, memory: 16, cpus: 1 },
        plugins: [testPlatform(false), serial({ output: 'none', console: false, fastPath, sink: (b) => chunks.push(b) }), realModeBoot(politeHelloCode(msg))],
        log: silentLogger(),
      });
      const r = await run(m);
      expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
      expect(Buffer.concat(chunks).toString()).toBe(msg);
      exits[String(fastPath)] = m.stats.mainExits;
    }
    expect(exits.true).toBeLessThanOrEqual(msg.length + 5);
    expect(exits.false).toBeGreaterThanOrEqual(2 * msg.length);
  });

  it('inject() reaches a guest polling LSR.DR', async () => {
    const m = new Machine({
      config: { name: 'serial-inject', memory: 16, cpus: 1 },
      plugins: [testPlatform(false), serial({ output: 'none', console: false, input: 'none' }), realModeBoot(Uint8Array.from(ECHO_CODE))],
      log: silentLogger(),
    });
    await m.start();
    m.api.use<SerialApi>('serial')!.inject('Z');
    const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99 }), 30_000);
    const r = await m.waitForStop();
    clearTimeout(t);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0x5a });
  });

  it("input: 'stdin' feeds the guest from the process's stdin (a pipe)", () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmkit-serial-stdin-'));
    try {
      const kernel = pathToFileURL(createRequire(import.meta.url).resolve('@kvmkit/kernel')).href;
      const plugin = pathToFileURL(fileURLToPath(new URL('../dist/index.js', import.meta.url))).href;
      const script = join(dir, 'run.mjs');
      writeFileSync(script, `
        import { Machine, silentLogger } from ${JSON.stringify(kernel)};
        import serial from ${JSON.stringify(plugin)};
        const seg = (type) => ({ base: 0n, limit: 0xffff, selector: 0, type, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 });
        const boot = { name: 'b', version: '0.1.0', provides: ['firmware'], apply(m) {
          m.hooks.devices.tap('b', (reg) => reg.addPio(0xf4, 1, { read() {}, write: (_o, d) => m.requestStop({ reason: 'guest-exit', exitCode: d[0] }) }, 'exit'));
          m.hooks.boot.tapPromise('b', async (ctx) => { ctx.memory.write(0x1000, Uint8Array.from(${JSON.stringify(ECHO_CODE)}));
            return { loader: 't', vcpus: [{ regs: { rip: 0x1000n, rsp: 0x8000n, rflags: 2n }, sregs: { cs: seg(0xb), ds: seg(3), es: seg(3), ss: seg(3) } }] }; }); } };
        const m = new Machine({ config: { name: 'stdin', memory: 16, cpus: 1 }, plugins: [serial({ input: 'stdin', output: 'none', console: false }), boot], log: silentLogger() });
        await m.start();
        const t = setTimeout(() => void m.stop({ reason: 'user', exitCode: 99 }), 20000);
        const r = await m.waitForStop();
        clearTimeout(t);
        process.exitCode = r.exitCode;
      `);
      const p = spawnSync(process.execPath, [script], { input: 'Q', timeout: 30_000 });
      expect(p.stderr.toString()).toBe('');
      expect(p.status).toBe(0x51); // 'Q' read from the pipe by the guest
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('guest bytes written to THR arrive in the sink, output() and waitFor(); cmdline gets console=ttyS0', async () => {
    const chunks: Uint8Array[] = [];
    const m = new Machine({
      config: { name: 'serial-hello', memory: 16, cpus: 1 },
      plugins: [testPlatform(false), serial({ output: 'none', sink: (b) => chunks.push(b) }), realModeBoot(helloCode(MSG))],
      log: silentLogger(),
    });
    await m.start(); // plugins are applied (and the API published) in start()
    const api = m.api.use<SerialApi>('serial')!;
    await expect(api.waitFor('16550A', 30_000)).resolves.toBe('16550A');
    const r = await m.waitForStop();
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0 });
    expect(Buffer.concat(chunks).toString()).toBe(MSG);
    expect(api.text()).toBe(MSG);
    expect(m.kernelCmdline).toBe('console=ttyS0');
  });

  it('raises IRQ 4 through the in-kernel PIC: the guest ISR reads IIR = THRE (0x02)', async () => {
    const m = new Machine({
      config: { name: 'serial-irq', memory: 16, cpus: 1 },
      plugins: [testPlatform(true), serial({ output: 'none', console: false, out2Gate: true }), realModeBoot(irqCode())],
      log: silentLogger(),
    });
    const r = await run(m);
    expect(r).toMatchObject({ reason: 'guest-exit', exitCode: 0x02 });
  });

  it('control: without an irqchip the interrupt never arrives and the halted guest stops with halt', async () => {
    const m = new Machine({
      config: { name: 'serial-noirq', memory: 16, cpus: 1 },
      plugins: [testPlatform(false), serial({ output: 'none', console: false }), realModeBoot(irqCode())],
      log: silentLogger(),
    });
    const r = await run(m);
    expect(r.reason).toBe('halt');
  });
});
