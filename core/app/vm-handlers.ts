// Handlers for shielded QEMU VMs. A start is the whole promise: attest (the current health
// certificate, or attest now in a mode the disk's key protector allows) → the release gate (audited)
// → the shielded disk opened with the released key (which keeps only its data key) → the vTPM key
// derived from the same transport key → core/hypervisor starts NBD, swtpm and QEMU and watches them.
// The transport key is wiped as soon as the disk and the vTPM key are derived from it.
import { existsSync, rmSync } from 'node:fs';
import { resolve } from 'node:path';
import { ShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import type { Vault } from '../vault/mod.ts';
import { parseKeyProtector } from '../guardian/key-protector.ts';
import { releaseTransportKey } from '../guardian/release.ts';
import { AttestationService } from '../attestation/service.ts';
import { ShieldedDisk, readShieldItem } from '../shield/mod.ts';
import { deriveVtpmKey, readMarker } from '../vtpm/mod.ts';
import { chooseAccel } from '../hypervisor/qemu.ts';
import { checkName, isActive, readState, startVm, stopFromOutside, vmPaths, type RunningVm, type VmRecord } from '../hypervisor/vm.ts';
import type { MethodName, ParsedArgs, Result, VmInfo } from './contract.ts';
import { lastSeenGeneration, rememberGeneration } from './disk-handlers.ts';
import { held, storeOf } from './guardian-handlers.ts';
import type { CallContext } from './service.ts';

type Handler<M extends MethodName> = (args: ParsedArgs<M>, ctx: CallContext) => Promise<Result<M>>;
type VmMethods = Extract<MethodName, `vm.${string}`>;

function loadVm(v: Vault, name: string): VmRecord {
  checkName(name);
  if (!v.hasRecord('vm', name)) throw new ShieldError('not_found', `No VM named ${name} (see \`shieldlab vm list\`).`);
  return JSON.parse(Buffer.from(v.getRecord('vm', name, { audit: false }).data, 'base64').toString('utf8')) as VmRecord;
}

function saveVm(v: Vault, vm: VmRecord): void {
  v.putRecord('vm', { name: vm.name, data: Buffer.from(JSON.stringify(vm)), notes: `${vm.level} VM on ${vm.disk}` });
}

function infoOf(v: Vault, vm: VmRecord): VmInfo {
  const paths = vmPaths(v.home, vm.name);
  const s = readState(paths);
  const now = chooseAccel();
  let provisioned = false;
  try {
    provisioned = readMarker(paths.tpm) !== null;
  } catch {
    provisioned = false;
  }
  return {
    name: vm.name,
    disk: vm.disk,
    diskId: vm.diskId,
    memoryMiB: vm.memoryMiB,
    cpus: vm.cpus,
    level: vm.level,
    console: vm.console,
    kernel: vm.kernel,
    initrd: vm.initrd,
    append: vm.append,
    createdAt: vm.createdAt,
    tpmState: paths.tpm,
    vtpmProvisioned: provisioned,
    status: s.status,
    accel: s.accel ?? now.accel,
    accelReason: s.accelReason ?? now.reason,
    secureBoot: s.secureBoot ?? vm.level === 'shielded',
    startedAt: s.startedAt,
    stoppedAt: s.stoppedAt,
    reason: s.reason,
    pid: isActive(s) ? s.pid : null,
    qemuPid: isActive(s) ? s.qemuPid : null,
    consoleAt: isActive(s) ? s.console : null,
  };
}

/** A valid health certificate, or attest now in a mode the key protector allows and this host is set up for. */
async function ensureAttested(a: AttestationService, modes: readonly string[]): Promise<void> {
  const st = a.status();
  if (st.certificate?.valid && modes.includes(st.certificate.mode)) return;
  if (modes.includes('tpm') && st.tpm) await a.attestTpm({ address: a.tpmAddress() });
  else if (modes.includes('ad-group') && st.ad) await a.attestAdGroup();
  else if (modes.includes('host-key') && st.hostKeyRegistered) a.attestHostKey();
  // Otherwise the release gate refuses, with its reason (no or wrong health certificate).
}

export function vmHandlers(vault: () => Vault): { [M in VmMethods]: Handler<M> } {
  return {
    'vm.create': async (args) => {
      const v = vault();
      checkName(args.name);
      if (v.hasRecord('vm', args.name)) throw new ShieldError('already_exists', `A VM named ${args.name} exists already.`);
      const disk = resolve(args.disk);
      const { item } = await readShieldItem(disk); // a shielded disk, or a typed refusal
      if (args.level === 'shielded' && args.console !== undefined) throw new ShieldError('invalid_argument', 'A shielded VM has no console: --console is for the encryption-supported level.');
      if ((args.initrd !== undefined || args.append !== undefined) && args.kernel === undefined) throw new ShieldError('invalid_argument', '--initrd and --append go with --kernel.');
      for (const f of [args.kernel, args.initrd]) if (f !== undefined && !existsSync(f)) throw new ShieldError('not_found', `${f} does not exist.`);
      const paths = vmPaths(v.home, args.name);
      const st = readState(paths);
      if (isActive(st)) throw new ShieldError('already_exists', `Something runs as VM ${args.name} (pid ${st.pid}).`);
      const vm: VmRecord = {
        name: args.name,
        disk,
        diskId: item.diskId,
        memoryMiB: args.memory,
        cpus: args.cpus,
        level: args.level,
        console: args.level === 'encryption-supported' ? (args.console ?? 'serial-log') : null,
        kernel: args.kernel !== undefined ? resolve(args.kernel) : null,
        initrd: args.initrd !== undefined ? resolve(args.initrd) : null,
        append: args.append ?? null,
        createdAt: new Date().toISOString(),
      };
      saveVm(v, vm);
      v.record({ action: 'vm.create', outcome: 'ok', subject: args.name, reason: `${vm.level}, ${disk}` });
      return infoOf(v, vm);
    },

    'vm.start': async (args, ctx) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      const paths = vmPaths(v.home, vm.name);
      const st = readState(paths);
      if (isActive(st)) throw new ShieldError('already_exists', `VM ${vm.name} is running already (pid ${st.pid}).`);
      if (args.testChannel !== undefined && vm.level === 'shielded') {
        throw new ShieldError('invalid_argument', 'The test channel is a way out of the guest: it is refused for shielded VMs.', { details: { reason: 'test_channel_in_shielded' } });
      }
      const { item } = await readShieldItem(vm.disk);
      if (item.diskId !== vm.diskId) {
        v.record({ action: 'vm.start', outcome: 'refused', subject: vm.name, reason: 'disk_replaced' });
        throw new ShieldError('shield_tampered', `${vm.disk} is another disk than the one VM ${vm.name} was created with (disk ID ${item.diskId}, expected ${vm.diskId}).`);
      }
      const a = new AttestationService(v);
      await ensureAttested(a, parseKeyProtector(item.kp).authorization.policy.modes);
      // The release gate: KP signatures, a guardian held here, a valid health certificate, policy. Audited.
      const released = releaseTransportKey(item.kp, { vault: v, guardians: storeOf(v), attestation: a, healthCertificate: a.currentEncoded(), purpose: `vm.start ${vm.name}` });
      let disk: ShieldedDisk;
      let vtpmKey: Buffer;
      try {
        disk = await ShieldedDisk.open(vm.disk, released.transportKey, {
          lastSeenGeneration: item.integrity ? lastSeenGeneration(v, item.diskId) : null,
          onIntegrityEvent: (e) => v.record({ action: `disk.integrity.${e.kind}`, outcome: e.kind === 'violation' ? 'refused' : 'ok', subject: vm.disk, reason: e.message }),
        });
        vtpmKey = deriveVtpmKey(released.transportKey);
      } catch (err) {
        if ((err as { code?: string }).code === 'shield_rollback') v.record({ action: 'vm.start', outcome: 'refused', subject: vm.name, reason: 'rollback' });
        throw err;
      } finally {
        wipe(released.transportKey);
      }
      if (disk.integrity) rememberGeneration(v, disk.diskId, disk.generation);
      let run: RunningVm;
      try {
        run = await startVm({
          home: v.home,
          vm,
          disk,
          vtpmKey,
          ekCa: held(storeOf(v), released.guardian),
          audit: (e) => v.record(e),
          powerDownTimeoutMs: args.powerDownTimeout * 1000,
          ...(args.testChannel !== undefined ? { testChannel: args.testChannel } : {}),
        });
      } finally {
        wipe(vtpmKey);
      }
      ctx.notice?.(
        `VM ${vm.name} runs (${vm.level}, ${run.accel === 'kvm' ? 'KVM' : 'TCG emulation'}${run.secureBoot ? ', Secure Boot' : ''}; QEMU pid ${run.qemuPid}${run.console ? `; console: ${run.console}` : ''}) — Ctrl-C or \`shieldlab vm stop ${vm.name}\` to stop.`,
      );
      const onAbort = () => void run.stop();
      if (ctx.signal) {
        if (ctx.signal.aborted) onAbort();
        else ctx.signal.addEventListener('abort', onAbort, { once: true });
      }
      const exit = await run.done;
      ctx.signal?.removeEventListener('abort', onAbort);
      return {
        name: vm.name,
        level: vm.level,
        status: exit.status,
        cause: exit.cause,
        reason: exit.reason,
        accel: run.accel,
        secureBoot: run.secureBoot,
        vtpmProvisioned: readMarker(paths.tpm) !== null,
        startedAt: exit.startedAt,
        stoppedAt: exit.stoppedAt,
        qemuExit: exit.qemuExit,
      };
    },

    'vm.stop': async (args) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      const r = await stopFromOutside(vmPaths(v.home, vm.name), { force: args.force, timeoutMs: args.timeout * 1000 });
      if (r.how !== 'not-running') v.record({ action: 'vm.stop', outcome: 'ok', subject: vm.name, reason: `requested (${r.how})` });
      return { name: vm.name, how: r.how, status: readState(vmPaths(v.home, vm.name)).status };
    },

    'vm.status': async (args) => {
      const v = vault();
      const host = chooseAccel();
      const names = args.name !== undefined ? [loadVm(v, args.name).name] : v.listRecords('vm').map((r) => r.name);
      return { host: { accel: host.accel, accelReason: host.reason }, vms: names.map((n) => infoOf(v, loadVm(v, n))) };
    },

    'vm.list': async () => {
      const v = vault();
      return { vms: v.listRecords('vm').map((r) => infoOf(v, loadVm(v, r.name))) };
    },

    'vm.delete': async (args) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      const paths = vmPaths(v.home, vm.name);
      if (isActive(readState(paths))) throw new ShieldError('invalid_argument', `VM ${vm.name} is running: stop it first.`);
      if (!args.yes) throw new ShieldError('usage', `Deleting VM ${vm.name} removes its vTPM state (${paths.tpm}): keys sealed to its TPM are lost. Add --yes. The disk ${vm.disk} stays.`);
      v.deleteRecord('vm', vm.name);
      rmSync(paths.dir, { recursive: true, force: true });
      v.record({ action: 'vm.delete', outcome: 'ok', subject: vm.name });
      return { name: vm.name, deleted: true as const, removed: paths.dir };
    },
  };
}
