// What the benches share: their command line (`--json`, `--name value` with a default), the check
// that the peer tool exists, and GNU time for peak RSS.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

export interface BenchArgs {
  argv: string[];
  json: boolean;
  /** The value after `name`, '' when it is missing, `dflt` when the option is absent. */
  opt(name: string, dflt: string): string;
}

export function benchArgs(argv: string[] = process.argv.slice(2)): BenchArgs {
  return {
    argv,
    json: argv.includes('--json'),
    opt: (name, dflt) => {
      const i = argv.indexOf(name);
      return i >= 0 ? argv[i + 1] ?? '' : dflt;
    },
  };
}

/** Ends the bench (exit 0, saying why) when the peer tool it compares with is not installed. */
export function exitUnlessTool(bench: string, tool: string, debianPackage: string): void {
  if (spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0) return;
  process.stderr.write(`${bench} bench: ${tool} not found (Debian: ${debianPackage}); skipped.\n`);
  process.exit(0);
}

/** GNU time, when present, for every side's peak RSS (%M). */
export const GNU_TIME = existsSync('/usr/bin/time') && spawnSync('/usr/bin/time', ['-f', '%M', 'true']).status === 0 ? '/usr/bin/time' : null;
