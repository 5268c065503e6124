/**
 * vCPU worker: owns one vCPU's KVM_RUN loop. Exits that a worker-side device handler can answer are answered
 * here; unclaimed PIO/MMIO is answered here too (reads 0xff, writes dropped); everything else goes to the main
 * thread through the mailbox (see protocol.ts).
 */
import { parentPort, workerData } from 'node:worker_threads';
import * as ffi from '../kvm/ffi.js';
import { KVM, OFF } from '../kvm/ioctls.js';
import { KVM_EXIT } from '../exits.js';
import type { WorkerHandler, WorkerHandlerFactory } from '../bus.js';
import * as P from './protocol.js';

// Tell the spawner that module loading (koffi's native addon included) is over: terminating a worker while koffi
// initialises aborts the whole process (napi_throw during teardown), so terminateVcpuWorker() waits for this.
parentPort!.postMessage({ type: 'loaded' } satisfies P.WorkerMessage);

// A worker is spawned early (while the machine is still being assembled) and gets its init by message, or is
// spawned with it as workerData.
const init: P.WorkerInit = (workerData as P.WorkerInit | null) ?? (await new Promise<P.WorkerInit>((res) => parentPort!.once('message', res)));
const ctrl = new Int32Array(init.ctrl);
const mb = new Int32Array(init.mailbox);
const mbBytes = new Uint8Array(init.mailbox);

function post(m: P.WorkerMessage): void {
  parentPort!.postMessage(m);
}

async function loadHandlers(): Promise<Array<WorkerHandler | undefined>> {
  const out: Array<WorkerHandler | undefined> = [];
  for (const h of init.handlers) {
    const mod = (await import(h.module)) as Record<string, unknown>;
    const f = mod[h.exportName ?? 'default'] as WorkerHandlerFactory | undefined;
    if (typeof f !== 'function') throw new Error(`worker handler ${h.module}#${h.exportName ?? 'default'} is not a function`);
    out.push(f(h.shared, { vcpu: init.index, kind: h.kind, base: h.base }));
  }
  return out;
}

async function main(): Promise<void> {
  const handlers = await loadHandlers();
  // SAFETY: a second mapping of this vCPU's kvm_run page, private to this thread; unmapped before exit.
  const runAddr = ffi.mmap(init.mmapSize, ffi.PROT_READ | ffi.PROT_WRITE, ffi.MAP_SHARED, init.fd, 0);
  const runBuf = ffi.viewOf(runAddr, init.mmapSize);
  const run = new DataView(runBuf);
  const runU8 = new Uint8Array(runBuf);

  // PIO: a direct port → range table (0 = nothing there).
  const pioTable = new Int32Array(0x10000);
  init.pio.forEach((r, i) => pioTable.fill(i + 1, r.base, Math.min(0x10000, r.base + r.size)));
  const mmio = init.mmio;
  const findMmio = (addr: number): P.WorkerRange | undefined => {
    let lo = 0;
    let hi = mmio.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const e = mmio[mid]!;
      if (addr < e.base) hi = mid - 1;
      else if (addr >= e.base + e.size) lo = mid + 1;
      else return e;
    }
    return undefined;
  };

  post({ type: 'ready', tid: ffi.gettid(), thread: ffi.pthreadSelf() });
  // Wait for the go (CMD_RUN after STARTING) — main stores CMD_RUN and STATE_RUNNING then notifies.
  while (Atomics.load(ctrl, P.STATE) === P.ST_STARTING) Atomics.wait(ctrl, P.STATE, P.ST_STARTING);

  const fd = init.fd;
  const wakeFd = init.wakeFd;
  const one = Buffer.alloc(8);
  one.writeBigUInt64LE(1n);
  const RUN = KVM.RUN;
  const R = OFF.kvm_run;
  let exits = 0;
  let pioOff = -1;
  let pioSize = -1;
  let pioView = runU8.subarray(0, 0);
  /** kvm_run.mmio.data views by access length (0..8). */
  const mmioViews = Array.from({ length: 9 }, (_, n) => runU8.subarray(R.mmio_data, R.mmio_data + n));

  /** Hands the current exit to the main thread; returns the action. */
  const toMain = (kind: number, addr: number, size: number, count: number, reason: number): number => {
    mb[P.MB_KIND] = kind;
    mb[P.MB_ADDR_LO] = addr >>> 0;
    mb[P.MB_ADDR_HI] = Math.floor(addr / 0x1_0000_0000);
    mb[P.MB_SIZE] = size;
    mb[P.MB_COUNT] = count;
    mb[P.MB_REASON] = reason;
    mb[P.MB_ACTION] = 0;
    ctrl[P.EXITS_MAIN] = (ctrl[P.EXITS_MAIN]! + 1) | 0;
    Atomics.store(mb, P.MB_STATE, P.MB_REQUEST);
    if (wakeFd >= 0) ffi.writeFd(wakeFd, one);
    else Atomics.notify(mb, P.MB_STATE);
    while (Atomics.load(mb, P.MB_STATE) === P.MB_REQUEST) Atomics.wait(mb, P.MB_STATE, P.MB_REQUEST);
    const action = mb[P.MB_ACTION]!;
    Atomics.store(mb, P.MB_STATE, P.MB_IDLE);
    return action;
  };

  const park = (state: number): boolean => {
    // Returns true to keep running, false to exit the loop.
    runU8[R.immediate_exit] = 0;
    Atomics.store(ctrl, P.STATE, state);
    Atomics.notify(ctrl, P.STATE);
    for (;;) {
      const cmd = Atomics.load(ctrl, P.CMD);
      if (cmd === P.CMD_STOP) return false;
      if (cmd === P.CMD_RUN && state === P.ST_PAUSED) {
        Atomics.store(ctrl, P.STATE, P.ST_RUNNING);
        Atomics.notify(ctrl, P.STATE);
        return true;
      }
      Atomics.wait(ctrl, P.CMD, cmd);
    }
  };

  loop: for (;;) {
    const cmd = Atomics.load(ctrl, P.CMD);
    if (cmd !== P.CMD_RUN) {
      if (cmd === P.CMD_STOP) break;
      if (!park(P.ST_PAUSED)) break;
      continue;
    }
    const r = ffi.ioctlInt(fd, RUN, 0);
    exits++;
    ctrl[P.EXITS] = exits | 0;
    if (r < 0) {
      if (r === -4 /* EINTR */ || r === -11 /* EAGAIN */) {
        // Clear immediate_exit, then re-check CMD at the loop top: a pause that set it after this clear is
        // seen there or makes the next KVM_RUN return at once.
        runU8[R.immediate_exit] = 0;
        continue;
      }
      throw Object.assign(new Error(`KVM_RUN failed: ${ffi.errno()}`), { code: 'KVMKIT_ERR_IOCTL', details: { ioctl: 'KVM_RUN', errno: -r, vcpu: init.index } });
    }
    const reason = run.getUint32(R.exit_reason, true);
    if (reason === KVM_EXIT.IO) {
      const dirOut = runU8[R.io_direction] === 1;
      const size = runU8[R.io_size]!;
      const port = run.getUint16(R.io_port, true);
      const count = run.getUint32(R.io_count, true);
      const off = Number(run.getBigUint64(R.io_data_offset, true));
      const total = size * count;
      if (off + total > init.mmapSize || total > P.MB_DATA_SIZE) continue; // cannot happen with a sane KVM
      const ri = pioTable[port]!;
      if (ri === 0) {
        if (!dirOut) runU8.fill(0xff, off, off + total);
        continue;
      }
      const range = init.pio[ri - 1]!;
      const h = range.handler >= 0 ? handlers[range.handler] : undefined;
      if (h !== undefined && count === 1) {
        // The data offset is fixed per vCPU in practice: reuse the view instead of allocating one per exit.
        if (off !== pioOff || size !== pioSize) {
          pioOff = off;
          pioSize = size;
          pioView = runU8.subarray(off, off + size);
        }
        const data = pioView;
        const ok = dirOut ? h.write?.(port - range.base, data) : h.read?.(port - range.base, data);
        if (ok !== false && (dirOut ? h.write : h.read) !== undefined) continue;
      }
      if (dirOut) mbBytes.set(runU8.subarray(off, off + total), P.MB_DATA);
      const action = toMain(dirOut ? P.MB_KIND_PIO_OUT : P.MB_KIND_PIO_IN, port, size, count, reason);
      if (!dirOut) runU8.set(mbBytes.subarray(P.MB_DATA, P.MB_DATA + total), off);
      if (action === P.ACTION_PARK && !park(P.ST_PARKED)) break loop;
      continue;
    }
    if (reason === KVM_EXIT.MMIO) {
      const addr = Number(run.getBigUint64(R.mmio_phys_addr, true));
      const len = run.getUint32(R.mmio_len, true);
      const isWrite = runU8[R.mmio_is_write] === 1;
      if (len > 8) continue;
      const range = findMmio(addr);
      if (range === undefined) {
        if (!isWrite) runU8.fill(0xff, R.mmio_data, R.mmio_data + len);
        continue;
      }
      const h = range.handler >= 0 ? handlers[range.handler] : undefined;
      if (h !== undefined) {
        const data = mmioViews[len]!;
        const ok = isWrite ? h.write?.(addr - range.base, data) : h.read?.(addr - range.base, data);
        if (ok !== false && (isWrite ? h.write : h.read) !== undefined) continue;
      }
      if (isWrite) mbBytes.set(runU8.subarray(R.mmio_data, R.mmio_data + len), P.MB_DATA);
      const action = toMain(isWrite ? P.MB_KIND_MMIO_WRITE : P.MB_KIND_MMIO_READ, addr, len, 1, reason);
      if (!isWrite) runU8.set(mbBytes.subarray(P.MB_DATA, P.MB_DATA + len), R.mmio_data);
      if (action === P.ACTION_PARK && !park(P.ST_PARKED)) break loop;
      continue;
    }
    if (reason === KVM_EXIT.INTR || reason === KVM_EXIT.IRQ_WINDOW_OPEN) continue;
    // Anything else: copy the run union for the main thread to decode and decide.
    mbBytes.set(runU8.subarray(32, 32 + 256), P.MB_DATA);
    const action = toMain(P.MB_KIND_EXIT, 0, 0, 0, reason);
    if (action === P.ACTION_PARK && !park(P.ST_PARKED)) break;
  }
  Atomics.store(ctrl, P.STATE, P.ST_DONE);
  Atomics.notify(ctrl, P.STATE);
  // SAFETY: no view of runBuf is used after this point.
  ffi.munmap(runAddr, init.mmapSize);
  post({ type: 'done' });
}

main().catch((e: unknown) => {
  const err = e as { code?: string; message?: string; details?: Record<string, unknown> };
  Atomics.store(ctrl, P.STATE, P.ST_DONE);
  Atomics.notify(ctrl, P.STATE);
  post({ type: 'error', error: { code: err.code ?? 'KVMKIT_ERR_VCPU_WORKER', message: err.message ?? String(e), details: err.details ?? {} } });
});
