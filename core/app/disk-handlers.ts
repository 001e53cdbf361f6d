// Handlers for shielded disks: they join the key protector (guardians) to the disk format (shield).
// Shielding, unshielding and guardian changes are owner operations: the owner's own key unwraps
// the transport key, as an HGS owner guardian can. Running a disk goes through the release gate.
import { extname } from 'node:path';
import { ShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import type { Vault } from '../vault/mod.ts';
import { createKeyProtector, grantGuardian, parseKeyProtector, revokeGuardian, unwrapTransportKey, type HeldGuardian, type KeyProtector } from '../guardian/key-protector.ts';
import { ShieldedDisk, readShieldItem, shieldImage, unshieldImage, type DiskFormat } from '../shield/mod.ts';
import { releaseTransportKey } from '../guardian/release.ts';
import { AttestationService } from '../attestation/service.ts';
import { startNbdServer } from '../nbd/mod.ts';
import type { DiskInfo, MethodName, ParsedArgs, Result } from './contract.ts';
import { describeKp, heldOwnerOf, ownerForNewKp, registerKp, storeOf } from './guardian-handlers.ts';
import type { CallContext } from './service.ts';

type Handler<M extends MethodName> = (args: ParsedArgs<M>, ctx: CallContext) => Promise<Result<M>>;
type DiskMethods = Extract<MethodName, `disk.${string}`>;
type Progress = (ctx: CallContext, method: MethodName, phase: string) => (done: number, total: number) => void;

function formatOf(file: string, given: DiskFormat | undefined, flag: string): DiskFormat {
  if (given) return given;
  const ext = extname(file).toLowerCase();
  if (ext === '.vhdx') return 'vhdx';
  if (ext === '.raw' || ext === '.img') return 'raw';
  throw new ShieldError('invalid_argument', `Cannot tell the format of ${file} from its extension (.vhdx, .raw, .img): give ${flag}.`);
}

/** The transport key through the owner's own key: for owner operations only. The caller wipes it. */
function ownerTransportKey(kp: KeyProtector, owner: HeldGuardian): Buffer {
  return unwrapTransportKey(kp, { encryptionThumbprint: kp.owner.encryptionThumbprint, encryptionKey: owner.keys.encryptionKey });
}

/**
 * The highest generation this host has seen of an integrity-mode disk: an older one presented
 * later is a rollback. Kept in the vault, so a storage admin cannot reset it with the file.
 */
export function lastSeenGeneration(v: Vault, diskId: string): bigint | null {
  if (!v.hasRecord('shielded-disk', diskId)) return null;
  const rec = v.getRecord('shielded-disk', diskId, { audit: false });
  return BigInt((JSON.parse(Buffer.from(rec.data, 'base64').toString('utf8')) as { generation: string }).generation);
}

export function rememberGeneration(v: Vault, diskId: string, generation: bigint): void {
  const seen = lastSeenGeneration(v, diskId);
  if (seen !== null && seen >= generation) return;
  v.putRecord('shielded-disk', { name: diskId, data: Buffer.from(JSON.stringify({ generation: generation.toString() })), notes: 'integrity-mode generation' });
}

export function diskHandlers(vault: () => Vault, progress: Progress): { [M in DiskMethods]: Handler<M> } {
  const store = () => storeOf(vault());
  const signal = (ctx: CallContext) => (ctx.signal ? { signal: ctx.signal } : {});

  async function info(file: string): Promise<DiskInfo> {
    const { item, image } = await readShieldItem(file);
    return {
      file,
      virtualSize: image.metadata.virtualSize,
      blockSize: image.metadata.blockSize,
      logicalSectorSize: image.metadata.logicalSectorSize,
      fileSize: image.fileSize,
      cipher: 'aes-256-xts',
      unitSize: item.unitSize,
      integrity: item.integrity,
      diskId: item.diskId,
      generation: item.generation.toString(),
      blocks: image.bat.states,
      kp: describeKp(parseKeyProtector(item.kp), file, store()),
    };
  }

  /** Owner-only change of who may run the disk: a new KP, resealed into the item in place. */
  async function changeGuardians(file: string, what: 'grant' | 'revoke', make: (kp: KeyProtector, owner: HeldGuardian) => Buffer): Promise<DiskInfo> {
    const s = store();
    const { item } = await readShieldItem(file);
    const kp = parseKeyProtector(item.kp);
    const owner = heldOwnerOf(s, kp, what);
    const next = make(kp, owner);
    const tk = ownerTransportKey(kp, owner);
    try {
      const disk = await ShieldedDisk.open(file, tk);
      try {
        await disk.reseal({ kp: next });
      } finally {
        await disk.close();
      }
    } finally {
      wipe(tk);
    }
    const nextKp = parseKeyProtector(next);
    registerKp(vault(), nextKp, file);
    return info(file);
  }

  return {
    'disk.shield': async (args, ctx) => {
      const s = store();
      const owner = ownerForNewKp(s, args.owner);
      const from = formatOf(args.input, args.from, '--from');
      const kpBytes = createKeyProtector({
        owner,
        guardians: args.guardian.map((g) => ({ name: g, ...s.certificates(g) })),
        policy: { modes: args.allowMode, hosts: args.allowHost },
      });
      const kp = parseKeyProtector(kpBytes);
      const tk = ownerTransportKey(kp, owner);
      try {
        const r = await shieldImage(args.input, from, args.out, {
          kp: kpBytes,
          transportKey: tk,
          ...(args.unitSize !== undefined ? { unitSize: args.unitSize } : {}),
          integrity: args.integrity,
          onProgress: progress(ctx, 'disk.shield', 'encrypting'),
          ...signal(ctx),
        });
        registerKp(vault(), kp, args.out);
        if (r.integrity) rememberGeneration(vault(), r.diskId, r.generation);
        vault().record({ action: 'disk.shield', outcome: 'ok', subject: `${kp.authorization.kpId} ${args.out}${r.integrity ? ' (integrity)' : ''}` });
        return { ...r, generation: r.generation.toString(), kp: describeKp(kp, args.out, s) };
      } finally {
        wipe(tk);
      }
    },

    'disk.unshield': async (args, ctx) => {
      const s = store();
      const to = formatOf(args.out, args.to, '--to');
      const { item } = await readShieldItem(args.file);
      const kp = parseKeyProtector(item.kp);
      let owner: HeldGuardian;
      try {
        owner = heldOwnerOf(s, kp, 'unshield');
      } catch (err) {
        vault().record({ action: 'disk.unshield', outcome: 'refused', subject: `${kp.authorization.kpId} ${args.file}`, reason: 'not the owner' });
        throw err;
      }
      const tk = ownerTransportKey(kp, owner);
      try {
        const r = await unshieldImage(args.file, tk, args.out, to, { onProgress: progress(ctx, 'disk.unshield', 'decrypting'), ...signal(ctx) });
        vault().record({ action: 'disk.unshield', outcome: 'ok', subject: `${kp.authorization.kpId} ${args.file} → ${args.out}` });
        return r;
      } finally {
        wipe(tk);
      }
    },

    'disk.info': async (args) => info(args.file),

    'disk.serve': async (args, ctx) => {
      const v = vault();
      const { item } = await readShieldItem(args.file);
      const a = new AttestationService(v);
      // The release gate: KP signatures, a guardian held here, a valid health certificate, policy. Audited.
      const { transportKey } = releaseTransportKey(item.kp, { vault: v, guardians: store(), attestation: a, healthCertificate: a.currentEncoded(), purpose: `disk.serve ${args.file}` });
      let disk: ShieldedDisk;
      try {
        disk = await ShieldedDisk.open(args.file, transportKey, {
          readOnly: args.readOnly,
          lastSeenGeneration: item.integrity ? lastSeenGeneration(v, item.diskId) : null,
          onIntegrityEvent: (e) => v.record({ action: `disk.integrity.${e.kind}`, outcome: e.kind === 'violation' ? 'refused' : 'ok', subject: args.file, reason: e.message }),
        });
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === 'shield_rollback') v.record({ action: 'disk.serve', outcome: 'refused', subject: args.file, reason: 'rollback' });
        throw err;
      } finally {
        wipe(transportKey); // the disk holds only the data key derived through it
      }
      try {
        if (disk.integrity) rememberGeneration(v, disk.diskId, disk.generation);
        const server = await startNbdServer({
          disk,
          ...(args.socket ? { socketPath: args.socket } : {}),
          description: `ShieldLab shielded disk ${disk.diskId}`,
          log: () => undefined,
        });
        const uri = `nbd+unix:///?socket=${server.socketPath}`;
        v.record({ action: 'disk.serve', outcome: 'ok', subject: `${args.file} on ${server.socketPath}` });
        ctx.notice?.(`Serving ${args.file} (${disk.size} bytes${args.readOnly ? ', read-only' : ''}) on ${uri} — Ctrl-C to stop.`);
        await new Promise<void>((resolve) => {
          if (!ctx.signal) return; // nothing can stop it: only a front door with a stop signal serves
          if (ctx.signal.aborted) resolve();
          ctx.signal.addEventListener('abort', () => resolve(), { once: true });
        });
        const stats = server.stats();
        await server.close();
        return {
          file: args.file,
          socket: server.socketPath,
          uri,
          readOnly: args.readOnly,
          generation: disk.integrity ? disk.generation.toString() : null,
          connections: stats.connectionsTotal,
          bytesRead: stats.bytesRead,
          bytesWritten: stats.bytesWritten,
        };
      } finally {
        await disk.close();
      }
    },

    'disk.grant': async (args) => {
      const s = store();
      const r = await changeGuardians(args.file, 'grant', (kp, owner) => grantGuardian(kp, owner, { name: args.guardian, ...s.certificates(args.guardian) }));
      vault().record({ action: 'disk.grant', outcome: 'ok', subject: `${r.kp.kpId} +${args.guardian}` });
      return r;
    },

    'disk.revoke': async (args) => {
      const r = await changeGuardians(args.file, 'revoke', (kp, owner) => revokeGuardian(kp, owner, args.guardian));
      vault().record({ action: 'disk.revoke', outcome: 'ok', subject: `${r.kp.kpId} -${args.guardian}` });
      return r;
    },
  };
}
