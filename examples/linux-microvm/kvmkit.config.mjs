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
    // The kernel with an ext4 root disk (virtio-blk) and a NIC (virtio-net on TAP `kvmkit0`, 10.77.0.2/24):
    //   examples/linux-microvm/make-rootfs.sh   (builds ./build/rootfs.ext4 from the spin initramfs)
    // No initramfs: the kernel mounts /dev/vda read-write and runs /init from it. See README.md for the host side.
    'linux-net': {
      description: 'Linux 6.1 with an ext4 root on virtio-blk and virtio-net on a TAP',
      memory: 256,
      cpus: 1,
      cmdline: 'panic=-1 root=/dev/vda rw rootfstype=ext4 init=/init ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off',
      plugins: [
        '@kvmkit/plugin-platform-pc',
        { name: '@kvmkit/plugin-serial', options: { console: true } },
        { name: '@kvmkit/plugin-virtio-blk', options: { path: './build/rootfs.ext4' } },
        { name: '@kvmkit/plugin-virtio-net', options: { tap: 'kvmkit0', mac: '52:54:00:4b:56:02' } },
        '@kvmkit/plugin-virtio-rng',
        { name: '@kvmkit/plugin-boot-linux', options: { kernel: `${dir}/vmlinux` } },
      ],
    },
    // The same kernel as a bzImage (64-bit boot protocol). boot-linux decompresses its XZ payload on the host
    // (decompress: 'auto'), so it boots as fast as the vmlinux; decompress: 'guest' runs the kernel's own
    // decompressor in guest ring 0 instead (most of an hour on the nested PVM hosts, which emulate ring 0).
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
