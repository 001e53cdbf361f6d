// The benches' command line: `--json`, and `--name value` options with a default.
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
