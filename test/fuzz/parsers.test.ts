// Seeded mutation fuzzing of everything that parses outside input: recovery shares, backup files,
// and API arguments. Every input must end in a result or a typed ShieldError — never another
// exception, never `internal`. SHIELDLAB_FUZZ_SEED replays a run; SHIELDLAB_FUZZ_ROUNDS scales it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Vault, restoreBackup, writeBackup } from '../../core/vault/mod.ts';
import { combineShares } from '../../core/vault/shares.ts';
import { ShieldLabApp } from '../../core/app/service.ts';
import { METHOD_NAMES } from '../../core/app/contract.ts';
import { ShieldError } from '../../core/errors.ts';
import { tempDir } from '../helpers/home.ts';
import { mutate, rng } from '../helpers/random.ts';

const SEED = Number(process.env.SHIELDLAB_FUZZ_SEED ?? Date.now() % 1_000_000);
const ROUNDS = Number(process.env.SHIELDLAB_FUZZ_ROUNDS ?? 300);

function typed(err: unknown, allowed: readonly string[], what: string): void {
  assert.ok(err instanceof ShieldError, `${what}: untyped ${String(err)} (seed ${SEED})`);
  assert.ok(allowed.includes(err.code), `${what}: unexpected code ${err.code}: ${err.message} (seed ${SEED})`);
}

test(`shares, backups and API arguments survive mutation (seed ${SEED})`, async (t) => {
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const r = rng(SEED);
  const vault = await Vault.create(join(dir, 'src'), { passphrase: Buffer.from('fuzz pass'), kdf: { N: 1 << 14, r: 8, p: 1 } });
  vault.putRecord('secret', { name: 'x', data: Buffer.from('y') });
  const { shares } = await vault.splitRecovery(3, 2);
  const backup = join(dir, 'b.slb');
  writeBackup(vault, backup);
  vault.close();
  const good = readFileSync(backup);

  for (let i = 0; i < ROUNDS; i++) {
    const share = mutate(Buffer.from(shares[1]!), r).toString('latin1');
    try {
      const { recoveryKey } = await combineShares([shares[0]!, share]);
      recoveryKey.fill(0); // a mutation that keeps the share valid (e.g. case, dashes) may combine
    } catch (err) {
      typed(err, ['share_invalid', 'shares_insufficient', 'shares_mismatch'], `share ${JSON.stringify(share)}`);
    }
  }

  const file = join(dir, 'm.slb');
  for (let i = 0; i < ROUNDS; i++) {
    const bad = mutate(good, r);
    if (bad.equals(good)) continue;
    writeFileSync(file, bad);
    try {
      const restored = await restoreBackup({ home: join(dir, `r${i}`), file, shares: shares.slice(0, 2), protection: { passphrase: Buffer.from('p'), kdf: { N: 1 << 10, r: 8, p: 1 } } });
      restored.close();
      assert.fail(`a mutated backup was accepted (round ${i}, seed ${SEED})`);
    } catch (err) {
      if (err instanceof assert.AssertionError) throw err;
      typed(err, ['backup_invalid', 'backup_wrong_key'], `backup round ${i}`);
    }
  }

  const app = new ShieldLabApp({ home: join(dir, 'api') });
  t.after(() => app.close());
  const values: unknown[] = [null, true, 0, -1, 1e308, NaN, '', 'x', 'SL1-AAAA', [], [1], ['a', 2], {}, { a: 1 }, '\u0000', 'a'.repeat(70_000)];
  const keys = ['name', 'value', 'passphrase', 'keychain', 'kdfMemoryMib', 'share', 'shares', 'threshold', 'file', 'out', 'limit', 'verify', 'kind', 'tags', 'autoLockMinutes', '__proto__', 'constructor'];
  for (let i = 0; i < ROUNDS; i++) {
    const method = METHOD_NAMES[Math.floor(r() * METHOD_NAMES.length)]!;
    const args: Record<string, unknown> = {};
    for (let k = 0, n = Math.floor(r() * 4); k < n; k++) args[keys[Math.floor(r() * keys.length)]!] = values[Math.floor(r() * values.length)];
    const raw = r() < 0.1 ? values[Math.floor(r() * values.length)] : args;
    try {
      await app.invoke(method, raw);
    } catch (err) {
      assert.ok(err instanceof ShieldError, `${method}(${JSON.stringify(raw)}): untyped ${String(err)} (seed ${SEED})`);
      assert.notEqual(err.code, 'internal', `${method}(${JSON.stringify(raw)}): ${err.message} (seed ${SEED})`);
    }
  }
});
