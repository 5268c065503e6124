import { resolve } from 'node:path';
import { connectControl, controlSocketPath } from '@kvmkit/control';
import type { ControlArgs } from './args.js';

/** Runs a control command against a running VM; returns what to print. */
export async function runControl(a: ControlArgs, cwd: string): Promise<unknown> {
  // The VM process has its own working directory: hand it absolute paths.
  const path = a.target.includes('/') ? resolve(cwd, a.target) : controlSocketPath(a.target);
  const dest = a.path === undefined ? '' : /^[^/]*:\d+$/.test(a.path) ? a.path : resolve(cwd, a.path);
  const c = await connectControl(path);
  try {
    switch (a.command) {
      case 'status':
        return await c.status();
      case 'pause':
        return await c.pause();
      case 'resume':
        return await c.resume();
      case 'stop':
        return await c.stop();
      case 'snapshot':
        return await c.snapshot({ path: dest, strategy: a.diff ? 'diff' : 'full', ...(a.then ? { then: a.then } : {}) });
      case 'migrate':
        return await c.migrate({ to: dest, ...(a.downtimeMs !== undefined ? { downtimeMs: a.downtimeMs } : {}), ...(a.maxRounds !== undefined ? { maxRounds: a.maxRounds } : {}) });
    }
  } finally {
    c.close();
  }
}
