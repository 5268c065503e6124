// One VM, three host profiles. The VM says what the guest is; each host section adds what that hardware can do.
//   node packages/cli/dist/bin.js config --print --host numa-big --config examples/per-host/kvmkit.config.mjs
//   node packages/cli/dist/bin.js run --config examples/per-host/kvmkit.config.mjs        (host chosen by match)
// Plugin short names (`pinning`) resolve to @kvmkit/plugin-<name>; `./probe-guest.mjs` is relative to this file.
export default {
  vms: {
    probe: {
      description: 'Flat ring-3 probe guest: touches 32 MiB of RAM on every vCPU, exits with 0 through port 0xf4',
      memory: 64,
      cpus: 2,
      plugins: [
        'platform-pc',
        { name: './probe-guest.mjs', options: { touchMiB: 32 } },
        // The guest's CPU shape is part of the VM: every host keeps this topology.
        { name: 'cpu-template', options: { template: 'host', topology: { sockets: 1, cores: 2, threads: 1 } } },
      ],
    },
  },
  hosts: {
    // A 2-socket NUMA server: vCPUs spread over cores, main thread anywhere, guest RAM from 1 GiB pages on node 0,
    // a migration-safe CPU model so the VM can move between servers of different generations.
    'numa-big': {
      description: 'big NUMA host: pinning + 1 GiB hugetlb pages on node 0 + baseline-v2 CPU',
      match: { hostname: ['numa-*', 'big-*'] },
      plugins: [
        { name: 'pinning', options: { policy: 'spread', io: 'all' } },
        { name: 'hugepages', options: { mode: 'hugetlb', size: '1G', fallback: 'error' } },
        { name: 'numa', options: { policy: 'bind', nodes: [0] } },
        // Same plugin as the VM's: these options are deep-merged over the VM's (topology stays).
        { name: 'cpu-template', options: { template: 'baseline-v2' } },
      ],
    },
    // A laptop: transparent huge pages if enabled, plain pages otherwise (a warning, not an error).
    laptop: {
      description: 'laptop: THP, nothing pinned',
      match: { hostname: ['*-laptop', 'laptop*', '*-thinkpad'] },
      plugins: [{ name: 'hugepages', options: { mode: 'thp', fallback: 'none' } }],
    },
    // The development machines: KVM through the kvm_pvm module (nested PVM).
    'pvm-nested': {
      description: 'nested PVM host: host-pvm compatibility profile, THP, nested virtualization reported as unavailable',
      match: { kvmModule: 'kvm_pvm' },
      plugins: [
        'host-pvm',
        { name: 'hugepages', options: { mode: 'thp', fallback: 'none' } },
        { name: 'nested-virt', options: { onUnsupported: 'warn' } },
      ],
    },
    // Any other host: the VM as defined.
    default: {},
  },
};
