// A local plugin: the probe guest for this example, booted flat by @kvmkit/plugin-boot-flat.
// Every vCPU starts in ring 3 (IOPL 3), writes one byte to each 4 KiB page from 2 MiB up to 2 MiB + touchMiB,
// then writes 0 to the debug-exit port 0xf4 (platform-pc): the VM stops with exit code 0.
import bootFlat from '@kvmkit/plugin-boot-flat';

export function probeImage() {
  return new Uint8Array([
    0x48, 0xc7, 0xc3, 0x00, 0x00, 0x20, 0x00, // mov rbx, 0x200000
    0x48, 0x8d, 0x14, 0x1a, //                   lea rdx, [rdx + rbx]      (end = 2 MiB + arg)
    0xc6, 0x03, 0x01, //                      L: mov byte [rbx], 1
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add rbx, 0x1000
    0x48, 0x39, 0xd3, //                         cmp rbx, rdx
    0x72, 0xf1, //                               jb L
    0x31, 0xc0, //                               xor eax, eax
    0xe6, 0xf4, //                               out 0xf4, al
    0xeb, 0xfe, //                               jmp $
  ]);
}

/** @param {{ touchMiB?: number }} [options] */
export default function probeGuest(options = {}) {
  const touchMiB = options.touchMiB ?? 16;
  if (!Number.isInteger(touchMiB) || touchMiB < 0 || touchMiB > 4096) throw new TypeError('probe-guest: touchMiB must be an integer 0..4096');
  return bootFlat({ image: probeImage(), ring: 3, arg: touchMiB * 1024 * 1024 });
}
