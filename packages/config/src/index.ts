export { loadConfig, fromObject, SEARCH_PLACES, MODULE_NAME } from './load.js';
export type { LoadedConfig, LoadConfigOptions } from './load.js';
export { validateConfig, validateVm, validateHost, validatePluginList, configError, keyPath, DEFAULT_MEMORY_MIB, DEFAULT_CPUS } from './schema.js';
export type { KvmkitConfig, VmDefinition, HostDefinition, HostMatch, PluginRef } from './schema.js';
export {
  resolveVm, chooseHost, matchHost, globToRegExp, defaultModuleLoaded, rebasePaths, mergeOptions, mergePlugins, removePlugins, toSpec, PATH_KEYS,
} from './resolve.js';
export type { ResolvedVm, ResolvedPluginSpec, ResolveOptions, ResolveSources, HostChoice, RemovedPlugin } from './resolve.js';
export { instantiatePlugins, resolvePluginModule } from './plugins.js';
export type { InstantiateOptions, ResolvedPluginModule } from './plugins.js';
export { pluginKey, packageCandidates, isLocalPluginName, isShortPluginName, OFFICIAL_SCOPE } from './names.js';
