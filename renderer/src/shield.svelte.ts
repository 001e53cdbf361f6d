// The renderer's view of guardians and of this host's attestation, shared by the Guardians and Key
// protectors views (one picture: a guardian created on one page is offered on the other, an
// attestation made from a release refusal shows in the host panel). Plus the words both pages use.
import type { Result } from '../../core/app/contract.ts';
import { describeError } from './bridge.ts';
import { session } from './session.svelte.ts';

export type Guardian = Result<'guardian.list'>['guardians'][number];
export type HostStatus = Result<'host.status'>;
export type KpInfo = Result<'kp.inspect'>;
export type ReleaseCheck = Result<'kp.release'>;

class Guardians {
  list = $state<Guardian[] | null>(null);
  refusal = $state<string | null>(null);

  /** Guardians whose private keys this host holds: the only possible key protector owners. */
  held: Guardian[] = $derived((this.list ?? []).filter((g) => g.hasPrivateKeys));

  async load(): Promise<void> {
    try {
      this.list = (await session.call('guardian.list', {})).guardians;
      this.refusal = null;
    } catch (err) {
      this.refusal = `The guardians could not be listed: ${describeError(err)}`;
    }
  }
}

export const guardians = new Guardians();

class Host {
  status = $state<HostStatus | null>(null);
  refusal = $state<string | null>(null);
  busy = $state(false);

  /** A health certificate that key release would accept (as far as this host can tell). */
  attested: boolean = $derived(Boolean(this.status?.certificate?.valid));

  async load(): Promise<void> {
    await this.run('The host status could not be read', async () => void (this.status = await session.call('host.status', {})));
  }

  async registerKey(): Promise<void> {
    await this.run('The host key was not registered', async () => {
      await session.call('host.registerKey', {});
      this.status = await session.call('host.status', {});
    });
  }

  async attest(): Promise<void> {
    await this.run('Attestation refused', async () => void (this.status = await session.call('host.attest', { mode: 'host-key' })));
  }

  private async run(what: string, work: () => Promise<void>): Promise<void> {
    this.busy = true;
    this.refusal = null;
    try {
      await work();
    } catch (err) {
      this.refusal = `${what}: ${describeError(err)}`;
    } finally {
      this.busy = false;
    }
  }
}

export const host = new Host();

/** The key protector last inspected: the Key protectors view shows it again when you come back. */
export const inspector = $state({ path: '' });

// ---- words -------------------------------------------------------------------------------------

export const NOT_BACKED_UP = 'Not backed up — export a PFX or make a vault backup before it can own a key protector';

export type AttestationMode = KpInfo['policy']['modes'][number];

/** The attestation modes a key protector's policy may allow, in the order forms offer them. */
export const MODES: readonly { mode: AttestationMode; label: string; help: string }[] = [
  { mode: 'tpm', label: 'TPM', help: 'measured boot, checked against a baseline' },
  { mode: 'host-key', label: 'Host key', help: 'a registered host key' },
  { mode: 'ad-group', label: 'AD group', help: 'membership of a trusted group' },
];

/** Why a guardian cannot own a new key protector (or shielded disk) here; null when it can. */
export function ownerProblem(g: Guardian): 'public only' | 'not backed up' | null {
  if (!g.hasPrivateKeys) return 'public only';
  return g.backedUpAt ? null : 'not backed up';
}

/** "DC0294D7…5DF5": enough to tell thumbprints apart at a glance; the full one goes in a title. */
export function shortId(id: string, head = 8, tail = 4): string {
  return id.length > head + tail + 1 ? `${id.slice(0, head)}…${id.slice(-tail)}` : id;
}

/** "expires in 12 days", "expires today", "expired". */
export function expiryText(warning: NonNullable<Guardian['warning']>): string {
  if (warning.level === 'expired') return 'expired';
  if (warning.daysLeft <= 0) return 'expires today';
  return `expires in ${warning.daysLeft} day${warning.daysLeft === 1 ? '' : 's'}`;
}

/** When the guardian stops working: the earlier of its two certificates' ends. */
export function guardianExpiry(g: Guardian): string {
  return Date.parse(g.signing.notAfter) <= Date.parse(g.encryption.notAfter) ? g.signing.notAfter : g.encryption.notAfter;
}

export const SOURCES: Record<string, string> = {
  generated: 'created here',
  'imported-pfx': 'imported from PFX',
  'imported-public': 'imported public file',
};

/** Why a health certificate is not usable, from host.status's problem code. */
const CERT_PROBLEMS: Record<string, string> = {
  Expired: 'expired',
  Revoked: 'revoked',
  WrongHost: 'issued to another host',
  UntrustedIssuer: 'not issued by this host’s attestation service',
  NotYetValid: 'dated in the future',
  Malformed: 'damaged',
};

export function certificateProblem(problem: string | null): string {
  return problem === null ? 'not valid' : (CERT_PROBLEMS[problem] ?? problem);
}

/** Release refusals that another attestation cures. */
export const NEEDS_ATTESTATION = new Set(['NoHealthCertificate', 'Expired', 'Revoked', 'WrongHost', 'UntrustedIssuer', 'NotYetValid', 'Malformed']);

/** A release refusal in the UI's words; the server's message otherwise. */
export function releaseReason(reason: ReleaseCheck['reasons'][number]): string {
  // The server's message for this one names a CLI command.
  if (reason.code === 'NoHealthCertificate') return 'This host has no health certificate yet.';
  return reason.message;
}
