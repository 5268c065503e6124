import { Machine, silentLogger, type Plugin, type MachineApi, type CpuidEntry, type Logger } from '@kvmkit/kernel';
import bootFlat from '@kvmkit/plugin-boot-flat';

/** Result of `doctorCheck()`: does guest CPUID follow KVM_SET_CPUID2 on this host? */
export interface CpuidDoctorReport {
  /** True when the guest saw the vendor string and max leaf that KVM_SET_CPUID2 installed. */
  honoured: boolean;
  set: { vendor: string; maxLeaf: number };
  /** What KVM_GET_CPUID2 returned for the vCPU (KVM's copy). */
  kvmHolds: { vendor: string; maxLeaf: number };
  /** Whether KVM kept a leaf-1 ECX feature mask (all features cleared but 'hypervisor'); false where the host rewrites feature leaves. */
  featureMaskHeld: boolean;
  /** What CPUID leaf 0 returned inside the guest (ring 3). */
  guest: { vendor: string; maxLeaf: number };
  message: string;
}

const RESULT = 0xa000;
/** Ring-3 guest: CPUID leaf 0, store EAX/EBX/ECX/EDX at 0xa000, `out 0xf4` (stop). */
const CPUID_GUEST = new Uint8Array([
  0x31, 0xc0, //                               xor eax, eax
  0x31, 0xc9, //                               xor ecx, ecx
  0x0f, 0xa2, //                               cpuid
  0x89, 0x04, 0x25, 0x00, 0xa0, 0x00, 0x00, // mov [0xa000], eax
  0x89, 0x1c, 0x25, 0x04, 0xa0, 0x00, 0x00, // mov [0xa004], ebx
  0x89, 0x0c, 0x25, 0x08, 0xa0, 0x00, 0x00, // mov [0xa008], ecx
  0x89, 0x14, 0x25, 0x0c, 0xa0, 0x00, 0x00, // mov [0xa00c], edx
  0x31, 0xc0, //                               xor eax, eax
  0xe6, 0xf4, //                               out 0xf4, al
  0xeb, 0xfe, //                               jmp $
]);

const TEST_VENDOR = 'KvmkitDoctor';
const TEST_MAX_LEAF = 5;
/** Leaf 1 ECX with every feature cleared but 'hypervisor' (bit 31). */
const TEST_L1_ECX = 0x80000000;

function vendorRegs(v: string): { ebx: number; edx: number; ecx: number } {
  const b = Buffer.from(v, 'latin1');
  return { ebx: b.readUInt32LE(0), edx: b.readUInt32LE(4), ecx: b.readUInt32LE(8) };
}
function vendorOf(ebx: number, ecx: number, edx: number): string {
  const b = Buffer.alloc(12);
  b.writeUInt32LE(ebx >>> 0, 0);
  b.writeUInt32LE(edx >>> 0, 4);
  b.writeUInt32LE(ecx >>> 0, 8);
  return b.toString('latin1').replace(/[^\x20-\x7e]/g, '?');
}

/**
 * Runs a tiny ring-3 guest that executes CPUID leaf 0 after KVM_SET_CPUID2 installed a different vendor string
 * and max leaf, and compares what the guest saw with what KVM holds. On hosts where guest CPUID is not trapped
 * (nested PVM: ring-3 CPUID runs natively) the guest sees the real CPU and templates only shape what KVM holds
 * and what a guest kernel reads through emulated paths — `honoured: false`.
 */
export async function doctorCheck(opts: { kvmPath?: string; log?: Logger; timeoutMs?: number } = {}): Promise<CpuidDoctorReport> {
  let guest: { vendor: string; maxLeaf: number } | undefined;
  let kvmHolds: { vendor: string; maxLeaf: number } | undefined;
  let featureMaskHeld = false;
  const probe: Plugin = {
    name: 'cpuid-doctor',
    version: '0.1.0',
    apply(m: MachineApi) {
      m.hooks.cpuid.tap('cpuid-doctor', (entries: CpuidEntry[]) => entries.map((e) =>
        e.function === 0 ? { ...e, eax: TEST_MAX_LEAF, ...vendorRegs(TEST_VENDOR) } : e.function === 1 ? { ...e, ecx: TEST_L1_ECX } : e));
      m.hooks.vcpuCreated.tapPromise('cpuid-doctor', async ({ vcpu }) => {
        const held = vcpu.getCpuid();
        const l0 = held.find((e) => e.function === 0);
        if (l0) kvmHolds = { vendor: vendorOf(l0.ebx, l0.ecx, l0.edx), maxLeaf: l0.eax };
        featureMaskHeld = held.find((e) => e.function === 1)?.ecx === TEST_L1_ECX;
      });
      m.hooks.devices.tap('cpuid-doctor', (reg) =>
        reg.addPio(0xf4, 1, {
          read() {},
          write: () => {
            const mem = m.memory!;
            guest = { maxLeaf: mem.readU32(RESULT), vendor: vendorOf(mem.readU32(RESULT + 4), mem.readU32(RESULT + 8), mem.readU32(RESULT + 12)) };
            m.requestStop({ reason: 'guest-exit', exitCode: 0 });
          },
        }, 'cpuid-doctor'));
    },
  };
  const m = new Machine({ config: { name: 'cpuid-doctor', memory: 4, cpus: 1 }, plugins: [probe, bootFlat({ image: CPUID_GUEST, ring: 3 })], log: opts.log ?? silentLogger(), ...(opts.kvmPath ? { kvmPath: opts.kvmPath } : {}) });
  await m.start();
  const timer = setTimeout(() => void m.stop({ reason: 'user', exitCode: 1, message: 'cpuid doctor timed out' }), opts.timeoutMs ?? 10_000);
  const r = await m.waitForStop();
  clearTimeout(timer);
  if (!guest || !kvmHolds) throw new Error(`cpuid doctor guest did not report (${r.reason}: ${r.message ?? ''})`);
  const set = { vendor: TEST_VENDOR, maxLeaf: TEST_MAX_LEAF };
  const honoured = guest.vendor === set.vendor && guest.maxLeaf === set.maxLeaf;
  const message = honoured
    ? 'guest CPUID follows KVM_SET_CPUID2: CPU templates and topology are what the guest sees'
    : `guest CPUID is not trapped on this host: KVM holds vendor "${kvmHolds.vendor}" max leaf 0x${kvmHolds.maxLeaf.toString(16)}, the guest saw "${guest.vendor}" max leaf 0x${guest.maxLeaf.toString(16)}; templates shape only what KVM holds (tell guests via their cmdline, e.g. clearcpuid=)`;
  const featureNote = featureMaskHeld ? '' : '; KVM also rewrote the leaf-1 feature mask it was given (feature leaves come from the host CPU)';
  return { honoured, set, kvmHolds, featureMaskHeld, guest, message: message + featureNote };
}
