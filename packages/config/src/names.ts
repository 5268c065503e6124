import path from 'node:path';

/** `serial` style names: lower-case letters, digits and dashes, no slash, no dot. */
const SHORT_RE = /^[a-z0-9][a-z0-9-]*$/;
export const OFFICIAL_SCOPE = '@kvmkit/plugin-';

/** A name that refers to a file: starts with ./ ../ / or file: (anything else is a package name). */
export function isLocalPluginName(name: string): boolean {
  return name.startsWith('./') || name.startsWith('../') || path.isAbsolute(name) || name.startsWith('file:');
}

export function isShortPluginName(name: string): boolean {
  return SHORT_RE.test(name);
}

/**
 * The identity of a plugin reference, used to merge a host's entry into a VM's entry and for `remove`:
 * short names map to their official package (`serial` ≡ `@kvmkit/plugin-serial`), local paths to their absolute
 * path (relative to `baseDir`), other package names stay as written.
 */
export function pluginKey(name: string, baseDir: string): string {
  if (isLocalPluginName(name)) return name.startsWith('file:') ? name : path.resolve(baseDir, name);
  if (isShortPluginName(name)) return OFFICIAL_SCOPE + name;
  return name;
}

/** The package names tried for a name, in order: `serial` → @kvmkit/plugin-serial, kvmkit-plugin-serial, serial. */
export function packageCandidates(name: string): string[] {
  if (isShortPluginName(name)) return [OFFICIAL_SCOPE + name, `kvmkit-plugin-${name}`, name];
  return [name];
}
