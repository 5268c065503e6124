// A Linux microVM: 2 vCPUs, 256 MiB, serial console, the small guest kernel booted directly (PVH).
//   npx kvmkit run --config examples/linux-microvm/kvmkit.config.mjs linux
// The kernel comes from @kvmkit/testkit's findGuestKernel(): $KVMKIT_GUEST_DIR, ../shared/guest beside the
// repository, or what scripts/build-guest-kernel.sh built (guest-kernel/build/). See README.md.
import { findGuestKernel } from '@kvmkit/testkit';

const guest = findGuestKernel();
// Relative paths in `kernel`/`initrd` are resolved against this file's directory by @kvmkit/config.
const dir = guest?.dir ?? '../../guest-kernel/build';

export default {
  vms: {
    linux: {
      description: 'Linux 6.1 with a spinning /init (PVH entry)',
      memory: 256,
      cpus: 2,
      // The user's parameters come last on the kernel command line.
      cmdline: 'panic=-1',
      plugins: [
        '@kvmkit/plugin-platform-pc',
        { name: '@kvmkit/plugin-serial', options: { console: true } },
        {
          name: '@kvmkit/plugin-boot-linux',
          options: { kernel: `${dir}/vmlinux`, initrd: `${dir}/spin.cpio` },
        },
      ],
    },
    // The same kernel as a bzImage (64-bit boot protocol). Its XZ decompressor runs in guest ring 0,
    // which the nested PVM host emulates: expect a much longer boot there.
    'linux-bzimage': {
      memory: 256,
      cpus: 2,
      cmdline: 'panic=-1',
      plugins: [
        '@kvmkit/plugin-platform-pc',
        { name: '@kvmkit/plugin-serial', options: { console: true } },
        { name: '@kvmkit/plugin-boot-linux', options: { kernel: `${dir}/bzImage`, initrd: `${dir}/spin.cpio`, format: 'bzimage' } },
      ],
    },
  },
  hosts: {
    // Nested PVM hosts (the development machines): the guest kernel needs `noxsave clearcpuid=…`.
    pvm: {
      description: 'KVM through the PVM module: compatibility cmdline and CPUID profile',
      match: { kvmModule: 'kvm_pvm' },
      plugins: ['@kvmkit/plugin-host-pvm'],
    },
    // Anything else: real KVM, nothing to add.
    default: {},
  },
};
