#!/usr/bin/env node
// Launcher: ShieldLab runs on Node ≥ 22.18 (better-sqlite3 13, TypeScript type stripping). Started by an
// older node, it re-runs itself on the Node 22 that the project installs from the npm registry.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import * as nodeModule from 'node:module'; // registerHooks and stripTypeScriptTypes are not in every Node
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

/**
 * Start-up cache for type stripping. Node 22 strips the types of every .ts module on every start,
 * through a WebAssembly compiler it first has to load: about 0.2 s of each CLI call, often more than
 * the command itself. Stripping only blanks types out (lines and columns stay put), so its output
 * depends on the source text and the Node version alone: it is kept in node_modules/.cache/shieldlab/
 * (a folder per Node version, a file per hash of the source), and Node is handed the stored JavaScript. Only the project's own ESM .ts
 * files go through it; everything else loads as before. If the cache cannot be written, modules are
 * stripped as usual. SHIELDLAB_NO_STRIP_CACHE=1 turns it off.
 */
function cacheStrippedTypeScript(root) {
  const { registerHooks, stripTypeScriptTypes } = nodeModule;
  if (process.features.typescript !== 'strip' || typeof registerHooks !== 'function' || typeof stripTypeScriptTypes !== 'function') return;
  if (process.env.SHIELDLAB_NO_STRIP_CACHE) return;
  const dir = join(fileURLToPath(root), 'node_modules', '.cache', 'shieldlab', `strip-${process.version}`);
  let writable = true;
  registerHooks({
    load(url, context, nextLoad) {
      const result = nextLoad(url, context);
      if (result.format !== 'module-typescript' || !url.startsWith(root.href) || url.includes('/node_modules/') || result.source == null) return result;
      const text = typeof result.source === 'string' ? result.source : Buffer.from(result.source).toString('utf8');
      const file = join(dir, `${createHash('sha256').update(text).digest('hex')}.js`);
      let code;
      try {
        code = readFileSync(file, 'utf8');
      } catch {
        if (!writable) return result; // no cache here: Node strips it, as it always does
        try {
          code = strip(text);
        } catch {
          return result; // unsupported syntax: the loader strips it again and reports it as it always does
        }
        writable = store(dir, file, code);
      }
      return { ...result, format: 'module', source: code };
    },
  });
}

/** Node's own stripper in the loader's mode, without the one-time notice the public function prints. */
function strip(text) {
  const emitWarning = process.emitWarning;
  process.emitWarning = function (warning, ...rest) {
    const type = typeof rest[0] === 'string' ? rest[0] : rest[0]?.type;
    if (type === 'ExperimentalWarning' && String(warning).startsWith('stripTypeScriptTypes')) return;
    return emitWarning.call(process, warning, ...rest);
  };
  try {
    return nodeModule.stripTypeScriptTypes(text, { mode: 'strip' });
  } finally {
    process.emitWarning = emitWarning;
  }
}

/** Written whole under a temporary name, then renamed (a concurrent start never reads half a file). */
function store(dir, file, code) {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    mkdirSync(dir, { recursive: true });
    if (readdirSync(dir).length > 2000) for (const f of readdirSync(dir)) rmSync(join(dir, f), { force: true }); // old sources' entries
    writeFileSync(tmp, code);
    renameSync(tmp, file);
    return true;
  } catch {
    try {
      rmSync(tmp, { force: true });
    } catch {
      // nothing was written
    }
    return false;
  }
}

/**
 * V8's compile cache (Node ≥ 22.1): the bytecode of every module, ours and our dependencies' (zod
 * alone is some 95 files), kept on disk so a start-up does not compile them again: a third of what
 * a short command costs. Kept beside the strip cache; V8 keys its entries by Node version and source
 * hash, and a cache that cannot be written is simply not used. SHIELDLAB_NO_COMPILE_CACHE=1 (or
 * Node's own NODE_DISABLE_COMPILE_CACHE=1) turns it off; NODE_COMPILE_CACHE, when set, wins.
 */
function enableCompileCache(root) {
  if (typeof nodeModule.enableCompileCache !== 'function' || process.env.SHIELDLAB_NO_COMPILE_CACHE || process.env.NODE_COMPILE_CACHE) return;
  try {
    nodeModule.enableCompileCache(join(fileURLToPath(root), 'node_modules', '.cache', 'shieldlab', 'v8'));
  } catch {
    // not available here: modules are compiled as usual
  }
}

const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 18)) {
  let node;
  try {
    node = nodeModule.createRequire(import.meta.url).resolve('node/bin/node');
  } catch {
    process.stderr.write(`shieldlab: error [usage]: Node ${process.versions.node} is too old and the project's Node 22 is not installed (run npm install).\n`);
    process.exit(2);
  }
  const { spawn } = await import('node:child_process'); // only here: it pulls in net, dgram and streams
  const child = spawn(node, [fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: 'inherit' });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => child.kill(sig));
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
} else {
  const source = new URL('../core/cli/main.ts', import.meta.url);
  const built = new URL('../dist/core/cli/main.js', import.meta.url);
  const fromSource = existsSync(fileURLToPath(source));
  enableCompileCache(new URL('../', import.meta.url));
  if (fromSource) cacheStrippedTypeScript(new URL('../', import.meta.url));
  const entry = fromSource ? source : built;
  const { run } = await import(pathToFileURL(fileURLToPath(entry)).href);
  process.exitCode = await run(process.argv.slice(2));
}
