// The renderer's view of shielded VMs: the list (read again every few seconds while a VM starts or
// runs), the host's accelerator, and each VM's start. A start is detached: the app process (web mode:
// `shieldlab serve`) runs the VM, so the call returns once it runs, and leaving or closing the page
// never stops a VM — only Stop does (vm.stop), or quitting the app. Plus the words the page uses,
// a refused start above all.
import type { Args, Result } from '../../core/app/contract.ts';
import { BridgeError, describeError } from './bridge.ts';
import { refusalOf, REASONS } from './host.svelte.ts';
import { session } from './session.svelte.ts';
import { certificateProblem } from './shield.svelte.ts';

export type VmInfo = Result<'vm.list'>['vms'][number];
export type VmRun = Result<'vm.start'>;
export type VmConsole = Result<'vm.console'>;
export type VmLevel = VmInfo['level'];
export type VmStatus = VmInfo['status'];
export type HostAccel = Result<'vm.status'>['host'];

/** A start refused, in words: one sentence, the reasons the server named, and its own message. */
export interface StartRefusal {
  sentence: string;
  reasons: { reason: string; message: string }[];
  said: string;
}

/** What the page knows about a VM's start from this window: the call pending, or why it was refused. How a run ends shows in the list. */
export interface Run {
  pending: boolean;
  /** While pending: the step the start is at ("attesting this host"), from its progress events. */
  step: string | null;
  refusal: StartRefusal | null;
}

/** How often the list is read again while anything starts, runs or stops. */
export const POLL_MS = 2500;

class Vms {
  list = $state<VmInfo[] | null>(null);
  host = $state<HostAccel | null>(null);
  refusal = $state<string | null>(null);
  /** Per VM name: its start from this window. */
  runs = $state<Record<string, Run>>({});
  /** Per VM name: a stop or delete under way. */
  busy = $state<Record<string, 'stopping' | 'deleting'>>({});

  /** Anything whose state moves by itself: the list is polled while this holds. */
  lively: boolean = $derived(
    (this.list ?? []).some((vm) => vm.status === 'starting' || vm.status === 'running' || vm.status === 'stopping') ||
      Object.values(this.runs).some((r) => r.pending),
  );

  async load(): Promise<void> {
    try {
      const r = await session.call('vm.status', {});
      this.list = r.vms;
      this.host = r.host;
      this.refusal = null;
    } catch (err) {
      this.refusal = `The VMs could not be listed: ${describeError(err)}`;
    }
  }

  async create(args: Args<'vm.create'>): Promise<VmInfo> {
    const vm = await session.call('vm.create', args);
    await this.load();
    return vm;
  }

  /** Starts the VM, detached: resolves once it runs (or was refused); how it ends shows in the list. */
  async start(name: string): Promise<void> {
    if (this.runs[name]?.pending) return;
    this.runs[name] = { pending: true, step: null, refusal: null };
    const poll = setTimeout(() => void this.load(), 800); // "starting" shows soon, not when the start returns
    try {
      await session.call('vm.start', { name, detach: true }, {
        onProgress: (e) => {
          const run = this.runs[name];
          if (run?.pending) run.step = e.phase;
        },
      });
      this.runs[name] = { pending: false, step: null, refusal: null };
    } catch (err) {
      this.runs[name] = { pending: false, step: null, refusal: startRefusal(err) };
    } finally {
      clearTimeout(poll);
      await this.load();
    }
  }

  /** The end of an encryption-supported VM's serial console. */
  console(name: string): Promise<VmConsole> {
    return session.call('vm.console', { name, bytes: 16 * 1024 });
  }

  /** ACPI power-down (the guest shuts down), or with `force` a hard stop now. */
  async stop(name: string, force: boolean): Promise<string | null> {
    this.busy[name] = 'stopping';
    try {
      const r = await session.call('vm.stop', { name, force });
      await this.load();
      return r.how === 'not-running' ? `${name} was not running.` : null;
    } catch (err) {
      return `Not stopped: ${describeError(err)}`;
    } finally {
      delete this.busy[name];
    }
  }

  /** Deletes the VM and its vTPM state (the disk file stays). Null when done, else why not. */
  async remove(name: string): Promise<string | null> {
    this.busy[name] = 'deleting';
    try {
      await session.call('vm.delete', { name, yes: true });
      delete this.runs[name];
      await this.load();
      return null;
    } catch (err) {
      return `Not deleted: ${describeError(err)}`;
    } finally {
      delete this.busy[name];
    }
  }
}

export const vms = new Vms();

// ---- words -------------------------------------------------------------------------------------

export const LEVELS: Record<VmLevel, { label: string; short: string; help: string }> = {
  shielded: {
    label: 'Shielded',
    short: 'shielded',
    help: 'Encrypted disk and vTPM, Secure Boot on, and no way in from the host: no display, serial console, monitor or debugger. Only the guest’s own network services reach it.',
  },
  'encryption-supported': {
    label: 'Encryption supported',
    short: 'encryption-supported',
    help: 'Encrypted disk and vTPM, but the admin keeps a console (a serial log or VNC on 127.0.0.1) and Secure Boot is not enforced. For lab guests and troubleshooting.',
  },
};

export const STATES: Record<VmStatus, { label: string; flag: string }> = {
  stopped: { label: 'stopped', flag: '' },
  starting: { label: 'starting', flag: 'warn' },
  running: { label: 'running', flag: 'ok' },
  stopping: { label: 'stopping', flag: 'warn' },
  crashed: { label: 'crashed', flag: 'bad' },
};

/** "KVM" or "TCG (emulation)". */
export function accelText(accel: VmInfo['accel']): string {
  return accel === 'kvm' ? 'KVM' : 'TCG (emulation)';
}

/** "1 GiB", "256 MiB". */
export function memoryText(mib: number): string {
  return mib >= 1024 && mib % 1024 === 0 ? `${mib / 1024} GiB` : `${mib} MiB`;
}

/** Release refusals (details.reason of release_denied) in words. */
const RELEASE_REASONS: Record<string, string> = {
  NoHealthCertificate: 'This host has no valid health certificate, and could not attest in a mode the disk’s key protector allows.',
  ModeNotAllowed: 'The disk’s key protector does not allow the attestation mode this host attested with.',
  HostNotAllowed: 'This host is not on the disk’s host allow-list.',
};

/** Refusals named by details.reason (any code) in words. */
const START_REASONS: Record<string, string> = {
  secure_boot_unavailable:
    'Secure Boot is not available here: QEMU cannot give the VM SMM with this accelerator, or the Secure Boot firmware is missing. A shielded VM never runs without Secure Boot; a lab guest can use the encryption-supported level.',
  secure_boot_required: 'A shielded VM boots only with Secure Boot, and this firmware has none.',
  test_channel_in_shielded: 'The test channel is a way out of the guest, so it is refused for shielded VMs.',
  state_key_mismatch: 'The VM’s vTPM state does not open with the key released for its disk: the state belongs to another VM or disk.',
  swtpm_failed: 'The VM’s vTPM (swtpm) did not start.',
  swtpm_timeout: 'The VM’s vTPM (swtpm) did not answer in time.',
  qemu_failed: 'QEMU did not start.',
  qemu_timeout: 'QEMU did not answer in time.',
};

/** Refusals by error code, in words. */
const START_CODES: Partial<Record<string, string>> = {
  kp_unwrap_denied:
    'This host does not hold a guardian the VM’s key protector allows: only the guardians it names can release the disk’s key. Import one of them here with its private keys, or have the disk’s owner grant a guardian this host holds.',
  kp_untrusted_owner: 'The disk’s owner is not a guardian known here: import its public guardian first.',
  kp_signature_invalid: 'The disk’s key protector is not signed by its owner: it was altered or forged.',
  kp_invalid: 'The disk’s key protector is damaged.',
  attestation_failed: 'This host failed attestation, so no key is released to it:',
  health_certificate_invalid: 'This host’s health certificate was refused, so no key is released to it.',
  host_not_registered: 'This host is not registered for an attestation mode the disk allows: register its host key or TPM on the Host health page.',
  shield_tampered: 'The disk file is not the one this VM was created with, or it was altered.',
  shield_rollback: 'The disk was rolled back to an older copy: its integrity generation is behind the last one seen here.',
  integrity_violation: 'The disk’s integrity tags do not match: it was changed outside ShieldLab.',
  shield_invalid: 'The disk file is not a shielded disk (or its shield item is damaged).',
  vtpm_state_invalid: 'The VM’s vTPM state is damaged, or does not open with the key released for this disk.',
  tpm_unavailable: 'A TPM could not be reached: the host’s (for attestation) or the VM’s vTPM.',
  vm_running: 'It is running already (or another start of it is under way).',
  secure_boot_unavailable: 'Secure Boot is not available here, and a shielded VM never runs without it.',
  not_found: 'Something it needs is missing.',
  locked: 'The vault is locked: unlock it and start again.',
};

function reasonOf(err: unknown): string | null {
  const r = err instanceof BridgeError ? err.details?.['reason'] : undefined;
  return typeof r === 'string' ? r : null;
}

/** A refused start as the page says it: the sentence for its code and reason, the reasons listed, and ShieldLab's own words. */
export function startRefusal(err: unknown): StartRefusal {
  const said = describeError(err);
  const code = err instanceof BridgeError ? err.code : 'internal';
  const reason = reasonOf(err);
  let sentence: string;
  let reasons: StartRefusal['reasons'] = [];
  if (code === 'release_denied' && reason !== null) {
    sentence = RELEASE_REASONS[reason] ?? `Key release denied: this host’s health certificate is ${certificateProblem(reason)}.`;
  } else if (code === 'attestation_failed' || code === 'health_certificate_invalid') {
    sentence = START_CODES[code]!;
    reasons = refusalOf(err, 'Attestation refused').reasons.map((r) => ({ reason: r.reason, message: r.message === said ? (REASONS[r.reason] ?? said) : r.message }));
  } else if (reason !== null && START_REASONS[reason]) {
    sentence = START_REASONS[reason];
  } else {
    sentence = START_CODES[code] ?? 'It did not start.';
  }
  return { sentence, reasons, said };
}

/** A certificate's state at a glance: valid, the problem in a word, or none. */
export function certificateWord(cert: { valid: boolean; problem: string | null } | null): { word: string; flag: string } {
  if (cert === null) return { word: 'none', flag: 'warn' };
  if (cert.valid) return { word: 'valid', flag: 'ok' };
  return { word: certificateProblem(cert.problem), flag: 'bad' };
}
