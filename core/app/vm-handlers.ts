// Handlers for shielded QEMU VMs. A start is the whole promise: attest (the current health
// certificate, or attest now in a mode the disk's key protector allows) → the release gate (audited)
// → the shielded disk opened with the released key (which keeps only its data key) → the vTPM key
// derived from the same transport key → core/hypervisor starts NBD, swtpm and QEMU and watches them.
// The transport key is wiped as soon as the disk and the vTPM key are derived from it.
//
// The KP rolls on every start (as HGS does): once TK_old is released, a new KP for the same
// authorization (owner, guardians, policy) with a fresh TK_new becomes the disk's, and the vTPM
// state moves under deriveVtpmKey(TK_new); an old copy of the KP opens neither any more. Order:
//   0. settle: finish or drop what a crashed roll left (settleVtpmState, by the key check values);
//   1. KP_new = rollKeyProtector(KP_old) (signed by the owner if held here, else by the guardian
//      that released the key: any authorised guardian may roll);
//   2. the vTPM state re-keyed into <vm>/tpm.next (in memory, swtpm to swtpm; <vm>/tpm untouched);
//   3. COMMIT: the disk's shield item resealed under TK_new with KP_new (one VHDX metadata update
//      through its log: the disk holds KP_old or KP_new, never neither); data key and payload unchanged;
//   4. tpm.next becomes tpm (two renames), the new KP is registered, TK_old and TK_new wiped.
// A crash before 3: the disk still holds KP_old and tpm is still under its key; the next start
// drops tpm.next (its key check is not the key KP_old gives). A crash after 3: the disk holds
// KP_new; the next start releases TK_new, finds tpm.next under its key and finishes step 4 (or puts
// tpm.old back if it died between the renames). Either way the VM starts.
import { existsSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ShieldError } from '../errors.ts';
import { wipe } from '../crypto/mod.ts';
import type { Vault } from '../vault/mod.ts';
import { parseKeyProtector, rollKeyProtector } from '../guardian/key-protector.ts';
import { releaseTransportKey } from '../guardian/release.ts';
import { AttestationService } from '../attestation/service.ts';
import { ShieldedDisk, readShieldItem } from '../shield/mod.ts';
import { deriveVtpmKey, promoteNext, readMarker, rekeyVtpmState, settleVtpmState, stateFolders } from '../vtpm/mod.ts';
import { chooseAccel } from '../hypervisor/qemu.ts';
import { acquireStartLock, checkName, isActive, readConsoleTail, readState, reapOrphans, startVm, stopFromOutside, vmPaths, type RunningVm, type VmExit, type VmRecord } from '../hypervisor/vm.ts';
import type { MethodName, ParsedArgs, Result, VmInfo } from './contract.ts';
import { lastSeenGeneration, rememberGeneration } from './disk-handlers.ts';
import { held, registerKp, storeOf } from './guardian-handlers.ts';
import type { CallContext } from './service.ts';

type Handler<M extends MethodName> = (args: ParsedArgs<M>, ctx: CallContext) => Promise<Result<M>>;
type VmMethods = Extract<MethodName, `vm.${string}`>;
/** A start's steps, for the progress bar: attest, release and roll, vTPM, QEMU. */
type Steps = (ctx: CallContext, phase: string, done: number, total: number) => void;
const START_STEPS = 4;

/**
 * Detached runs owned by this process (the app or web mode): they outlive the call that started
 * them and end with the process — stopDetachedRuns powers them down first.
 */
const detached = new Map<string, RunningVm>();

/** ACPI power-down of every VM this process runs detached, then a hard stop after the timeout. */
export async function stopDetachedRuns(timeoutMs = 30_000): Promise<void> {
  await Promise.all([...detached.values()].map((run) => run.stop({ timeoutMs })));
}

/** Leftovers of a run whose owner died (QEMU, swtpm) are stopped, and the crash audited, before the state is read. */
function reaped(v: Vault, name: string): void {
  const why = reapOrphans(vmPaths(v.home, name));
  if (why !== null) v.record({ action: 'vm.crash', outcome: 'failed', subject: name, reason: why });
}

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
  reaped(v, vm.name);
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

/**
 * TEST ONLY: SHIELDLAB_TEST_CRASH_AT=<point> ends the process there as a kill -9 would (exit 137,
 * nothing unwound), so tests can show a roll cut anywhere leaves the VM startable.
 */
function crashPoint(point: string): void {
  if (process.env.SHIELDLAB_TEST_CRASH_AT === point) process.exit(137);
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

export function vmHandlers(vault: () => Vault, steps: Steps = () => undefined): { [M in VmMethods]: Handler<M> } {

  /** Attest → release → roll the KP (and the vTPM state with it) → startVm. The caller holds the start lock. */
  async function startLocked(v: Vault, vm: VmRecord, args: ParsedArgs<'vm.start'>, ctx: CallContext): Promise<RunningVm> {
    const paths = vmPaths(v.home, vm.name);
    steps(ctx, 'reading the shielded disk', 0, START_STEPS);
    const { item } = await readShieldItem(vm.disk);
    if (item.diskId !== vm.diskId) {
      v.record({ action: 'vm.start', outcome: 'refused', subject: vm.name, reason: 'disk_replaced' });
      throw new ShieldError('shield_tampered', `${vm.disk} is another disk than the one VM ${vm.name} was created with (disk ID ${item.diskId}, expected ${vm.diskId}).`);
    }
    steps(ctx, 'attesting this host', 1, START_STEPS);
    const a = new AttestationService(v);
    await ensureAttested(a, parseKeyProtector(item.kp).authorization.policy.modes);
    steps(ctx, 'releasing the key and rolling the key protector', 2, START_STEPS);
    // The release gate: KP signatures, a guardian held here, a valid health certificate, policy. Audited.
    const released = releaseTransportKey(item.kp, { vault: v, guardians: storeOf(v), attestation: a, healthCertificate: a.currentEncoded(), purpose: `vm.start ${vm.name}` });
    const folders = stateFolders(paths.tpm);
    const oldKey = deriveVtpmKey(released.transportKey);
    let disk: ShieldedDisk | undefined;
    let rolled: { bytes: Buffer; transportKey: Buffer } | undefined;
    let vtpmKey: Buffer | undefined;
    let committed = false;
    try {
      // 0. What a crashed roll left, settled with the key the disk's KP gives now.
      const settled = settleVtpmState(folders, oldKey);
      if (settled !== 'clean') v.record({ action: 'kp.roll', outcome: 'ok', subject: vm.name, reason: settled === 'finished' ? 'recovered: finished an interrupted roll' : 'recovered: dropped an unfinished roll' });
      disk = await ShieldedDisk.open(vm.disk, released.transportKey, {
        lastSeenGeneration: item.integrity ? lastSeenGeneration(v, item.diskId) : null,
        onIntegrityEvent: (e) => v.record({ action: `disk.integrity.${e.kind}`, outcome: e.kind === 'violation' ? 'refused' : 'ok', subject: vm.disk, reason: e.message }),
      });
      // 1. KP_new.
      const kpOld = parseKeyProtector(item.kp);
      const s = storeOf(v);
      const ownerHere = s.list().find((g) => g.signing.thumbprint === kpOld.authorization.owner && g.hasPrivateKeys)?.name;
      rolled = rollKeyProtector(kpOld, held(s, ownerHere ?? released.guardian));
      const newKey = deriveVtpmKey(rolled.transportKey);
      vtpmKey = newKey;
      // 2. The vTPM state under the new key, in tpm.next. Unprovisioned state (a first start that
      // died while provisioning) holds nothing of value: it goes, and is provisioned under the new key.
      const provisioned = readMarker(paths.tpm) !== null;
      if (provisioned) {
        await rekeyVtpmState({ from: folders.current, to: folders.next, oldKey, newKey, runDir: join(paths.run, 'tpm-rekey') });
        rmSync(join(paths.run, 'tpm-rekey'), { recursive: true, force: true });
      } else {
        rmSync(folders.current, { recursive: true, force: true });
      }
      crashPoint('after-vtpm-rekey');
      // 3. The commit point.
      await disk.reseal({ kp: rolled.bytes, transportKey: rolled.transportKey });
      committed = true;
      const kpNew = parseKeyProtector(rolled.bytes);
      registerKp(v, kpNew, vm.disk);
      v.record({ action: 'kp.roll', outcome: 'ok', subject: vm.name, reason: `${kpNew.authorization.kpId} v${kpOld.keyBlock.version} → v${kpNew.keyBlock.version}${provisioned ? ', vTPM state re-keyed' : ''}` });
      crashPoint('after-reseal');
      // 4. The switch.
      if (provisioned) promoteNext(folders, () => crashPoint('mid-switch'));
    } catch (err) {
      if (!committed) rmSync(folders.next, { recursive: true, force: true });
      if (vtpmKey) wipe(vtpmKey);
      await disk?.close().catch(() => undefined);
      if ((err as { code?: string }).code === 'shield_rollback') v.record({ action: 'vm.start', outcome: 'refused', subject: vm.name, reason: 'rollback' });
      else if (disk) v.record({ action: 'kp.roll', outcome: 'failed', subject: vm.name, reason: String((err as { code?: string }).code ?? err) });
      throw err;
    } finally {
      wipe(released.transportKey);
      wipe(oldKey);
      if (rolled) wipe(rolled.transportKey);
    }
    if (disk.integrity) rememberGeneration(v, disk.diskId, disk.generation);
    try {
      steps(ctx, 'starting the vTPM and QEMU', 3, START_STEPS);
      return await startVm({
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
      steps(ctx, 'running', START_STEPS, START_STEPS);
    }
  }

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
      if (isActive(st)) throw new ShieldError('vm_running', `Something runs as VM ${args.name} (pid ${st.pid}).`, { details: { pid: st.pid } });
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
      reaped(v, vm.name);
      const st = readState(paths);
      if (isActive(st)) throw new ShieldError('vm_running', `VM ${vm.name} is running already (pid ${st.pid}).`, { details: { pid: st.pid } });
      if (args.testChannel !== undefined && vm.level === 'shielded') {
        throw new ShieldError('invalid_argument', 'The test channel is a way out of the guest: it is refused for shielded VMs.', { details: { reason: 'test_channel_in_shielded' } });
      }
      // From here to the end of the run this process alone starts or runs the VM.
      const unlock = acquireStartLock(paths);
      let run: RunningVm;
      try {
        run = await startLocked(v, vm, args, ctx);
      } catch (err) {
        unlock();
        throw err;
      }
      void run.done.finally(unlock);
      const base = { name: vm.name, level: vm.level, accel: run.accel, secureBoot: run.secureBoot, startedAt: run.startedAt, consoleAt: run.console, supervisorLog: null };
      if (args.detach) {
        // Owned by this process from now on, not by the call: closing the page that started it does not stop it.
        detached.set(vm.name, run);
        void run.done.finally(() => detached.delete(vm.name));
        return { ...base, status: 'running' as const, cause: null, reason: 'running', vtpmProvisioned: true, stoppedAt: null, qemuExit: null, pid: process.pid, qemuPid: run.qemuPid };
      }
      ctx.notice?.(
        `VM ${vm.name} runs (${vm.level}, ${run.accel === 'kvm' ? 'KVM' : 'TCG emulation'}${run.secureBoot ? ', Secure Boot' : ''}; QEMU pid ${run.qemuPid}${run.console ? `; console: ${run.console}` : ''}) — Ctrl-C or \`shieldlab vm stop ${vm.name}\` to stop.`,
      );
      const onAbort = () => void run.stop();
      if (ctx.signal) {
        if (ctx.signal.aborted) onAbort();
        else ctx.signal.addEventListener('abort', onAbort, { once: true });
      }
      const exit: VmExit = await run.done;
      ctx.signal?.removeEventListener('abort', onAbort);
      return {
        ...base,
        status: exit.status,
        cause: exit.cause,
        reason: exit.reason,
        vtpmProvisioned: readMarker(paths.tpm) !== null,
        stoppedAt: exit.stoppedAt,
        qemuExit: exit.qemuExit,
        pid: null,
        qemuPid: null,
      };
    },
    'vm.stop': async (args) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      reaped(v, vm.name);
      const mine = detached.get(vm.name);
      if (mine) {
        // Run by this process: stopped directly, so the run records it as stopped on request.
        const exit = await mine.stop({ force: args.force, timeoutMs: args.timeout * 1000 });
        const how = exit.stopHow ?? 'not-running'; // null: it ended by itself meanwhile
        if (how !== 'not-running') v.record({ action: 'vm.stop', outcome: 'ok', subject: vm.name, reason: `requested (${how})` });
        return { name: vm.name, how, status: readState(vmPaths(v.home, vm.name)).status };
      }
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

    'vm.console': async (args) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      const paths = vmPaths(v.home, vm.name);
      reaped(v, vm.name);
      if (vm.level === 'shielded') throw new ShieldError('invalid_argument', `VM ${vm.name} is shielded: it has no console, by design.`, { details: { reason: 'no_console' } });
      const status = readState(paths);
      if (vm.console === 'vnc') {
        throw new ShieldError('invalid_argument', `VM ${vm.name}'s console is VNC${status.console ? ` (${status.console})` : ' on 127.0.0.1 while it runs'}: open it with a VNC viewer.`, { details: { reason: 'console_is_vnc' } });
      }
      const tail = readConsoleTail(paths, args.bytes);
      return { name: vm.name, file: paths.consoleLog, status: status.status, text: tail?.text ?? '', size: tail?.size ?? 0, truncated: tail?.truncated ?? false };
    },

    'vm.delete': async (args) => {
      const v = vault();
      const vm = loadVm(v, args.name);
      const paths = vmPaths(v.home, vm.name);
      reaped(v, vm.name);
      if (isActive(readState(paths))) throw new ShieldError('vm_running', `VM ${vm.name} is running: stop it first.`);
      if (!args.yes) throw new ShieldError('usage', `Deleting VM ${vm.name} removes its vTPM state (${paths.tpm}): keys sealed to its TPM are lost. Add --yes. The disk ${vm.disk} stays.`);
      v.deleteRecord('vm', vm.name);
      rmSync(paths.dir, { recursive: true, force: true });
      v.record({ action: 'vm.delete', outcome: 'ok', subject: vm.name });
      return { name: vm.name, deleted: true as const, removed: paths.dir };
    },
  };
}
