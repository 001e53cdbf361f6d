// Layering lint: dependencies point one way, renderer → (bridge) → app → domain → crypto → errors,
// and core/ never reaches a front end. Every import form counts: static imports, `export … from`,
// dynamic import() and require(). Imports are read with the TypeScript parser, so text in strings
// and comments never counts; .svelte files are checked through their <script> blocks.
//
//   node scripts/lint-layers.ts [root]     exit 1 and one line per violation:
//   file:line: <from> may not import <to> (reason)
//
// The rules are data (CORE_LAYERS, RULES below): extend them there, not in the checker.
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, posix, relative, resolve, sep } from 'node:path';
import ts from 'typescript';

// ---- the rules ----------------------------------------------------------------------------------

/**
 * core/ from low to high. A layer may import its own layer and lower ones, never a higher one.
 * Patterns: 'dir/' is a folder, anything else is one file (extension optional).
 * Every file under core/ must sit in a layer.
 */
export const CORE_LAYERS: readonly { name: string; paths: readonly string[] }[] = [
  { name: 'base', paths: ['core/errors.ts', 'core/files.ts'] },
  { name: 'crypto', paths: ['core/crypto/'] },
  {
    name: 'domain',
    paths: ['core/vault/', 'core/guardian/', 'core/tpm/', 'core/attestation/', 'core/vhdx/', 'core/shield/', 'core/nbd/', 'core/vtpm/', 'core/hypervisor/'],
  },
  { name: 'app', paths: ['core/app/'] },
  { name: 'front door', paths: ['core/cli/', 'core/server/'] },
];

/**
 * A rule constrains imports from files matching `from` to targets matching `to`. Such an import is
 * a violation unless it matches an `except` entry (the first matching entry decides; `typeOnly`
 * entries accept only `import type` / `export type … from` / `typeof import()`).
 * Targets are repository paths, or 'pkg:<name>' for packages ('pkg:electron' covers
 * 'electron/main' too); '**' matches every target. Every rule must pass.
 */
export interface Rule {
  from: readonly string[];
  to: readonly string[];
  except?: readonly { to: readonly string[]; typeOnly?: boolean }[];
  reason: string;
}

export const RULES: readonly Rule[] = [
  {
    from: ['core/'],
    to: ['pkg:electron', 'electron/', 'renderer/'],
    reason: 'core/ is plain Node and never depends on a front end',
  },
  ...layerRules(CORE_LAYERS),
  {
    from: ['renderer/'],
    to: ['core/'],
    except: [{ to: ['core/app/contract.ts', 'core/errors.ts'], typeOnly: true }],
    reason: 'the renderer reaches core only through the bridge; it may take types from core/app/contract.ts and core/errors.ts with `import type`',
  },
  {
    from: ['renderer/'],
    to: ['pkg:electron', 'electron/'],
    reason: 'the renderer talks to Electron only through window.shieldlab (the preload)',
  },
  {
    from: ['electron/'],
    to: ['core/'],
    except: [{ to: ['core/app/', 'core/errors.ts', 'core/server/'] }],
    reason: 'Electron goes through the app service (core/app), not domain internals',
  },
  {
    from: ['electron/preload.cts'],
    to: ['**'],
    except: [{ to: ['pkg:electron'] }, { to: ['**'], typeOnly: true }],
    reason: 'a sandboxed preload can require nothing but electron',
  },
];

/** Folders scanned, relative to the root. */
export const SCAN = ['core', 'electron', 'renderer', 'scripts'] as const;
const EXTENSIONS = /\.(?:[mc]?ts|tsx|[mc]?js|jsx|svelte)$/;
const SKIP_DIRS = new Set(['node_modules', 'dist', '.git']);

function layerRules(layers: typeof CORE_LAYERS): Rule[] {
  return layers.slice(0, -1).map((layer, i) => {
    const higher = layers.slice(i + 1);
    return {
      from: layer.paths,
      to: higher.flatMap((l) => l.paths),
      reason: `${layer.name} is below ${higher.map((l) => l.name).join(', ')}: dependencies point down`,
    };
  });
}

// ---- the checker --------------------------------------------------------------------------------

export interface ImportRef {
  specifier: string;
  line: number;
  typeOnly: boolean;
}

export interface Violation {
  file: string;
  line: number;
  from: string;
  to: string;
  reason: string;
}

export interface LintResult {
  files: number;
  imports: number;
  violations: Violation[];
}

export function formatViolation(v: Violation): string {
  return `${v.file}:${v.line}: ${v.from} may not import ${v.to} (${v.reason})`;
}

const stripExt = (p: string) => p.replace(/\.d\.ts$|\.(?:[mc]?ts|tsx|[mc]?js|jsx|svelte)$/, '').replace(/\/index$/, '');

/** Does a rule pattern cover this file path or import target? */
export function matches(pattern: string, target: string): boolean {
  if (pattern === '**') return true;
  if (pattern.startsWith('pkg:') || target.startsWith('pkg:')) return pattern === target;
  if (pattern.endsWith('/')) return target.startsWith(pattern) || target === pattern.slice(0, -1);
  return stripExt(pattern) === stripExt(target);
}

const anyMatch = (patterns: readonly string[], target: string) => patterns.some((p) => matches(p, target));

/** 'electron/main' → 'pkg:electron', '@scope/x/y' → 'pkg:@scope/x', 'node:fs' → 'pkg:node:fs'. */
function packageTarget(specifier: string): string {
  const parts = specifier.split('/');
  return `pkg:${specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]}`;
}

/** An import target as a root-relative posix path or a package; null when it leaves the root. */
function targetOf(root: string, file: string, specifier: string): string | null {
  if (!specifier.startsWith('.') && !specifier.startsWith('/')) return packageTarget(specifier);
  const abs = specifier.startsWith('/') ? specifier : resolve(dirname(join(root, file)), specifier);
  const rel = relative(root, abs).split(sep).join(posix.sep);
  return rel.startsWith('..') ? null : rel;
}

function literalText(node: ts.Node | undefined): string | null {
  return node && (ts.isStringLiteral(node) || ts.isNoSubstitutionTemplateLiteral(node)) ? node.text : null;
}

/** Every import in one TypeScript/JavaScript source text. */
export function importsOf(text: string, fileName: string, lineOffset = 0): ImportRef[] {
  const kind = /\.[mc]?jsx?$/.test(fileName) ? ts.ScriptKind.JS : ts.ScriptKind.TS;
  const source = ts.createSourceFile(fileName, text, ts.ScriptTarget.Latest, true, kind);
  const found: ImportRef[] = [];
  const add = (node: ts.Node, specifier: string | null, typeOnly: boolean) => {
    if (specifier === null) return;
    const line = source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1 + lineOffset;
    found.push({ specifier, line, typeOnly });
  };
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node)) {
      // `import { type A }` still loads the module under verbatimModuleSyntax: only `import type` is type-only.
      add(node, literalText(node.moduleSpecifier), node.importClause?.isTypeOnly ?? false);
    } else if (ts.isExportDeclaration(node) && node.moduleSpecifier) {
      add(node, literalText(node.moduleSpecifier), node.isTypeOnly);
    } else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) {
      add(node, literalText(node.moduleReference.expression), node.isTypeOnly);
    } else if (ts.isImportTypeNode(node)) {
      const arg = ts.isLiteralTypeNode(node.argument) ? node.argument.literal : undefined;
      add(node, literalText(arg), true);
    } else if (ts.isCallExpression(node)) {
      const callee = node.expression;
      const isDynamicImport = callee.kind === ts.SyntaxKind.ImportKeyword;
      const isRequire = ts.isIdentifier(callee) && callee.text === 'require';
      if (isDynamicImport || isRequire) add(node, literalText(node.arguments[0]), false);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

/** The <script> blocks of a .svelte file, each with the line it starts on. */
function svelteScripts(text: string): { code: string; lineOffset: number }[] {
  const blocks: { code: string; lineOffset: number }[] = [];
  for (const m of text.matchAll(/<script\b[^>]*>([\s\S]*?)<\/script>/g)) {
    const start = (m.index ?? 0) + m[0].indexOf('>') + 1;
    blocks.push({ code: m[1] ?? '', lineOffset: text.slice(0, start).split('\n').length - 1 });
  }
  return blocks;
}

function fileImports(root: string, file: string): ImportRef[] {
  const text = readFileSync(join(root, file), 'utf8');
  if (!file.endsWith('.svelte')) return importsOf(text, file);
  return svelteScripts(text).flatMap((b) => importsOf(b.code, `${file}.ts`, b.lineOffset));
}

function listFiles(root: string, dir: string): string[] {
  let entries;
  try {
    entries = readdirSync(join(root, dir), { withFileTypes: true });
  } catch {
    return [];
  }
  return entries.flatMap((e) => {
    const rel = `${dir}/${e.name}`;
    if (e.isDirectory()) return SKIP_DIRS.has(e.name) ? [] : listFiles(root, rel);
    return e.isFile() && EXTENSIONS.test(e.name) ? [rel] : [];
  });
}

const label = (pattern: string) => (pattern === '**' ? 'anything' : pattern.replace(/\/$/, '').replace(/^pkg:/, ''));

/** The first rule this import breaks, or null. */
function check(file: string, ref: ImportRef, target: string, rules: readonly Rule[]): Violation | null {
  for (const rule of rules) {
    const from = rule.from.find((p) => matches(p, file));
    if (from === undefined || !anyMatch(rule.to, target)) continue;
    const exception = rule.except?.find((e) => anyMatch(e.to, target));
    if (exception && (!exception.typeOnly || ref.typeOnly)) continue;
    const reason = exception?.typeOnly ? `${rule.reason}; use \`import type\`` : rule.reason;
    return { file, line: ref.line, from: label(from), to: label(target), reason };
  }
  return null;
}

export interface LintOptions {
  rules?: readonly Rule[];
  layers?: typeof CORE_LAYERS;
  scan?: readonly string[];
}

/** Checks every source file under `root`; pure apart from reading files. */
export function lintLayers(root: string, opts: LintOptions = {}): LintResult {
  const rules = opts.rules ?? RULES;
  const layers = opts.layers ?? CORE_LAYERS;
  const layered = layers.flatMap((l) => l.paths);
  const files = (opts.scan ?? SCAN).flatMap((d) => listFiles(root, d)).sort();
  const violations: Violation[] = [];
  let imports = 0;
  for (const file of files) {
    if (file.startsWith('core/') && !anyMatch(layered, file)) {
      violations.push({ file, line: 1, from: file, to: 'anything', reason: 'it is in no core layer: add it to CORE_LAYERS in scripts/lint-layers.ts' });
    }
    for (const ref of fileImports(root, file)) {
      const target = targetOf(root, file, ref.specifier);
      if (target === null) continue;
      imports++;
      const v = check(file, ref, target, rules);
      if (v) violations.push(v);
    }
  }
  return { files: files.length, imports, violations };
}

if (import.meta.main) {
  const root = resolve(process.argv[2] ?? join(import.meta.dirname, '..'));
  const { files, imports, violations } = lintLayers(root);
  for (const v of violations) process.stderr.write(`${formatViolation(v)}\n`);
  if (violations.length > 0) {
    process.stderr.write(`lint-layers: ${violations.length} violation(s) in ${files} files\n`);
    process.exitCode = 1;
  } else {
    process.stdout.write(`lint-layers: ${files} files, ${imports} imports, no violations\n`);
  }
}
