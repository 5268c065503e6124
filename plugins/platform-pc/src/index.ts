import { KvmkitError, checkOptions, type Plugin, type MachineApi, type Vm } from '@kvmkit/kernel';
import { Cmos, type CmosState } from './cmos.js';
import { I8042, type I8042State } from './i8042.js';
import { DebugExit, BootTimer, PostCode, PortB, type BootTime } from './ports.js';

export { Cmos, RTC, REG_B, REG_C, REG_A_UIP, REG_D_VRT } from './cmos.js';
export type { CmosOptions, CmosState } from './cmos.js';
export { I8042, STATUS as I8042_STATUS, CTR as I8042_CTR, CMD as I8042_CMD } from './i8042.js';
export type { I8042Options, I8042State } from './i8042.js';
export { DebugExit, BootTimer, PostCode, PortB, leValue } from './ports.js';
export type { BootTime } from './ports.js';

const NAME = 'platform-pc';
const VERSION = '0.1.0';
export const PLATFORM_STATE_VERSION = 1;
/** Where KVM puts the three-page TSS and the identity-map page real-mode emulation needs (as QEMU/Firecracker). */
export const TSS_ADDR = 0xfffbd000;
export const IDENTITY_MAP_ADDR = 0xfffbc000n;

export const PORTS = { I8042_DATA: 0x60, PORT_B: 0x61, I8042_CMD: 0x64, CMOS: 0x70, POST: 0x80, DEBUG_EXIT: 0xf4, BOOT_TIMER: 0xf5 } as const;

export interface PlatformPcOptions {
  /** KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC, LAPICs (default true). */
  irqchip?: boolean;
  /** KVM_CREATE_PIT2 with the dummy speaker port 0x61 (default true). */
  pit?: boolean;
  /** i8042 keyboard controller at 0x60/0x64 (default true). */
  i8042?: boolean;
  /** CMOS RAM / RTC at 0x70/0x71 (default true). */
  rtc?: boolean;
  /** Debug-exit port 0xf4 (default true). */
  debugExit?: boolean;
  /** Boot-timer port 0xf5 (default true). */
  bootTimer?: boolean;
  /** POST-code port 0x80 (default true). */
  post?: boolean;
}

/** Published with `machine.provide('platform-pc', api)`. */
export interface PlatformPcApi {
  /** Every boot-timer mark so far (ms since the VMM process started). */
  bootTimes(): BootTime[];
  readonly cmos: Cmos | undefined;
  readonly i8042: I8042 | undefined;
}

/** Section 'platform-pc' version 1. */
export interface PlatformPcState {
  /** KVM_GET_IRQCHIP for chips 0 (PIC master), 1 (PIC slave), 2 (IOAPIC); null without an irqchip. */
  irqchip: Uint8Array[] | null;
  /** KVM_GET_PIT2 (struct kvm_pit_state2); null without a PIT. */
  pit: Uint8Array | null;
  /** KVM_GET_CLOCK (kvmclock ns). */
  clock: bigint;
  cmos: CmosState | null;
  i8042: I8042State | null;
}

const SCHEMA = {
  irqchip: { type: 'boolean' },
  pit: { type: 'boolean' },
  i8042: { type: 'boolean' },
  rtc: { type: 'boolean' },
  debugExit: { type: 'boolean' },
  bootTimer: { type: 'boolean' },
  post: { type: 'boolean' },
} as const;

function stateError(msg: string): KvmkitError {
  return new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `platform-pc state: ${msg}`);
}

/** Reads this plugin's kernel-side state (irqchip, PIT, clock). */
export function saveVmState(vm: Vm): Pick<PlatformPcState, 'irqchip' | 'pit' | 'clock'> {
  return {
    irqchip: vm.hasIrqchip ? [0, 1, 2].map((i) => vm.getIrqchip(i)) : null,
    pit: vm.hasPit ? vm.getPit2() : null,
    clock: vm.getClock().clock,
  };
}

/** Writes irqchip, PIT and clock back; the VM must have been created with the same irqchip/PIT options. */
export function restoreVmState(vm: Vm, s: Pick<PlatformPcState, 'irqchip' | 'pit' | 'clock'>): void {
  if (s.irqchip !== null) {
    if (!Array.isArray(s.irqchip) || s.irqchip.length !== 3 || !s.irqchip.every((c) => c instanceof Uint8Array)) throw stateError('irqchip must be 3 byte arrays');
    if (!vm.hasIrqchip) throw stateError('the saved machine had an in-kernel irqchip; this one has none (option irqchip)');
    s.irqchip.forEach((c, i) => vm.setIrqchip(i, c));
  }
  if (s.pit !== null) {
    if (!(s.pit instanceof Uint8Array)) throw stateError('pit must be a byte array');
    if (!vm.hasPit) throw stateError('the saved machine had an in-kernel PIT; this one has none (option pit)');
    vm.setPit2(s.pit);
  }
  if (typeof s.clock !== 'bigint' || s.clock < 0n) throw stateError('clock must be a non-negative bigint');
  vm.setClock(s.clock);
}

/**
 * The PC platform: in-kernel irqchip + PIT, TSS/identity-map addresses, i8042 (reset), CMOS/RTC, debug-exit
 * (0xf4), boot-timer (0xf5), POST port (0x80), and port 0x61 when there is no in-kernel PIT.
 */
export default function platformPc(options: PlatformPcOptions = {}): Plugin {
  return {
    name: NAME,
    version: VERSION,
    kernel: '^0.1.0',
    provides: ['platform'],
    options,
    validateOptions(o) {
      checkOptions(NAME, o, SCHEMA);
    },
    apply(machine: MachineApi, { log }) {
      const o = (options ?? {}) as PlatformPcOptions;
      const want = (k: keyof PlatformPcOptions) => o[k] ?? true;
      const cfg = machine.config;
      const cmos = want('rtc') ? new Cmos({ memoryMiB: cfg.memory, cpus: cfg.cpus }) : undefined;
      let kbdLine: (level: boolean) => void = () => {};
      const i8042 = want('i8042')
        ? new I8042({
            setKbdIrq: (l) => kbdLine(l),
            reset: () => {
              log.info('i8042 reset line pulsed by the guest');
              machine.requestReset('i8042');
            },
          })
        : undefined;
      const bootTimer = new BootTimer((t) => log.info({ ms: t.ms, value: t.value }, 'boot-timer'));
      const api: PlatformPcApi = { bootTimes: () => bootTimer.times.map((t) => ({ ...t })), cmos, i8042 };
      machine.provide(NAME, api);

      machine.hooks.vmCreated.tapPromise(NAME, async (vm) => {
        vm.setTssAddr(TSS_ADDR);
        vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
        if (want('irqchip')) vm.createIrqchip();
        if (want('pit')) {
          if (!vm.hasIrqchip) throw new KvmkitError('KVMKIT_ERR_PLUGIN_OPTIONS', 'platform-pc: the in-kernel PIT needs the in-kernel irqchip (set pit: false or irqchip: true)');
          vm.createPit2(true);
        }
        log.debug({ irqchip: vm.hasIrqchip, pit: vm.hasPit }, 'platform created');
      });

      machine.hooks.devices.tapPromise(NAME, async (reg) => {
        if (i8042) {
          const irq = reg.allocateIrq('i8042', 1);
          kbdLine = (l) => reg.setIrq(irq, l);
          reg.addPio(PORTS.I8042_DATA, 1, { read: (_o, d) => i8042.read(0, d), write: (_o, d) => i8042.write(0, d) }, 'i8042-data');
          reg.addPio(PORTS.I8042_CMD, 1, { read: (_o, d) => i8042.read(4, d), write: (_o, d) => i8042.write(4, d) }, 'i8042-cmd');
        }
        // With KVM's PIT (KVM_PIT_SPEAKER_DUMMY) port 0x61 is answered in the kernel and never exits to us.
        if (!reg.vm.hasPit) reg.addPio(PORTS.PORT_B, 1, new PortB(), 'port-b');
        if (cmos) {
          reg.allocateIrq('rtc', 8);
          reg.addPio(PORTS.CMOS, 2, cmos, 'cmos-rtc');
        }
        if (want('post')) reg.addPio(PORTS.POST, 1, new PostCode(), 'post');
        if (want('debugExit')) {
          reg.addPio(PORTS.DEBUG_EXIT, 1, new DebugExit((code, value) => {
            log.debug({ code, value }, 'debug-exit');
            machine.requestStop({ reason: 'guest-exit', exitCode: code, message: `guest wrote 0x${value.toString(16)} to the debug-exit port` });
          }), 'debug-exit');
        }
        if (want('bootTimer')) reg.addPio(PORTS.BOOT_TIMER, 1, bootTimer, 'boot-timer');
      });

      machine.hooks.saveState.tapPromise(NAME, async (w) => {
        const vm = machine.vm;
        if (!vm) throw new KvmkitError('KVMKIT_ERR_STATE', 'platform-pc: no VM to save');
        const data: PlatformPcState = { ...saveVmState(vm), cmos: cmos?.save() ?? null, i8042: i8042?.save() ?? null };
        w.write(NAME, PLATFORM_STATE_VERSION, data);
      });

      machine.hooks.restoreState.tapPromise(NAME, async (r) => {
        const vm = machine.vm;
        if (!vm) throw new KvmkitError('KVMKIT_ERR_STATE', 'platform-pc: no VM to restore into');
        const s = r.read<PlatformPcState>(NAME, PLATFORM_STATE_VERSION);
        if (typeof s !== 'object' || s === null) throw stateError('not an object');
        restoreVmState(vm, s);
        if (cmos && s.cmos) cmos.restore(s.cmos);
        if (i8042 && s.i8042) i8042.restore(s.i8042);
      });
    },
  };
}

export { platformPc };
