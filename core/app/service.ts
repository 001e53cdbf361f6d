// The one service every front door calls. It validates arguments and results against the contract
// (results pass through their schema, which also strips anything not declared — a guard against
// leaking fields), runs the handler, and turns every failure into a ShieldError.
//
// Loading is lazy: the vault (better-sqlite3, the keychain), the guardians (node-forge), attestation
// and shielded disks are imported on the first call that needs them, so a command that needs none
// of it (`vhdx convert`, `vhdx info`) starts without paying for it.
import { statSync } from 'node:fs';
import { homedir } from 'node:os';
import { extname, join } from 'node:path';
import { randomUUID } from 'node:crypto';
import type { z } from 'zod';
import { contract, isMethodName, type AppEvent, type MethodName, type ParsedArgs, type ProgressEvent, type Result, type VaultStatus } from './contract.ts';
import { ShieldError, toShieldError } from '../errors.ts';
import { checkVhdx, convertRawToVhdx, convertVhdxToRaw, createDifferencingVhdx, createVhdx, openVhdx, parseSize, resizeVhdx } from '../vhdx/mod.ts';
import type { Keychain, Protection, Vault } from '../vault/mod.ts';

export interface CallContext {
  callId?: string;
  onProgress?: (e: ProgressEvent) => void;
  /** Cancels long work (conversions); what was half-made is removed. Stops a server that runs until stopped. */
  signal?: AbortSignal;
  /** A line for the person at the front door while the call runs (e.g. where a server listens). */
  notice?: (text: string) => void;
}

export interface AppOptions {
  home: string;
  /** The OS keychain; tests pass a real one bound to their own Secret Service. */
  keychain?: Keychain;
  /** Where diagnostics go. Never receives secrets: only codes and messages. */
  log?: (line: string) => void;
}

type Handler<M extends MethodName> = (args: ParsedArgs<M>, ctx: CallContext) => Promise<Result<M>>;
type VhdxMethods = Extract<MethodName, `vhdx.${string}`>;
/** Every method but the VHDX ones: their handlers are made on first use, with the modules they need. */
type LazyMethods = Exclude<MethodName, VhdxMethods>;
type Handlers<M extends MethodName> = { [K in M]: Handler<K> };

type VaultModule = typeof import('../vault/mod.ts');
let vaultModule: VaultModule | undefined;
/** The vault module once loaded; only ever called from code that runs after `loadHandlers`. */
function vaultMod(): VaultModule {
  if (!vaultModule) throw new Error('the vault module is not loaded yet');
  return vaultModule;
}

/** The per-user app-data folder when neither --home nor $SHIELDLAB_HOME is set. */
export function defaultHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SHIELDLAB_HOME) return env.SHIELDLAB_HOME;
  switch (process.platform) {
    case 'win32':
      return join(env.APPDATA ?? join(homedir(), 'AppData', 'Roaming'), 'ShieldLab');
    case 'darwin':
      return join(homedir(), 'Library', 'Application Support', 'ShieldLab');
    default:
      return join(env.XDG_DATA_HOME ?? join(homedir(), '.local', 'share'), 'shieldlab');
  }
}

function passphraseBuffer(text: string | undefined): Buffer | undefined {
  return text === undefined ? undefined : Buffer.from(text, 'utf8');
}

export class ShieldLabApp {
  readonly home: string;
  private readonly givenKeychain: Keychain | undefined;
  private osKeychain: Keychain | null = null;
  private readonly log: (line: string) => void;
  private vault: Vault | null = null;
  private idleTimer: NodeJS.Timeout | null = null;
  private readonly listeners = new Set<(e: AppEvent) => void>();

  constructor(opts: AppOptions) {
    this.home = opts.home;
    this.givenKeychain = opts.keychain;
    this.log = opts.log ?? (() => undefined);
  }

  onEvent(listener: (e: AppEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(e: AppEvent): void {
    for (const l of this.listeners) l(e);
  }

  /** Validates, runs, validates the result. Throws ShieldError only. */
  async invoke(methodName: string, rawArgs: unknown, ctx: CallContext = {}): Promise<unknown> {
    if (!isMethodName(methodName)) throw new ShieldError('usage', `Unknown method: ${methodName}`);
    const spec = contract[methodName];
    const parsed = spec.args.safeParse(rawArgs ?? {});
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      const where = issue?.path.length ? `${issue.path.join('.')}: ` : '';
      throw new ShieldError('invalid_argument', `${where}${issue?.message ?? 'invalid arguments'}`);
    }
    try {
      const handler = await this.handler(methodName);
      const result = await handler(parsed.data as never, { ...ctx, callId: ctx.callId ?? randomUUID() });
      return (spec.result as z.ZodType).parse(result);
    } catch (err) {
      if (ctx.signal?.aborted && err === ctx.signal.reason) throw new ShieldError('cancelled', 'Cancelled: nothing was written.');
      const e = toShieldError(err);
      if (e.code === 'internal') this.log(`internal error in ${methodName}: ${(err as Error)?.stack ?? String(err)}`);
      throw e;
    } finally {
      // Reading status (a UI polling it) is not activity: it must not keep the vault open.
      if (methodName !== 'vault.status') this.touch();
    }
  }

  /** Whether the vault is unlocked now: sent to a front door when it connects, so it never starts stale. */
  get isUnlocked(): boolean {
    return this.vault?.unlocked ?? false;
  }

  /**
   * Before the process quits: VMs it runs detached (started from the app or web mode) are powered
   * down — their disks are served from this process — then the vault is closed.
   */
  async shutdown(opts: { vmTimeoutMs?: number } = {}): Promise<void> {
    if (this.lazyHandlers !== null) {
      const { stopDetachedRuns } = await import('./vm-handlers.ts');
      await stopDetachedRuns(opts.vmTimeoutMs);
    }
    this.close();
  }

  close(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.vault?.close();
    this.vault = null;
  }

  // ---- session helpers -------------------------------------------------------------------

  /** The OS keychain (made on first use: its module comes with the vault's), unless one was given. */
  private get keychain(): Keychain {
    if (this.givenKeychain) return this.givenKeychain;
    this.osKeychain ??= new (vaultMod().OsKeychain)();
    return this.osKeychain;
  }

  private openVault(): Vault {
    this.vault ??= vaultMod().Vault.open(this.home);
    return this.vault;
  }

  private unlocked(): Vault {
    const v = this.openVault();
    if (!v.unlocked) throw new ShieldError('locked', 'The vault is locked. Unlock it with the OS keychain or its passphrase.');
    return v;
  }

  /** Restarts the idle timer; locking on idle wipes the keys and tells connected front doors. */
  private touch(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    const v = this.vault;
    if (!v?.unlocked) return;
    const minutes = v.autoLockMinutes();
    if (minutes <= 0) return;
    this.idleTimer = setTimeout(() => {
      v.lock({ reason: 'idle' });
      this.emit({ type: 'state', unlocked: false, reason: 'idle' });
    }, minutes * 60_000);
    this.idleTimer.unref();
  }

  private status(): VaultStatus {
    if (!this.vault && !vaultMod().Vault.exists(this.home)) return { initialised: false, home: this.home, unlocked: false, slots: [] };
    return { initialised: true, home: this.home, ...this.openVault().status() };
  }

  private protection(args: { passphrase?: string; keychain: boolean; kdfMemoryMib: number }): Protection {
    if (!args.keychain && !args.passphrase) {
      throw new ShieldError('invalid_argument', 'Without the OS keychain the vault needs a passphrase (--passphrase-file F).');
    }
    const p: Protection = { kdf: { N: args.kdfMemoryMib * 1024, r: 8, p: 1 } };
    if (args.keychain) p.keychain = this.keychain;
    const pass = passphraseBuffer(args.passphrase);
    if (pass) p.passphrase = pass;
    return p;
  }

  private progress(ctx: CallContext, method: MethodName, phase: string, unit: 'records' | 'bytes' | 'steps') {
    return (done: number, total: number) => {
      const e: ProgressEvent = { type: 'progress', callId: ctx.callId ?? '', method, phase, done, total, unit };
      ctx.onProgress?.(e);
      this.emit(e);
    };
  }

  // ---- handlers: one per contract method ----------------------------------------------------

  private lazyHandlers: Promise<Handlers<LazyMethods>> | null = null;

  private async handler(method: MethodName): Promise<Handler<MethodName>> {
    if (Object.hasOwn(this.vhdxHandlers, method)) return this.vhdxHandlers[method as VhdxMethods] as Handler<MethodName>;
    this.lazyHandlers ??= this.loadHandlers().catch((err: unknown) => {
      this.lazyHandlers = null; // a failed load is tried again on the next call
      throw err;
    });
    return (await this.lazyHandlers)[method as LazyMethods] as Handler<MethodName>;
  }

  /** The vault, guardian, disk and VM handlers, with the modules they need (loaded once, on first use). */
  private async loadHandlers(): Promise<Handlers<LazyMethods>> {
    const [vaultModuleLoaded, { GuardianStore }, { guardianHandlers }, { diskHandlers }, { vmHandlers }] = await Promise.all([
      import('../vault/mod.ts'),
      import('../guardian/store.ts'),
      import('./guardian-handlers.ts'),
      import('./disk-handlers.ts'),
      import('./vm-handlers.ts'),
    ]);
    vaultModule = vaultModuleLoaded;
    const { Vault, restoreBackup, writeBackup } = vaultModuleLoaded;
    return {
      'vault.status': async () => this.status(),

      'vault.init': async (args) => {
        const protection = this.protection(args);
        try {
          this.vault = await Vault.create(this.home, protection);
        } finally {
          protection.passphrase?.fill(0);
        }
        this.emit({ type: 'state', unlocked: true });
        return this.status();
      },

      'vault.unlock': async (args) => {
        const v = this.openVault();
        const pass = passphraseBuffer(args.passphrase);
        try {
          await v.unlock(pass ? { passphrase: pass } : { keychain: this.keychain });
        } finally {
          pass?.fill(0);
        }
        this.emit({ type: 'state', unlocked: true });
        return this.status();
      },

      'vault.lock': async () => {
        this.openVault().lock();
        this.emit({ type: 'state', unlocked: false, reason: 'requested' });
        return this.status();
      },

      'vault.put': async (args) => {
        const value = Buffer.from(args.value, 'utf8');
        try {
          const r = this.unlocked().putRecord('secret', { name: args.name, data: value, tags: args.tags, notes: args.notes });
          return { name: args.name, version: r.version, created: r.created };
        } finally {
          value.fill(0);
        }
      },

      'vault.get': async (args) => {
        const rec = this.unlocked().getRecord('secret', args.name);
        const data = Buffer.from(rec.data, 'base64');
        const value = data.toString('utf8');
        data.fill(0);
        return { name: rec.name, value, tags: rec.tags, notes: rec.notes, version: rec.version, updatedAt: rec.updatedAt };
      },

      'vault.list': async (args) => ({ records: this.unlocked().listRecords(args.kind) }),

      'vault.delete': async (args) => {
        this.unlocked().deleteRecord('secret', args.name);
        return { name: args.name, deleted: true as const };
      },

      'vault.audit': async (args) => {
        const v = this.unlocked();
        const entries = v.readAudit({ limit: args.limit });
        if (!args.verify) return { entries };
        const verification = v.verifyAudit();
        v.record({ action: 'audit.verify', outcome: verification.problems.length ? 'failed' : 'ok', reason: `${verification.problems.length} problem(s)` });
        return { entries, verification: { ok: verification.problems.length === 0, ...verification } };
      },

      'vault.backup': async (args) => {
        const v = this.unlocked();
        const header = writeBackup(v, args.out);
        // The backup holds every guardian's private keys: they are now backed up.
        const guardians = new GuardianStore(v);
        guardians.markBackedUp(guardians.list().filter((g) => g.hasPrivateKeys).map((g) => g.name));
        return { file: args.out, bytes: statSync(args.out).size, records: header.records, recoverySetId: header.recoverySetId };
      },

      'vault.restore': async (args) => {
        const protection = this.protection(args);
        try {
          this.vault?.close();
          this.vault = await restoreBackup({ home: this.home, file: args.file, shares: args.share, protection });
        } finally {
          protection.passphrase?.fill(0);
        }
        this.emit({ type: 'state', unlocked: true });
        return this.status();
      },

      'vault.recoverySplit': async (args) => {
        if (args.threshold > args.shares) throw new ShieldError('invalid_argument', 'The threshold cannot exceed the number of shares.');
        const r = await this.unlocked().splitRecovery(args.shares, args.threshold);
        return { setId: r.setId, threshold: args.threshold, shares: r.shares };
      },

      'vault.recover': async (args) => {
        const v = this.openVault();
        const protection = this.protection(args);
        try {
          if (!v.unlocked) await v.unlock({ shares: args.share });
          await v.reprotect({ ...protection, dropOthers: true }, 'vault.recover');
        } finally {
          protection.passphrase?.fill(0);
        }
        this.emit({ type: 'state', unlocked: true });
        return this.status();
      },

      'vault.changePassphrase': async (args) => {
        const pass = Buffer.from(args.newPassphrase, 'utf8');
        try {
          await this.unlocked().reprotect({ passphrase: pass, kdf: { N: args.kdfMemoryMib * 1024, r: 8, p: 1 } }, 'vault.passphrase');
        } finally {
          pass.fill(0);
        }
        return this.status();
      },

      'vault.rotateKey': async (args, ctx) => {
        const v = this.unlocked();
        const pass = passphraseBuffer(args.passphrase);
        try {
          const hasKeychain = v.status().slots.includes('keychain');
          return await v.rotateKey({
            ...(pass ? { passphrase: pass } : {}),
            ...(hasKeychain ? { keychain: this.keychain } : {}),
            onProgress: this.progress(ctx, 'vault.rotateKey', 're-encrypting records', 'records'),
          });
        } finally {
          pass?.fill(0);
        }
      },

      ...guardianHandlers(() => this.unlocked()),
      ...diskHandlers(() => this.unlocked(), (ctx, method, phase) => this.progress(ctx, method, phase, 'bytes')),
      ...vmHandlers(() => this.unlocked(), (ctx, phase, done, total) => this.progress(ctx, 'vm.start', phase, 'steps')(done, total)),

      'vault.settings': async (args) => {
        const v = this.unlocked();
        if (args.autoLockMinutes !== undefined) v.setAutoLock(args.autoLockMinutes);
        return { autoLockMinutes: v.autoLockMinutes() };
      },
    };
  }

  private readonly vhdxHandlers: Handlers<VhdxMethods> = {
    'vhdx.info': async (args) => {
      const image = await openVhdx(args.file, args.parent !== undefined ? { parent: args.parent } : {});
      try {
        return image.info;
      } finally {
        await image.close();
      }
    },

    'vhdx.create': async (args) => {
      const blockSize = args.blockSize === undefined ? undefined : parseSize(args.blockSize, 'block size');
      if (args.parent !== undefined) return createDifferencing(args.file, args.parent, { ...args, blockSize });
      if (args.size === undefined) throw new ShieldError('invalid_argument', 'Give the disk size with --size (or --parent for a differencing disk).');
      return createVhdx(args.file, {
        size: parseSize(args.size, 'disk size'),
        type: args.fixed ? 'fixed' : 'dynamic',
        ...(blockSize !== undefined ? { blockSize } : {}),
        ...(args.logicalSector !== undefined ? { logicalSectorSize: args.logicalSector } : {}),
      });
    },

    'vhdx.convert': async (args, ctx) => {
      const from = args.from ?? formatByExtension(args.input);
      const to = args.to ?? formatByExtension(args.output);
      if (from === to) throw new ShieldError('invalid_argument', `Both sides are ${from}: convert converts raw to VHDX or VHDX to raw.`);
      const onProgress = this.progress(ctx, 'vhdx.convert', `converting ${from} to ${to}`, 'bytes');
      if (to === 'raw') {
        if (args.fixed || args.blockSize !== undefined || args.logicalSector !== undefined) {
          throw new ShieldError('invalid_argument', '--fixed, --block-size and --logical-sector apply to VHDX output only.');
        }
        return { ...(await convertVhdxToRaw(args.input, args.output, { onProgress, ...(ctx.signal ? { signal: ctx.signal } : {}) })), from, to };
      }
      const blockSize = args.blockSize === undefined ? undefined : parseSize(args.blockSize, 'block size');
      const r = await convertRawToVhdx(args.input, args.output, {
        type: args.fixed ? 'fixed' : 'dynamic',
        ...(blockSize !== undefined ? { blockSize } : {}),
        ...(args.logicalSector !== undefined ? { logicalSectorSize: args.logicalSector } : {}),
        ...(ctx.signal ? { signal: ctx.signal } : {}),
        onProgress,
      });
      return { ...r, from, to };
    },

    'vhdx.check': async (args, ctx) =>
      checkVhdx(args.file, { repair: args.repair, onProgress: (phase, done, total) => this.progress(ctx, 'vhdx.check', `${phase} the BAT`, 'bytes')(done, total) }),

    'vhdx.resize': async (args) => resizeVhdx(args.file, parseSize(args.size, 'disk size')),
  };
}

/**
 * `vhdx create F --parent P`: size and logical sector size come from the parent, so --size and
 * --logical-sector are accepted only when they agree with it; --fixed makes no sense for a child.
 */
async function createDifferencing(file: string, parent: string, args: { size?: string | undefined; fixed: boolean; blockSize: number | undefined; logicalSector?: number | undefined }) {
  if (args.fixed) throw new ShieldError('invalid_argument', '--fixed and --parent exclude each other: a differencing disk holds only what differs from its parent.');
  if (args.size !== undefined || args.logicalSector !== undefined) {
    const p = await openVhdx(parent);
    const { virtualSize, logicalSectorSize } = p.info.metadata;
    await p.close();
    if (args.size !== undefined && parseSize(args.size, 'disk size') !== virtualSize) {
      throw new ShieldError('invalid_argument', `--size ${args.size} differs from the parent's ${virtualSize} bytes: a differencing disk has its parent's size (leave --size out).`);
    }
    if (args.logicalSector !== undefined && args.logicalSector !== logicalSectorSize) {
      throw new ShieldError('invalid_argument', `--logical-sector ${args.logicalSector} differs from the parent's ${logicalSectorSize}: a differencing disk has its parent's sector size.`);
    }
  }
  return createDifferencingVhdx(file, parent, args.blockSize !== undefined ? { blockSize: args.blockSize } : {});
}

/** raw or vhdx by file extension; anything else needs --from / --to. */
function formatByExtension(file: string): 'raw' | 'vhdx' {
  const ext = extname(file).toLowerCase();
  if (ext === '.vhdx') return 'vhdx';
  if (ext === '.raw' || ext === '.img') return 'raw';
  throw new ShieldError('invalid_argument', `Cannot tell the format of ${file} from its extension (.vhdx, .raw, .img): give --from / --to.`);
}
