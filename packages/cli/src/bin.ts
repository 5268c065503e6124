#!/usr/bin/env node
import { main } from './main.js';

// Exit explicitly: vCPU workers and fd watchers are released by Machine.stop(), but a plugin that leaves a handle
// open must not keep the command alive after the VM stopped. stdout/stderr writes are synchronous for files and
// pipes on Linux, so nothing printed is lost.
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`error KVMKIT_ERR_INTERNAL: ${(e as Error)?.stack ?? e}\n`);
    process.exit(1);
  },
);
