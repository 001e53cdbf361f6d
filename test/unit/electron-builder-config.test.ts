// Packaging cannot run here (electron-builder downloads Electron), so the config is checked the way
// electron-builder itself checks it before a build: its own loader and JSON schema.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { ROOT } from '../helpers/home.ts';

const require = createRequire(import.meta.url);
// electron-builder's internals (app-builder-lib 26, installed with electron-builder); not a public entry point.
const { getConfig, validateConfiguration } = require('app-builder-lib/out/util/config/config.js') as {
  getConfig(projectDir: string, configPath: string, fromOptions: null): Promise<Record<string, unknown>>;
  validateConfiguration(config: unknown, debugLogger: unknown): Promise<void>;
};
const { DebugLogger } = require('builder-util') as { DebugLogger: new (enabled: boolean) => unknown };

test('build/electron-builder.yml passes electron-builder validation, with the security fuses', async () => {
  const config = await getConfig(ROOT, join(ROOT, 'build/electron-builder.yml'), null);
  await validateConfiguration(config, new DebugLogger(false));
  assert.equal(config.asar, true);
  assert.deepEqual(config.electronFuses, {
    runAsNode: false,
    enableNodeOptionsEnvironmentVariable: false,
    enableNodeCliInspectArguments: false,
    enableEmbeddedAsarIntegrityValidation: true,
    onlyLoadAppFromAsar: true,
    enableCookieEncryption: true,
    grantFileProtocolExtraPrivileges: false,
  });
  assert.deepEqual((config.linux as { target: string[] }).target, ['AppImage', 'deb']);
});
