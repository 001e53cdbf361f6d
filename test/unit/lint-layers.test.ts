// The layering lint against small fake trees: each violation is reported exactly once, at its
// line, and a clean tree passes.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { formatViolation, importsOf, lintLayers } from '../../scripts/lint-layers.ts';

/** Writes the files into a temporary root, removed when the test ends. */
function tree(t: TestContext, files: Record<string, string>): string {
  const root = mkdtempSync(join(tmpdir(), 'shieldlab-lint-'));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(dirname(join(root, path)), { recursive: true });
    writeFileSync(join(root, path), text);
  }
  return root;
}

/** A small tree that follows every rule. */
const CLEAN: Record<string, string> = {
  'core/errors.ts': 'export class ShieldError extends Error {}\n',
  'core/crypto/mod.ts': "import { ShieldError } from '../errors.ts';\nexport const x = ShieldError;\n",
  'core/vault/mod.ts': "import { x } from '../crypto/mod.ts';\nimport { ShieldError } from '../errors.ts';\nexport const v = [x, ShieldError];\n",
  'core/guardian/mod.ts': "import { v } from '../vault/mod.ts';\nexport const g = v;\n",
  'core/app/contract.ts': 'export type MethodName = string;\n',
  'core/app/service.ts': "import { g } from '../guardian/mod.ts';\nexport const app = g;\n",
  'core/cli/main.ts': "import { app } from '../app/service.ts';\nimport { serve } from '../server/server.ts';\nexport const run = [app, serve];\n",
  'core/server/server.ts': "import type { MethodName } from '../app/contract.ts';\nexport const serve = (m: MethodName) => m;\n",
  'electron/main.ts': "import { app } from 'electron';\nimport { app as shield } from '../core/app/service.ts';\nimport { serve } from '../core/server/server.ts';\nexport const m = [app, shield, serve];\n",
  'electron/preload.cts': "const { contextBridge } = require('electron') as typeof import('electron');\nexport type T = import('../core/app/contract.ts').MethodName;\n",
  'renderer/src/bridge.ts': "import type { MethodName } from '../../core/app/contract.ts';\nimport type { ShieldError } from '../../core/errors.ts';\nimport { mount } from 'svelte';\nexport type X = [MethodName, ShieldError, typeof mount];\n",
  'renderer/src/App.svelte': "<script lang=\"ts\">\n  import type { MethodName } from '../../core/app/contract.ts';\n  let m: MethodName = 'x';\n</script>\n<p>{m}</p>\n",
  'scripts/tool.ts': "import { lint } from '../core/vault/mod.ts';\n",
};

test('a clean tree has no violations', (t) => {
  const root = tree(t, CLEAN);
  const result = lintLayers(root);
  assert.deepEqual(result.violations, []);
  assert.equal(result.files, Object.keys(CLEAN).length);
  assert.equal(result.imports, 19);
});

test('reports core importing electron, a lower layer importing a higher one, and the renderer reaching into core', (t) => {
  const root = tree(t, {
    ...CLEAN,
    'core/vault/mod.ts': "import { x } from '../crypto/mod.ts';\nimport { safeStorage } from 'electron';\nexport const v = [x, safeStorage];\n",
    'core/crypto/mod.ts': "import { ShieldError } from '../errors.ts';\n\nimport { v } from '../vault/mod.ts';\nexport const x = [ShieldError, v];\n",
    'renderer/src/bridge.ts': "import type { MethodName } from '../../core/app/contract.ts';\nimport { Vault } from '../../core/vault/mod.ts';\nexport type X = [MethodName, Vault];\n",
  });
  const lines = lintLayers(root).violations.map(formatViolation);
  assert.deepEqual(lines, [
    'core/crypto/mod.ts:3: core/crypto may not import core/vault/mod.ts (crypto is below domain, app, front door: dependencies point down)',
    'core/vault/mod.ts:2: core may not import electron (core/ is plain Node and never depends on a front end)',
    "renderer/src/bridge.ts:2: renderer may not import core/vault/mod.ts (the renderer reaches core only through the bridge; it may take types from core/app/contract.ts and core/errors.ts with `import type`)",
  ]);
});

test('every import form counts; comments and strings do not', (t) => {
  const root = tree(t, {
    ...CLEAN,
    'core/vault/extra.ts': [
      "// import x from 'electron'",
      "const text = \"require('electron')\";",
      "export { a } from '../app/service.ts';",
      "const m = await import('../cli/main.ts');",
      "const e = require('electron/main');",
      "import type { T } from '../app/contract.ts';",
      'export const all = [text, m, e];',
    ].join('\n'),
  });
  const found = lintLayers(root).violations.map((v) => `${v.line}:${v.to}`);
  assert.deepEqual(found, ['3:core/app/service.ts', '4:core/cli/main.ts', '5:electron', '6:core/app/contract.ts']);
});

test('the renderer may take only types from the contract, and `import { type X }` is not type-only', (t) => {
  const root = tree(t, {
    ...CLEAN,
    'renderer/src/App.svelte': "<p>hi</p>\n<script lang=\"ts\">\n  import { contract } from '../../core/app/contract.ts';\n</script>\n",
    'renderer/src/bridge.ts': "import { type MethodName } from '../../core/app/contract.ts';\nimport { ipcRenderer } from 'electron';\nexport type X = MethodName;\n",
  });
  const found = lintLayers(root).violations.map((v) => `${v.file}:${v.line}:${v.to}`);
  assert.deepEqual(found, ['renderer/src/App.svelte:3:core/app/contract.ts', 'renderer/src/bridge.ts:1:core/app/contract.ts', 'renderer/src/bridge.ts:2:electron']);
  assert.match(lintLayers(root).violations[0]!.reason, /use `import type`/);
});

test('electron/ stays out of domain internals; the preload requires nothing but electron', (t) => {
  const root = tree(t, {
    ...CLEAN,
    'electron/ipc.ts': "import { Vault } from '../core/vault/mod.ts';\nimport { run } from '../core/cli/main.ts';\nexport const i = [Vault, run];\n",
    'electron/preload.cts': "const { contextBridge } = require('electron') as typeof import('electron');\nconst o = require('./origin.ts');\n",
  });
  const found = lintLayers(root).violations.map((v) => `${v.file}:${v.line}:${v.to}`);
  assert.deepEqual(found, ['electron/ipc.ts:1:core/vault/mod.ts', 'electron/ipc.ts:2:core/cli/main.ts', 'electron/preload.cts:2:electron/origin.ts']);
});

test('a core file outside every layer is reported', (t) => {
  const root = tree(t, { ...CLEAN, 'core/misc/util.ts': 'export const u = 1;\n' });
  const v = lintLayers(root).violations;
  assert.equal(v.length, 1);
  assert.equal(v[0]!.file, 'core/misc/util.ts');
  assert.match(v[0]!.reason, /no core layer/);
});

test('importsOf marks type-only forms', () => {
  const refs = importsOf(
    "import type { A } from 'a';\nimport { type B } from 'b';\nexport type { C } from 'c';\ntype D = typeof import('d');\nimport 'e';\n",
    'x.ts',
  );
  assert.deepEqual(
    refs.map((r) => `${r.specifier}:${r.typeOnly}`),
    ['a:true', 'b:false', 'c:true', 'd:true', 'e:false'],
  );
});
