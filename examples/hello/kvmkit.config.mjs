// `npm run hello` (or `npx kvmkit run --config examples/hello/kvmkit.config.mjs hello`) boots this VM:
// 2 vCPUs, each prints a greeting on the serial port and halts.
import { helloImage } from '@kvmkit/example-hello';

export default {
  vms: {
    hello: {
      memory: 16,
      cpus: 2,
      plugins: [
        { name: 'serial', options: { console: false } },
        { name: 'boot-flat', options: { image: helloImage(), ring: 0 } },
      ],
    },
  },
};
