export const MAIN_HELP = `kvmkit — compose KVM hypervisors from plugins

Usage: kvmkit <command> [options]

Commands:
  run [vm]        start a VM from the config file, or from flags alone
  config --print  show how the config resolves on this host (JSON)
  doctor          check /dev/kvm, the KVM API and capabilities, and the kind of host
  restore SNAP    start a VM from a snapshot (run options apply; --lazy maps memory on demand)
  snapshot VM P   write a snapshot of a running VM to P (--diff: only pages changed since the last one)
  migrate VM DEST live-migrate a running VM to DEST (a 'kvmkit run --incoming DEST' process)
  status|pause|resume|stop VM   control a running VM

Options:
  -h, --help      help (also: kvmkit <command> --help)
  -V, --version   print the version

Config: kvmkit.config.{js,mjs,cjs,ts,json,yaml,yml}, .kvmkitrc*, or package.json#kvmkit, searched from the
current directory up to the project root (see @kvmkit/config's README).
Exit codes: 0 ok; 1 runtime error; 2 usage or config error; run: the guest's exit code, 130/143 on SIGINT/SIGTERM.
`;

export const RUN_HELP = `Usage: kvmkit run [vm | --vm NAME] [options]

Starts a VM and waits until it stops. The exit code is the guest's: the value written to the debug-exit
port (0xf4, plugin platform-pc), 0 for a halt, shutdown or clean stop, 1 for a triple fault or other guest
error (printed as "error KVMKIT_ERR_…: …"), 130 on Ctrl-C (SIGINT), 143 on SIGTERM.

Config mode (a VM name, --config or --host given, or neither --kernel nor --plugin): the VM comes from the config
file, with the plugins of the host section that matches this host; flags override its values.
Flag-only mode (no VM name, --config or --host, and --kernel or --plugin given): no config file is read; the VM is
built from the flags and gets the serial and platform-pc plugins by default (--no-defaults leaves them out).

Options:
  --vm NAME              the VM to run (same as the positional name; default: the only VM in the file)
  --config FILE          config file (default: search from the current directory)
  --host NAME            use the host section NAME (default: the first whose match fits, else "default")
  --memory MIB           guest RAM in MiB (default 256)
  --cpus N               number of vCPUs (default 1)
  --kernel FILE          Linux kernel (bzImage, or vmlinux with a PVH note); adds the boot-linux plugin
  --initrd FILE          initramfs for --kernel (boot-linux option initrd)
  --cmdline STRING       kernel command line (replaces the config's)
  --plugin NAME[:JSON]   add a plugin, or merge options into one the VM already has; repeatable.
                         NAME: short name (serial → @kvmkit/plugin-serial), package name, or ./path.mjs
                         JSON: an options object, e.g. --plugin 'serial:{"output":"./console.log"}'
  --no-defaults          flag-only mode: do not add serial and platform-pc
  --log-level LEVEL      fatal, error, warn, info (default), debug, trace or silent
  --dry-run              print the resolved VM (like config --print) and exit without starting it
  --control PATH         control socket (default $XDG_RUNTIME_DIR/kvmkit/<vm>.sock or /run/kvmkit/<vm>.sock)
  --no-control           no control socket (kvmkit snapshot/migrate/status cannot reach this VM)
  --restore SNAPSHOT     start from a snapshot's state file instead of booting (same as kvmkit restore)
  --lazy                 with --restore: map the memory file copy-on-write instead of reading it first
  --incoming ADDR        wait for a live migration on ADDR (socket path or host:port, loopback) and run it
  -h, --help             this help

Relative paths in flags are relative to the current directory; in the config file, to the file's directory.
`;

export const CONFIG_HELP = `Usage: kvmkit config --print [--vm NAME] [--host NAME] [--config FILE] [--hostname NAME]

Prints, as JSON, how the config file resolves on this host: the config file, the VM with its memory, cpus and
cmdline, its plugins with their final options (and which config keys they came from), plugins a host section
removed, and the host section chosen and why (--host, a hostname/kernel-module match, or "default").

Options:
  --print            print the resolved config (the only action for now)
  --vm NAME          the VM to resolve (default: the only VM in the file)
  --host NAME        use this host section instead of matching
  --hostname NAME    match host sections as if this were the hostname
  --config FILE      config file (default: search from the current directory)
  -h, --help         this help
`;

export const DOCTOR_HELP = `Usage: kvmkit doctor [--json]

Checks that this host can run kvmkit VMs: /dev/kvm exists and can be opened read-write, the KVM API version
is 12, the capabilities kvmkit needs are present (and which optional ones are), and what kind of host this
is — in particular a nested PVM host (kvm_pvm loaded), where guest ring 0 is emulated and the host-pvm plugin
profile is needed. Suggests the host section to add to the config.

Options:
  --json       print the findings as JSON
  -h, --help   this help

Exit code: 0 when kvmkit can run VMs here, 1 when not.
`;

export const CONTROL_HELP = `Usage:
  kvmkit snapshot VM PATH [--diff] [--then resume|pause|stop] [--json]
  kvmkit migrate VM DESTINATION [--downtime-ms N] [--max-rounds N] [--json]
  kvmkit status|pause|resume|stop VM [--json]

VM is a VM name (its control socket at $XDG_RUNTIME_DIR/kvmkit/<vm>.sock or /run/kvmkit/<vm>.sock) or the
path of a control socket (anything with a '/'). The VM must run in a 'kvmkit run' process (it serves the
socket unless --no-control).
  snapshot   writes PATH (state file, checksummed) and a memory file beside it; --diff writes only the pages
             dirtied since the previous snapshot of this VM (a chain; 'kvmkit restore' follows it).
  migrate    pre-copy live migration to a 'kvmkit run --incoming DESTINATION' process with the same VM
             definition; the source stops once the destination runs. Prints the report (rounds, downtime).
Exit code: 0 done; 1 error (e.g. KVMKIT_ERR_CONTROL_CONNECT when nothing serves the socket); 2 usage.
`;
