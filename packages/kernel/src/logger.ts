import { createRequire } from 'node:module';
import type { Logger as PinoLogger, LevelWithSilent, ChildLoggerOptions } from 'pino';
import type pinoNs from 'pino';

export type Logger = PinoLogger;
export type LogLevel = LevelWithSilent;

type PinoFn = typeof pinoNs;

/*
 * pino (with its ~27 CommonJS files) costs 15–20 ms to load, on `kvmkit run`'s start path. Loggers are lazy
 * facades: pino is required (synchronously) on the first log call at or above the logger's level, or on the
 * first use of anything else of pino's API; a silent logger, or one whose level is never reached, never loads
 * it. Behaviour is pino's: the same level methods and values, `level` get/set, `isLevelEnabled`, `child()`
 * (a child of a facade is a facade; its level is fixed at creation like pino's), and the same output.
 */
const require = createRequire(import.meta.url);
let pinoFn: PinoFn | undefined;
function loadPino(): PinoFn {
  if (!pinoFn) {
    const m = require('pino') as PinoFn & { default?: PinoFn };
    pinoFn = m.default ?? m;
  }
  return pinoFn;
}

/** pino's default level values. */
const LEVEL_VALUES: Readonly<Record<string, number>> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };
const isLevel = (l: unknown): l is LevelWithSilent => typeof l === 'string' && Object.hasOwn(LEVEL_VALUES, l);
const noop = (): void => {};

/** A facade over the logger `make(level)` builds on first real use; `level` is the level it starts with. */
function lazyLogger(make: (level: LevelWithSilent) => PinoLogger, level: LevelWithSilent): Logger {
  let real: PinoLogger | undefined;
  let lvl = level;
  const materialize = (): PinoLogger => (real ??= make(lvl));
  // Methods are bound to the real logger; the bound copy is kept while the property holds the same function
  // (pino swaps its level methods when the level changes), so a log call allocates nothing.
  const bound = new Map<string | symbol, { fn: unknown; b: unknown }>();
  const forward = (p: string | symbol): unknown => {
    const r = materialize();
    const v = Reflect.get(r, p, r) as unknown;
    if (typeof v !== 'function') return v;
    const c = bound.get(p);
    if (c?.fn === v) return c.b;
    const b = (v as (...a: unknown[]) => unknown).bind(r);
    bound.set(p, { fn: v, b });
    return b;
  };
  const handler: ProxyHandler<object> = {
    get(_t, p) {
      if (real) return forward(p);
      if (typeof p === 'string') {
        const v = LEVEL_VALUES[p];
        if (v !== undefined && p !== 'silent') return v >= LEVEL_VALUES[lvl]! ? forward(p) : noop;
        switch (p) {
          case 'silent': return noop;
          case 'level': return lvl;
          case 'levelVal': return LEVEL_VALUES[lvl];
          case 'isLevelEnabled':
            return (l: string) => {
              const x = LEVEL_VALUES[l];
              return x !== undefined && x >= LEVEL_VALUES[lvl]!;
            };
          case 'flush':
            // Nothing was written: there is nothing to flush.
            return (cb?: (err?: Error) => void) => { if (cb) cb(); };
          case 'child':
            return (bindings: pinoNs.Bindings, options?: ChildLoggerOptions) => {
              if (!bindings) throw Error('missing bindings for child Pino');
              const childLevel = options?.level ?? lvl;
              if (!isLevel(childLevel)) return materialize().child(bindings, options);
              return lazyLogger((l) => materialize().child(bindings, { ...options, level: l }), childLevel);
            };
        }
      }
      return forward(p);
    },
    set(_t, p, v) {
      if (!real && p === 'level' && isLevel(v)) {
        lvl = v;
        return true;
      }
      const r = materialize();
      return Reflect.set(r, p, v, r);
    },
    has: (_t, p) => Reflect.has(materialize(), p),
    ownKeys: () => Reflect.ownKeys(materialize()),
    getOwnPropertyDescriptor: (_t, p) => {
      const d = Reflect.getOwnPropertyDescriptor(materialize(), p);
      // A proxy may not report a non-configurable property its target lacks.
      return d ? { ...d, configurable: true } : undefined;
    },
    defineProperty: (_t, p, d) => Reflect.defineProperty(materialize(), p, d),
    deleteProperty: (_t, p) => Reflect.deleteProperty(materialize(), p),
    getPrototypeOf: () => Reflect.getPrototypeOf(materialize()),
  };
  return new Proxy({}, handler) as Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Pretty output; default: when stderr is a TTY. */
  pretty?: boolean;
  /** Destination fd (default 2: logs go to stderr so the guest console owns stdout). */
  fd?: number;
}

/** The root logger: pretty when stderr is a TTY, JSON otherwise. Level from opts or KVMKIT_LOG_LEVEL. */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const level = opts.level ?? (process.env.KVMKIT_LOG_LEVEL as LogLevel | undefined) ?? 'info';
  const fd = opts.fd ?? 2;
  const pretty = opts.pretty ?? Boolean(process.stderr.isTTY);
  const make = (l: LevelWithSilent): PinoLogger => {
    const pino = loadPino();
    if (pretty) {
      return pino({
        level: l,
        base: undefined,
        transport: { target: 'pino-pretty', options: { destination: fd, colorize: true, ignore: 'pid,hostname', translateTime: 'HH:MM:ss.l', sync: true } },
      });
    }
    return pino({ level: l, base: undefined }, pino.destination({ fd, sync: true }));
  };
  // An unknown level: pino's own error, now.
  if (!isLevel(level)) return make(level);
  return lazyLogger(make, level);
}

/** A logger that drops everything (tests). */
export function silentLogger(): Logger {
  return lazyLogger((l) => loadPino()({ level: l }), 'silent');
}
