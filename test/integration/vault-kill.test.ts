// kill -9 of a vault writer at random moments: whatever was acknowledged survives with its value,
// nothing half-written appears, and the audit chain stays intact (no fork, no lost entry).
//
// Each round starts test/integration/fixtures/vault-writer.ts (core/vault in a child process), which
// prints `ack NAME` after each committed put, and SIGKILLs it after a random delay: sometimes while it
// starts, opens and unlocks, mostly while it is writing. The random schedule is seeded; a failure
// names the seed and round, and SHIELDLAB_KILL_SEED=N reproduces it (SHIELDLAB_KILL_ROUNDS=N for more).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { Vault } from '../../core/vault/mod.ts';
import { ROOT, cliJson, secretFile, tempDir } from '../helpers/home.ts';
import { valueFor } from './fixtures/values.ts';
import { rng as prng } from '../helpers/random.ts';

const WRITER = join(ROOT, 'test/integration/fixtures/vault-writer.ts');
const ROUNDS = Number(process.env.SHIELDLAB_KILL_ROUNDS ?? 30);
const SEED = Number(process.env.SHIELDLAB_KILL_SEED ?? Date.now() % 2 ** 31);

interface Plan {
  /** Start the kill timer when the writer prints `ready` (else at spawn). */
  afterReady: boolean;
  delayMs: number;
  /** Puts before the writer closes the vault by itself (0 = until killed). */
  count: number;
}

interface Outcome {
  acks: string[];
  lines: string[];
  signal: NodeJS.Signals | null;
  code: number | null;
  stderr: string;
}

function runAndKill(home: string, passFile: string, prefix: string, plan: Plan): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WRITER, home, passFile, prefix, String(plan.count)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let buffered = '';
    let stderr = '';
    const lines: string[] = [];
    let timer: NodeJS.Timeout | undefined;
    const arm = () => {
      timer = setTimeout(() => child.kill('SIGKILL'), plan.delayMs);
    };
    // Never let a stuck child hang the suite.
    const guard = setTimeout(() => child.kill('SIGKILL'), 20_000);
    if (!plan.afterReady) arm();
    child.stdout.on('data', (d: Buffer) => {
      buffered += d.toString('utf8');
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        lines.push(line);
        if (line === 'ready' && plan.afterReady) arm();
      }
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      clearTimeout(guard);
      // Only whole lines count: a line is written with one write(2), so a torn ack cannot occur.
      const acks = lines.filter((l) => l.startsWith('ack ')).map((l) => l.slice(4));
      resolve({ acks, lines, signal, code, stderr });
    });
  });
}

test(`kill -9 of a writer at random moments, ${ROUNDS} rounds (seed ${SEED})`, { timeout: 120_000 }, async (t) => {
  const { dir, cleanup } = tempDir('shieldlab-kill-');
  t.after(cleanup);
  const home = join(dir, 'home');
  const passphrase = 'kill -9 passphrase';
  const passFile = secretFile(dir, 'pp', passphrase);
  const init = await cliJson(['--home', home, 'vault', 'init', '--no-keychain', '--passphrase-file', passFile, '--kdf-memory-mib', '16']);
  assert.equal(init.code, 0, init.stderr);

  const random = prng(SEED);
  const acked = new Map<string, string>();
  let lastSeq = 0;
  let killedWhileWriting = 0;
  let killedBeforeReady = 0;
  const started = performance.now();

  for (let round = 0; round < ROUNDS; round++) {
    const where = `seed ${SEED}, round ${round}`;
    const prefix = `r${round}`;
    const r = random();
    const plan: Plan =
      r < 0.25
        ? { afterReady: false, delayMs: Math.floor(random() * 300), count: 0 } // during start/open/unlock/first puts
        : r < 0.4
          ? { afterReady: true, delayMs: Math.floor(random() * 40), count: 1 + Math.floor(random() * 30) } // around its own close
          : { afterReady: true, delayMs: Math.floor(random() * 120), count: 0 }; // in the middle of writing
    const out = await runAndKill(home, passFile, prefix, plan);
    const errors = out.lines.filter((l) => l.startsWith('error ') || l.startsWith('busy '));
    assert.deepEqual(errors, [], `${where}: the writer reported ${errors.join('; ')}\n${out.stderr}`);
    assert.ok(out.signal === 'SIGKILL' || (out.code === 0 && out.lines.includes('done')), `${where}: writer ended with ${out.code ?? out.signal}\n${out.stderr}`);
    if (out.signal === 'SIGKILL') {
      if (out.lines.includes('ready')) killedWhileWriting++;
      else killedBeforeReady++;
    }
    for (const name of out.acks) acked.set(name, valueFor(name));

    // Reopen as the next user would; one unlock per round (16 MiB scrypt).
    const vault = Vault.open(home);
    try {
      await vault.unlock({ passphrase: Buffer.from(passphrase) });
      for (const name of out.acks) {
        const rec = vault.getRecord('secret', name);
        assert.equal(Buffer.from(rec.data, 'base64').toString('utf8'), valueFor(name), `${where}: ${name} has the wrong value`);
      }
      // Nothing beyond the acks except, at most, the one put that committed just before the kill.
      const present = vault
        .listRecords('secret')
        .map((rec) => rec.name)
        .filter((n) => n.startsWith(`${prefix}-`))
        .sort((a, b) => Number(a.slice(prefix.length + 1)) - Number(b.slice(prefix.length + 1)));
      const expected = out.acks.map((_, i) => `${prefix}-${i}`);
      assert.deepEqual(out.acks, expected, `${where}: acks out of order`);
      assert.ok(
        present.length === expected.length || (present.length === expected.length + 1 && present.at(-1) === `${prefix}-${expected.length}`),
        `${where}: acked ${expected.length}, found ${present.join(',')}`,
      );
      assert.deepEqual(present.slice(0, expected.length), expected, `${where}: an acked record is missing`);
      if (present.length > expected.length) {
        // The unacked survivor is whole, not half-written.
        const extra = present.at(-1)!;
        assert.equal(Buffer.from(vault.getRecord('secret', extra).data, 'base64').toString('utf8'), valueFor(extra));
        acked.set(extra, valueFor(extra));
      }
      // A record and its audit entry land together or not at all.
      const entries = vault.readAudit({ afterSeq: lastSeq, limit: 100_000 });
      const creates = entries.filter((e) => e.action === 'record.create' && e.subject?.startsWith(`secret:${prefix}-`));
      assert.equal(creates.length, present.length, `${where}: ${present.length} records but ${creates.length} record.create entries`);
      const verification = vault.verifyAudit();
      assert.deepEqual(verification.problems, [], `${where}: audit chain broken`);
      assert.equal(verification.anchored, true, `${where}: audit anchor lost`);
      lastSeq = Math.max(lastSeq, ...entries.map((e) => e.seq));
    } finally {
      vault.close();
    }
  }

  // Finally an independent process (the real CLI) sees every record and an intact chain.
  const list = await cliJson<{ records: { name: string }[] }>(['--home', home, 'vault', 'list', '--passphrase-file', passFile]);
  assert.equal(list.code, 0, list.stderr);
  assert.deepEqual(list.body.records.map((r) => r.name).sort(), [...acked.keys()].sort());
  const audit = await cliJson<{ verification: { ok: boolean; problems: unknown[] } }>(['--home', home, 'vault', 'audit', '--verify', '--limit', '1', '--passphrase-file', passFile]);
  assert.equal(audit.code, 0, JSON.stringify(audit.body));
  assert.equal(audit.body.verification.ok, true);
  t.diagnostic(
    `seed ${SEED}: ${ROUNDS} rounds in ${Math.round(performance.now() - started)} ms; ${acked.size} records; ` +
      `killed while writing ${killedWhileWriting}, before ready ${killedBeforeReady}, exited by itself ${ROUNDS - killedWhileWriting - killedBeforeReady}`,
  );
  assert.ok(killedWhileWriting >= ROUNDS / 4, `only ${killedWhileWriting} of ${ROUNDS} kills landed while writing`);
});
