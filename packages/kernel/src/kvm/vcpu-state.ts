import type { Kvm } from './kvm.js';
import type { Vcpu } from './vcpu.js';
import { KVM_CAP } from './ioctls.js';
import type { MsrEntry, Regs, Sregs } from './types.js';
import { KvmkitError } from '../errors.js';

/** Everything KVM holds for one vCPU, as a plain object (bigint / Uint8Array inside). */
export interface VcpuState {
  index: number;
  regs: Regs;
  sregs: Sregs;
  /** KVM_GET_XSAVE when the host has KVM_CAP_XSAVE, else undefined (then `fpu` is used). */
  xsave?: Uint8Array;
  fpu: Uint8Array;
  xcrs?: Uint8Array;
  msrs: MsrEntry[];
  lapic?: Uint8Array;
  events: Uint8Array;
  mpState: number;
  debugRegs: Uint8Array;
}

/** MSRs KVM reports but that cannot be read back on every host; skipped one by one when GET fails. */
function readMsrs(vcpu: Vcpu, indexes: number[]): MsrEntry[] {
  const out: MsrEntry[] = [];
  let rest = indexes;
  while (rest.length > 0) {
    const got = vcpu.getMsrs(rest);
    out.push(...got);
    // KVM stops at the first MSR it cannot read: skip that one and go on.
    rest = rest.slice(got.length + 1);
  }
  return out;
}

/** Reads a vCPU's complete state. The vCPU must not be inside KVM_RUN (machine paused or not started). */
export function saveVcpuState(kvm: Kvm, vcpu: Vcpu, hasIrqchip: boolean, msrIndexes: number[]): VcpuState {
  const hasXsave = kvm.checkExtension(KVM_CAP.XSAVE) > 0;
  const hasXcrs = kvm.checkExtension(KVM_CAP.XCRS) > 0;
  return {
    index: vcpu.index,
    mpState: vcpu.getMpState(),
    regs: vcpu.getRegs(),
    sregs: vcpu.getSregs(),
    fpu: vcpu.getFpu(),
    ...(hasXsave ? { xsave: vcpu.getXsave() } : {}),
    ...(hasXcrs ? { xcrs: vcpu.getXcrs() } : {}),
    msrs: readMsrs(vcpu, msrIndexes),
    ...(hasIrqchip ? { lapic: vcpu.getLapic() } : {}),
    events: vcpu.getVcpuEvents(),
    debugRegs: vcpu.getDebugRegs(),
  };
}

/**
 * Writes a vCPU's complete state (the order follows what KVM needs: MP state, registers, segments, FPU/XSAVE,
 * XCRs, debug registers, LAPIC after the APIC base in sregs, MSRs, then pending events).
 */
export function restoreVcpuState(vcpu: Vcpu, s: VcpuState): void {
  if (s.index !== vcpu.index) throw new KvmkitError('KVMKIT_ERR_STATE_FORMAT', `vCPU state for ${s.index} applied to vCPU ${vcpu.index}`);
  vcpu.setMpState(s.mpState);
  vcpu.setRegs(s.regs);
  vcpu.setSregs(s.sregs);
  if (s.xsave) vcpu.setXsave(s.xsave);
  else vcpu.setFpu(s.fpu);
  if (s.xcrs) vcpu.setXcrs(s.xcrs);
  vcpu.setDebugRegs(s.debugRegs);
  if (s.lapic) vcpu.setLapic(s.lapic);
  let rest = s.msrs;
  while (rest.length > 0) {
    const n = vcpu.setMsrs(rest);
    rest = rest.slice(n + 1);
  }
  vcpu.setVcpuEvents(s.events);
}
