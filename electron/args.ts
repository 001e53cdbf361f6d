// Where the desktop app keeps its data: --home DIR (or --home=DIR), else $SHIELDLAB_HOME, else the
// per-user app-data folder — the same rule as the CLI.
import { resolve } from 'node:path';
import { defaultHome } from '../core/app/service.ts';

/** Electron's argv also carries Chromium switches; only --home is ours. */
export function homeFromArgv(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): string {
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg.startsWith('--home=') && arg.length > '--home='.length) return resolve(arg.slice('--home='.length));
    const next = argv[i + 1];
    if (arg === '--home' && next !== undefined && !next.startsWith('--')) return resolve(next);
  }
  return defaultHome(env);
}
