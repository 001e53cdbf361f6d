// The `shieldlab` command. Every command except `serve` and `help` is derived from the contract.
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join, resolve } from 'node:path';
import { contract, METHOD_NAMES, type MethodName, type MethodSpec, type ProgressEvent, type Result } from '../app/contract.ts';
import { ShieldLabApp, defaultHome } from '../app/service.ts';
import { ShieldError, toShieldError } from '../errors.ts';
import { fieldsOf, flagUsage, type FieldInfo } from './flags.ts';
import { formatHuman, exitStatusFor } from './format.ts';

interface Globals {
  home: string;
  json: boolean;
  help: boolean;
  passphraseFile?: string;
  passphraseStdin: boolean;
}

const GLOBAL_HELP = `Global options:
  --home DIR                   where the vault lives (default $SHIELDLAB_HOME, else the per-user app-data folder)
  --json                       machine-readable output on stdout (errors too)
  --passphrase-file F          the vault passphrase, from a file or /dev/fd/N (any command that unlocks)
  --passphrase-stdin           the vault passphrase from standard input
  -h, --help                   help for a command`;

function usage(message: string): ShieldError {
  return new ShieldError('usage', message);
}

/** Splits argv into words and flags; global flags are taken out wherever they appear. */
function parseArgv(argv: string[]): { words: string[]; flags: Map<string, string[]>; globals: Globals } {
  const words: string[] = [];
  const flags = new Map<string, string[]>();
  const globals: Globals = { home: '', json: false, help: false, passphraseStdin: false };
  const add = (k: string, v: string) => flags.set(k, [...(flags.get(k) ?? []), v]);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      words.push(...argv.slice(i + 1));
      break;
    }
    if (a === '-h' || a === '--help') globals.help = true;
    else if (a === '--json') globals.json = true;
    else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq > 0 ? a.slice(2, eq) : a.slice(2);
      const inline = eq > 0 ? a.slice(eq + 1) : undefined;
      const takesValue = !(name.startsWith('no-') || name.endsWith('-stdin') || BOOLEAN_FLAGS.has(name));
      let value = inline;
      if (value === undefined && takesValue) {
        value = argv[++i];
        if (value === undefined) throw usage(`--${name} needs a value`);
      }
      if (name === 'home') globals.home = value!;
      else if (name === 'passphrase-file') globals.passphraseFile = value!;
      else if (name === 'passphrase-stdin') globals.passphraseStdin = true;
      else add(name, value ?? 'true');
    } else words.push(a);
  }
  return { words, flags, globals };
}

/** Flags that never take a value (derived: every boolean field of every method). */
const BOOLEAN_FLAGS = new Set<string>(
  METHOD_NAMES.flatMap((m) => fieldsOf(contract[m].args as MethodSpec['args']).filter((f) => f.kind === 'boolean').map((f) => f.flag)),
);

function findMethod(words: string[]): { method: MethodName; rest: string[] } | null {
  let best: { method: MethodName; rest: string[] } | null = null;
  for (const m of METHOD_NAMES) {
    const path = contract[m].cli.path;
    if (path.length <= words.length && path.every((w, i) => words[i] === w)) {
      if (!best || path.length > contract[best.method].cli.path.length) best = { method: m, rest: words.slice(path.length) };
    }
  }
  return best;
}

let stdinCache: string | undefined;
function readStdin(): string {
  stdinCache ??= readFileSync(0, 'utf8');
  return stdinCache;
}

function readSecret(source: { file?: string; stdin?: boolean }, what: string): string {
  let text: string;
  try {
    text = source.stdin ? readStdin() : readFileSync(source.file!, 'utf8');
  } catch (err) {
    const e = toShieldError(err);
    throw new ShieldError(e.code === 'not_found' ? 'not_found' : 'io_error', `Cannot read the ${what} from ${source.stdin ? 'standard input' : source.file}: ${e.message}`);
  }
  // A trailing newline is how editors and `echo` end files; it is not part of the secret.
  return text.replace(/\r?\n$/, '');
}

function buildArgs(method: MethodName, rest: string[], flags: Map<string, string[]>, globals: Globals): Record<string, unknown> {
  const spec = contract[method] as MethodSpec;
  const fields = fieldsOf(spec.args);
  const positional = spec.cli.positional ?? [];
  const args: Record<string, unknown> = {};
  const used = new Set<string>();
  if (rest.length > positional.length) throw usage(`Unexpected argument: ${rest[positional.length]}`);
  positional.forEach((key, i) => {
    if (rest[i] !== undefined) args[key] = rest[i];
  });
  const one = (f: FieldInfo, name: string): string | undefined => {
    const v = flags.get(name);
    if (v === undefined) return undefined;
    used.add(name);
    if (v.length > 1) throw usage(`--${name} given more than once`);
    return v[0];
  };
  for (const f of fields) {
    if (positional.includes(f.key)) continue;
    if (f.secret) {
      const file = f.key === 'passphrase' ? globals.passphraseFile : one(f, `${f.flag}-file`);
      const stdin = f.key === 'passphrase' ? globals.passphraseStdin : one(f, `${f.flag}-stdin`) !== undefined;
      if (file !== undefined && stdin) throw usage(`Give --${f.flag}-file or --${f.flag}-stdin, not both`);
      if (file !== undefined || stdin) args[f.key] = readSecret(file !== undefined ? { file } : { stdin: true }, f.flag.replace(/-/g, ' '));
      continue;
    }
    if (f.kind === 'boolean') {
      if (one(f, f.flag) !== undefined) args[f.key] = true;
      if (one(f, `no-${f.flag}`) !== undefined) args[f.key] = false;
      continue;
    }
    if (f.kind === 'string[]') {
      const v = flags.get(f.flag);
      if (v) {
        used.add(f.flag);
        // Repeatable; where the contract says so, each value may also be a comma list (--allow-mode tpm,host-key).
        args[f.key] = f.commaList ? v.flatMap((x) => x.split(',')).map((x) => x.trim()).filter((x) => x.length > 0) : v;
      }
      continue;
    }
    const v = one(f, f.flag);
    if (v === undefined) continue;
    if (f.kind === 'number') {
      const n = Number(v);
      if (!Number.isFinite(n)) throw usage(`--${f.flag} takes a number, not "${v}"`);
      args[f.key] = n;
    } else args[f.key] = v;
  }
  for (const name of flags.keys()) {
    if (!used.has(name)) throw usage(`Unknown option --${name} for "${spec.cli.path.join(' ')}" (see --help)`);
  }
  for (const f of fields) {
    if (f.required && args[f.key] === undefined) {
      throw usage(positional.includes(f.key) ? `Missing ${f.key.toUpperCase()}` : `Missing --${f.flag}${f.secret ? '-file F or --' + f.flag + '-stdin' : ''}`);
    }
  }
  return args;
}

function commandHelp(method: MethodName): string {
  const spec = contract[method] as MethodSpec;
  const pos = spec.cli.positional ?? [];
  const fields = fieldsOf(spec.args);
  const lines = [`shieldlab ${spec.cli.path.join(' ')}${pos.map((p) => ` ${p.toUpperCase()}`).join('')} [options]`, '', spec.summary, ''];
  for (const f of fields) if (!(f.key === 'passphrase' && f.secret)) lines.push(flagUsage(f, pos.includes(f.key)));
  lines.push('', GLOBAL_HELP);
  return lines.join('\n');
}

function mainHelp(): string {
  const rows = METHOD_NAMES.map((m) => {
    const spec = contract[m];
    const pos = (spec.cli.positional ?? []).map((p) => ` ${p.toUpperCase()}`).join('');
    return `  ${(spec.cli.path.join(' ') + pos).padEnd(28)} ${spec.summary}`;
  });
  return [
    'shieldlab — shielded VMs on one workstation: the local guardian and the offline key vault',
    '',
    'Usage: shieldlab COMMAND [options]',
    '',
    'Commands:',
    ...rows,
    `  ${'serve [--port N]'.padEnd(28)} Web mode: the app on http://127.0.0.1 with a per-launch token`,
    '',
    GLOBAL_HELP,
    '',
    'Exit status: 0 ok, 1 refused or failed, 2 usage.',
  ].join('\n');
}

function rendererDir(): string | null {
  const here = dirname(fileURLToPath(import.meta.url));
  for (const candidate of [resolve(here, '../../dist/renderer'), resolve(here, '../../renderer')]) {
    if (existsSync(join(candidate, 'index.html')) && existsSync(join(candidate, 'assets'))) return candidate;
  }
  return null;
}

async function serve(flags: Map<string, string[]>, globals: Globals, app: ShieldLabApp): Promise<number> {
  const portText = flags.get('port')?.[0] ?? '0';
  for (const k of flags.keys()) if (k !== 'port') throw usage(`Unknown option --${k} for "serve"`);
  const port = Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw usage(`--port takes 0–65535, not "${portText}"`);
  const staticDir = rendererDir();
  if (!staticDir) process.stderr.write('shieldlab: the renderer is not built (run `npm run build`); serving the API only.\n');
  // Loaded here: the HTTP/WebSocket stack is only for `serve`, and every other command starts faster without it.
  const { startServer } = await import('../server/server.ts');
  const server = await startServer({ app, port, staticDir: staticDir ?? '/nonexistent', log: (l) => process.stderr.write(`shieldlab serve: ${l}\n`) });
  if (globals.json) process.stdout.write(`${JSON.stringify({ url: server.url, port: server.port })}\n`);
  else process.stdout.write(`ShieldLab web mode on 127.0.0.1 (loopback only). Open:\n  ${server.url}\n`);
  await new Promise<void>((done) => {
    const stop = () => done();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  await server.close();
  // VMs started from the page run in this process (it serves their disks): power them down first.
  await app.shutdown();
  return 0;
}

/** Bytes in binary units, as people read sizes. */
function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v >= 100 || u === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[u]}`;
}

function progressPrinter(globals: Globals) {
  const started = performance.now();
  return (e: ProgressEvent) => {
    if (globals.json || !process.stderr.isTTY) return;
    const pct = e.total ? Math.floor((100 * e.done) / e.total) : 100;
    let line = `${e.phase}: ${e.done}/${e.total} ${e.unit} (${pct}%)`;
    if (e.unit === 'bytes') {
      // Rate over the whole run so far; ETA from it (steadier than the last step's rate).
      const secs = (performance.now() - started) / 1000;
      const rate = secs > 0 ? e.done / secs : 0;
      const eta = rate > 0 ? Math.ceil((e.total - e.done) / rate) : 0;
      line = `${e.phase}: ${human(e.done)} of ${human(e.total)} (${pct}%), ${human(rate)}/s${e.done < e.total ? `, ${eta} s left` : ''}`;
    }
    process.stderr.write(`\r${line}\x1b[K${e.done >= e.total ? '\n' : ''}`);
  };
}

/** `vm start --detach`: refuses a VM that runs, then hands the start to a supervisor process. */
async function startVmDetached(app: ShieldLabApp, home: string, args: Record<string, unknown>, passphrase: string | undefined): Promise<Result<'vm.start'>> {
  const parsed = contract['vm.start'].args.parse(args);
  const status = async () => ((await app.invoke('vm.status', { name: parsed.name })) as Result<'vm.status'>).vms[0]!;
  const vm = await status();
  if (vm.status === 'starting' || vm.status === 'running' || vm.status === 'stopping') throw new ShieldError('vm_running', `VM ${vm.name} is running already (pid ${vm.pid}).`, { details: { pid: vm.pid } });
  const { startDetached } = await import('./detach.ts');
  return startDetached({ home, args: parsed, vm, passphrase, status });
}

export async function run(argv: string[]): Promise<number> {
  let globals: Globals = { home: '', json: argv.includes('--json'), help: false, passphraseStdin: false };
  let app: ShieldLabApp | null = null;
  try {
    const parsed = parseArgv(argv);
    globals = parsed.globals;
    const { words, flags } = parsed;
    if (words.length === 0 || words[0] === 'help') {
      const target = words.length > 1 ? findMethod(words.slice(1)) : null;
      process.stdout.write(`${target ? commandHelp(target.method) : mainHelp()}\n`);
      return words.length === 0 && !globals.help ? 2 : 0;
    }
    const home = resolve(globals.home || defaultHome());
    if (words[0] === 'serve') {
      if (globals.help) {
        process.stdout.write('shieldlab serve [--port N]\n\nWeb mode: the API and the UI on 127.0.0.1 only; prints the URL with its per-launch token.\n');
        return 0;
      }
      app = new ShieldLabApp({ home, log: (l) => process.stderr.write(`${l}\n`) });
      return await serve(flags, globals, app);
    }
    const found = findMethod(words);
    if (!found) throw usage(`Unknown command: ${words.join(' ')} (see shieldlab --help)`);
    if (globals.help) {
      process.stdout.write(`${commandHelp(found.method)}\n`);
      return 0;
    }
    const args = buildArgs(found.method, found.rest, flags, globals);
    app = new ShieldLabApp({ home, log: (l) => process.env.SHIELDLAB_DEBUG && process.stderr.write(`${l}\n`) });
    // A one-shot CLI call unlocks for itself (passphrase if given, else the OS keychain) and locks on exit.
    let passphrase: string | undefined;
    if (contract[found.method].needs === 'unlocked') {
      passphrase = (args.passphrase as string | undefined) ?? (globals.passphraseFile !== undefined || globals.passphraseStdin
        ? readSecret(globals.passphraseFile !== undefined ? { file: globals.passphraseFile } : { stdin: true }, 'passphrase')
        : undefined);
      await app.invoke('vault.unlock', passphrase === undefined ? {} : { passphrase });
    }
    let result: unknown;
    if (found.method === 'vm.start' && args.detach === true) {
      // The VM outlives this call: a supervisor process runs it (core/cli/detach.ts).
      result = await startVmDetached(app, home, args, passphrase);
    } else {
      // Ctrl-C (or SIGTERM) cancels long work cleanly: the method removes what it half-made.
      const cancel = new AbortController();
      const onSignal = () => cancel.abort();
      process.once('SIGINT', onSignal);
      process.once('SIGTERM', onSignal);
      try {
        const notice = (text: string) => process.stderr.write(globals.json ? `${JSON.stringify({ notice: text })}\n` : `${text}\n`);
        result = await app.invoke(found.method, args, { onProgress: progressPrinter(globals), signal: cancel.signal, notice });
      } finally {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    }
    passphrase = undefined;
    if (globals.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    else process.stdout.write(formatHuman(found.method, result));
    return exitStatusFor(found.method, result);
  } catch (err) {
    const e = toShieldError(err);
    if (process.env.SHIELDLAB_DEBUG && !(err instanceof ShieldError)) process.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
    if (globals.json) process.stdout.write(`${JSON.stringify({ error: e.toJSON() })}\n`);
    else process.stderr.write(`shieldlab: error [${e.code}]: ${e.message}\n`);
    return e.code === 'usage' || e.code === 'invalid_argument' ? 2 : 1;
  } finally {
    app?.close();
  }
}
