import pinoMod from 'pino';
import type { Logger as PinoLogger, LevelWithSilent } from 'pino';

export type Logger = PinoLogger;
export type LogLevel = LevelWithSilent;

const pino = (pinoMod as unknown as { default?: typeof pinoMod }).default ?? pinoMod;

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
  if (pretty) {
    return pino({
      level,
      base: undefined,
      transport: { target: 'pino-pretty', options: { destination: fd, colorize: true, ignore: 'pid,hostname', translateTime: 'HH:MM:ss.l', sync: true } },
    });
  }
  return pino({ level, base: undefined }, pino.destination({ fd, sync: true }));
}

/** A logger that drops everything (tests). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
