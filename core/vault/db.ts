// The vault's SQLite file: pragmas and versioned schema migrations.
import { closeSync, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import { ShieldError, toShieldError } from '../errors.ts';

export type Db = Database.Database;

/** Index i holds the migration from schema version i to i+1. Never edit a released entry: append. */
const MIGRATIONS: readonly string[] = [
  `CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
   CREATE TABLE key_slots (
     kind TEXT PRIMARY KEY CHECK (kind IN ('keychain', 'passphrase', 'recovery')),
     params TEXT NOT NULL,
     wrapped BLOB NOT NULL,
     created_at TEXT NOT NULL
   ) STRICT;
   CREATE TABLE records (
     id TEXT PRIMARY KEY,
     kind TEXT NOT NULL,
     lookup BLOB NOT NULL UNIQUE,
     version INTEGER NOT NULL,
     sealed BLOB NOT NULL,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   ) STRICT;
   CREATE TABLE audit (
     seq INTEGER PRIMARY KEY,
     at TEXT NOT NULL,
     sealed BLOB NOT NULL,
     prev_hash BLOB NOT NULL,
     hash BLOB NOT NULL
   ) STRICT;`,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

export function openDb(path: string, options: { readonly?: boolean; create?: boolean } = {}): Db {
  let db: Db;
  try {
    // Owner-only from the first byte; SQLite gives -wal and -shm the same mode as the database.
    if (options.create) closeSync(openSync(path, 'wx', 0o600));
    db = new Database(path, { readonly: options.readonly ?? false, fileMustExist: !options.create });
  } catch (err) {
    throw toShieldError(err);
  }
  try {
    // A file that is not SQLite fails here, before anything is written.
    db.pragma('busy_timeout = 5000');
    if (!options.create) {
      // An existing vault is never empty, and a damaged one is refused before anything writes to it
      // (setting WAL mode or migrating would otherwise turn an empty file into a new database).
      if ((db.pragma('page_count', { simple: true }) as number) === 0) {
        throw new ShieldError('vault_corrupt', 'The vault database file is empty: it is damaged or not a vault.');
      }
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw new ShieldError('vault_corrupt', 'The vault database file is damaged (integrity check failed).');
    }
    if (!options.readonly) {
      db.pragma('journal_mode = WAL');
      // FULL: a record acknowledged to the caller survives power loss and kill -9.
      db.pragma('synchronous = FULL');
      db.pragma('secure_delete = ON');
    }
    db.pragma('foreign_keys = ON');
    migrate(db);
    return db;
  } catch (err) {
    db.close();
    throw toShieldError(err);
  }
}

function migrate(db: Db): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current > SCHEMA_VERSION) {
    throw new ShieldError('vault_too_new', `This vault uses schema version ${current}; this ShieldLab knows up to ${SCHEMA_VERSION}. Update ShieldLab.`);
  }
  if (current === SCHEMA_VERSION) return;
  if (db.readonly) throw new ShieldError('vault_corrupt', 'The vault needs a schema upgrade but was opened read-only.');
  const step = db.transaction(() => {
    for (let v = current; v < SCHEMA_VERSION; v++) {
      db.exec(MIGRATIONS[v]!);
    }
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  });
  step.immediate();
}

export function getMeta(db: Db, key: string): string | undefined {
  const row = db.prepare('SELECT value FROM meta WHERE key = ?').get(key) as { value: string } | undefined;
  return row?.value;
}

export function setMeta(db: Db, key: string, value: string): void {
  db.prepare('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value').run(key, value);
}
