// The renderer's view of this host's health: its attestation modes and health certificate (the
// same status the Key protectors page shows), the PCRs against the baseline, the code-integrity
// allow-list, and the deliberate steps — attest, register the TPM, capture or re-learn the
// baseline (re-learning only after the diff was shown and confirmed). Plus the words the page uses.
import type { Args, Result } from '../../core/app/contract.ts';
import { BridgeError, describeError } from './bridge.ts';
import { formatTime, session } from './session.svelte.ts';
import { host } from './shield.svelte.ts';

export type HostStatus = Result<'host.status'>;
export type Certificate = NonNullable<HostStatus['certificate']>;
export type BaselineDiff = Result<'host.baselineDiff'>;
export type BaselineReport = Result<'host.baselineCapture'>;
export type Binary = Result<'host.policyShow'>['binaries'][number];
export type AdInfo = NonNullable<HostStatus['ad']>;
export type AdTestReport = Result<'host.adTest'>;

/** The AD-group form as typed: lists one item a line; an empty field keeps what is stored. */
export interface AdForm {
  urls: string;
  caPem: string;
  caFile: string;
  tlsName: string;
  bindDn: string;
  password: string;
  computer: string;
  groupSids: string;
  starttls: boolean;
}

/** One reason a step was refused: its name (HGS's sub-status) and the words for it. */
export interface Reason {
  reason: string;
  message: string;
}

/** A refusal in words: a sentence, the reasons listed one by one, and what changed. */
export interface Refusal {
  summary: string;
  reasons: Reason[];
  findings: string[];
}

/** The re-learn dialogue: the diff is read first, and only "Confirm re-learn" stores a new baseline. */
/** Where an outcome shows: under the header, the PCR table, or the allow-list. */
export type Place = 'summary' | 'register' | 'baseline' | 'policy';

export interface Relearn {
  phase: 'checking' | 'confirm' | 'saving';
  diff: BaselineDiff | null;
}

class HostHealth {
  diff = $state<BaselineDiff | null>(null);
  diffRefusal = $state<Refusal | null>(null);
  binaries = $state<Binary[] | null>(null);
  policyRefusal = $state<string | null>(null);
  statusRefusal = $state<string | null>(null);

  /** A call that talks to the TPM is running (one at a time: a TPM serves one client). */
  tpmBusy = $state(false);
  /** What the TPM call is doing, for the buttons' labels. */
  doing = $state<'reading' | 'attesting' | 'registering' | 'capturing' | 'relearning' | null>(null);
  policyBusy = $state(false);

  /** The last step's outcome, and the part of the page that shows it (beside the control used). */
  done = $state<string | null>(null);
  place = $state<Place>('summary');
  refusal = $state<Refusal | null>(null);
  relearn = $state<Relearn | null>(null);

  /** The status is shared with the Key protectors page's "This host" panel. */
  get status(): HostStatus | null {
    return host.status;
  }

  /** The mode "Attest now" uses: tpm once a TPM is registered, else host-key, else ad-group when configured. */
  get attestMode(): 'tpm' | 'host-key' | 'ad-group' {
    return this.status?.tpm ? 'tpm' : !this.status?.hostKeyRegistered && this.status?.ad ? 'ad-group' : 'host-key';
  }

  /** AD-group section: a test or a save is running, and the last test's steps. */
  adBusy = $state<'testing' | 'saving' | 'attesting' | null>(null);
  adReport = $state<AdTestReport | null>(null);
  adDone = $state<string | null>(null);
  adRefusal = $state<Refusal | null>(null);

  /** Everything again: status, then the PCRs (a fresh quote) and the allow-list. */
  async load(): Promise<void> {
    await this.tpm('reading', async () => {
      await this.readStatus();
      await Promise.all([this.readDiff(), this.readPolicy()]);
    });
  }

  /** Test connection: every step against the DCs, with the form's values over the stored ones. Nothing is saved. */
  async adTest(form: AdForm): Promise<void> {
    await this.adWork('testing', async () => {
      this.adReport = await session.call('host.adTest', adArgs(form));
    }, 'The test could not run');
  }

  /** Save: stores the configuration (the password in the vault), then reads the status again. */
  async adSave(form: AdForm): Promise<boolean> {
    let ok = false;
    await this.adWork('saving', async () => {
      const r = await session.call('host.adConfigure', adArgs(form));
      this.adDone = `Saved: ${r.computer} must be in ${r.groups.map((g) => g.name ?? g.sid).join(' or ')}.${r.warning ? ` ${r.warning}` : ''}`;
      await this.readStatus();
      ok = true;
    }, 'Not saved');
    return ok;
  }

  async adAttest(): Promise<void> {
    await this.adWork('attesting', async () => {
      host.status = await session.call('host.attest', { mode: 'ad-group' });
      const c = host.status.certificate;
      this.adDone = c ? `Attested (ad-group): a health certificate valid until ${formatTime(c.expiresAt)}.` : 'Attested (ad-group).';
    }, 'Attestation refused (ad-group)');
    await this.readStatus();
  }

  private async adWork(busy: NonNullable<HostHealth['adBusy']>, work: () => Promise<void>, what: string): Promise<void> {
    this.adBusy = busy;
    this.adDone = null;
    this.adRefusal = null;
    if (busy !== 'attesting') this.adReport = null;
    try {
      await work();
    } catch (err) {
      this.adRefusal = refusalOf(err, what);
    } finally {
      this.adBusy = null;
    }
  }

  async attest(): Promise<void> {
    const mode = this.attestMode;
    this.clearOutcome('summary');
    await this.tpm('attesting', async () => {
      try {
        host.status = await session.call('host.attest', { mode });
        const c = host.status.certificate;
        this.done = c ? `Attested (${mode}): a health certificate valid until ${formatTime(c.expiresAt)}.` : `Attested (${mode}).`;
      } catch (err) {
        this.refusal = refusalOf(err, `Attestation refused (${mode})`);
      }
      await this.reread();
    });
  }

  async registerTpm(address: string): Promise<boolean> {
    this.clearOutcome('register');
    let ok = false;
    await this.tpm('registering', async () => {
      try {
        host.status = await session.call('host.register', { mode: 'tpm', tpm: address });
        this.done = `This host’s TPM at ${address} is registered. Capture a baseline next, on a boot you trust.`;
        this.place = 'baseline'; // the register form is gone; the next step is there
        ok = true;
      } catch (err) {
        this.refusal = refusalOf(err, 'The TPM was not registered');
      }
    });
    return ok;
  }

  /** The first baseline: nothing to compare with yet, so nothing to confirm. */
  async captureBaseline(eventLog: string): Promise<void> {
    this.clearOutcome('baseline');
    await this.tpm('capturing', async () => {
      try {
        const r = await session.call('host.baselineCapture', { yes: false, ...(eventLog ? { eventLog } : {}) });
        this.done = `Baseline captured: PCRs ${r.pcrs.join(', ')} and ${r.events} events of the event log.`;
      } catch (err) {
        this.refusal = refusalOf(err, 'The baseline was not captured');
      }
      await this.reread();
    });
  }

  /** Step one of re-learning: read the diff now and ask. Nothing is stored. */
  async askRelearn(): Promise<void> {
    this.clearOutcome('baseline');
    this.relearn = { phase: 'checking', diff: null };
    await this.tpm('reading', async () => {
      await this.readDiff();
      this.relearn = this.diff ? { phase: 'confirm', diff: this.diff } : null;
    });
  }

  /** Step two, only after the confirmation: the new baseline is stored (and audited). */
  async confirmRelearn(): Promise<void> {
    if (this.relearn?.phase !== 'confirm') return;
    this.relearn = { ...this.relearn, phase: 'saving' };
    await this.tpm('relearning', async () => {
      try {
        const r = await session.call('host.baselineCapture', { yes: true });
        this.done = r.relearned
          ? `Baseline re-learnt (audited): ${r.findings.length} change${r.findings.length === 1 ? '' : 's'} accepted.`
          : 'The baseline already matched the TPM: nothing was re-learnt.';
        this.relearn = null;
      } catch (err) {
        this.refusal = refusalOf(err, 'The baseline was not re-learnt');
        this.relearn = null;
      }
      await this.reread();
    });
  }

  cancelRelearn(): void {
    if (this.relearn?.phase === 'confirm') this.relearn = null;
  }

  async addBinary(path: string): Promise<boolean> {
    return this.changePolicy(`Not added`, async () => {
      this.binaries = (await session.call('host.policyAddBinary', { path })).binaries;
      this.done = `Allowed ${path} at its current SHA-256.`;
    });
  }

  async removeBinary(path: string): Promise<boolean> {
    return this.changePolicy(`Not removed`, async () => {
      this.binaries = (await session.call('host.policyRemoveBinary', { path })).binaries;
      this.done = `Removed ${path} from the allow-list.`;
    });
  }

  // ---- reads ----

  /** After a step: the status and the PCRs again (the buttons say "Reading…" meanwhile). */
  private async reread(): Promise<void> {
    this.doing = 'reading';
    await this.readStatus();
    await this.readDiff();
  }

  private async readStatus(): Promise<void> {
    try {
      host.status = await session.call('host.status', {});
      this.statusRefusal = null;
    } catch (err) {
      this.statusRefusal = `The host status could not be read: ${describeError(err)}`;
    }
  }

  private async readDiff(): Promise<void> {
    if (!this.status?.tpm?.baseline) {
      this.diff = null;
      this.diffRefusal = null;
      return;
    }
    try {
      this.diff = await session.call('host.baselineDiff', {});
      this.diffRefusal = null;
    } catch (err) {
      this.diff = null;
      this.diffRefusal = refusalOf(err, 'The PCRs could not be read');
    }
  }

  private async readPolicy(): Promise<void> {
    try {
      this.binaries = (await session.call('host.policyShow', {})).binaries;
      this.policyRefusal = null;
    } catch (err) {
      this.policyRefusal = `The allow-list could not be read: ${describeError(err)}`;
    }
  }

  private async tpm(doing: NonNullable<HostHealth['doing']>, work: () => Promise<void>): Promise<void> {
    this.tpmBusy = true;
    this.doing = doing;
    try {
      await work();
    } finally {
      this.tpmBusy = false;
      this.doing = null;
    }
  }

  private async changePolicy(what: string, work: () => Promise<void>): Promise<boolean> {
    this.policyBusy = true;
    this.clearOutcome('policy');
    try {
      await work();
      await this.readStatus();
      return true;
    } catch (err) {
      this.policyRefusal = `${what}: ${describeError(err)}`;
      return false;
    } finally {
      this.policyBusy = false;
    }
  }

  private clearOutcome(place: Place): void {
    this.place = place;
    this.done = null;
    this.refusal = null;
    this.policyRefusal = null;
  }
}

export const health = new HostHealth();

function lines(text: string): string[] {
  return text.split(/[\n,]/).map((x) => x.trim()).filter((x) => x.length > 0);
}

/** The form as host.adConfigure / host.adTest arguments: empty fields are left out (the stored value stays). */
export function adArgs(f: AdForm): Args<'host.adConfigure'> {
  const opt = (v: string) => (v.trim() ? v.trim() : undefined);
  const computer = opt(f.computer);
  const caPem = opt(f.caPem);
  const caFile = caPem ? undefined : opt(f.caFile);
  const bindDn = opt(f.bindDn);
  return {
    url: lines(f.urls),
    tlsName: lines(f.tlsName),
    groupSid: lines(f.groupSids),
    starttls: f.starttls,
    ...(caPem ? { caPem } : {}),
    ...(caFile ? { caFile } : {}),
    ...(bindDn ? { bindDn } : {}),
    ...(f.password ? { password: f.password } : {}),
    ...(computer ? { computer } : {}),
  };
}

/** The form filled from the stored configuration (never the password). */
export function adFormOf(ad: AdInfo | null): AdForm {
  return {
    urls: ad?.urls.join('\n') ?? '',
    caPem: '',
    caFile: '',
    tlsName: ad?.tlsNames.join('\n') ?? '',
    bindDn: ad?.bindDn ?? '',
    password: '',
    computer: ad?.computer ?? '',
    groupSids: ad?.groups.map((g) => g.sid).join('\n') ?? '',
    starttls: ad?.startTls ?? false,
  };
}

// ---- words -------------------------------------------------------------------------------------

/** The refusal reasons (HGS sub-statuses) in words, for lists that carry only the name. */
export const REASONS: Record<string, string> = {
  NotConfigured: 'No TPM is registered, or no baseline has been captured.',
  UnauthorizedHost: 'Another TPM answered than the one registered for this host.',
  AkNotBound: 'The attestation key is not bound to this TPM’s endorsement key.',
  QuoteSignature: 'The quote’s signature does not verify with the registered attestation key.',
  NonceMismatch: 'The quote does not carry this request’s nonce: it was replayed.',
  PcrDigestMismatch: 'The PCR values sent do not hash to what the TPM signed.',
  TcgLogVerification: 'The event log does not replay to the PCR values the TPM quoted.',
  SecureBootSettings: 'PCR 7 differs from the baseline: the Secure Boot configuration changed.',
  PcrMismatch: 'A boot PCR differs from the baseline: the boot configuration changed.',
  CodeIntegrityPolicy: 'A binary on the code-integrity allow-list changed or is missing.',
  ClockRollback: 'The TPM’s clock or boot counters went back since the last attestation.',
  Expired: 'The health certificate has expired.',
  Revoked: 'The health certificate was revoked.',
  DcUnreachable: 'No domain controller answered (each one was tried).',
  TlsUntrusted: 'The DC’s TLS certificate does not chain to the pinned CA, or is not for the expected name.',
  BindFailed: 'The DC refused the service account’s credentials.',
  ComputerNotFound: 'The directory has no such computer account.',
  ComputerDisabled: 'The computer account is disabled.',
  NotAMember: 'The computer account is in none of the approved groups.',
  PlainLdapRefused: 'Plain LDAP would send the password unprotected: use LDAPS or StartTLS.',
};

function isReason(v: unknown): v is Reason {
  return typeof v === 'object' && v !== null && typeof (v as Reason).reason === 'string' && typeof (v as Reason).message === 'string';
}

function strings(v: unknown): string[] {
  return Array.isArray(v) ? v.filter((s): s is string => typeof s === 'string') : [];
}

/**
 * A failure as a refusal to show: every reason the server named (details.problems, or
 * details.reasons / details.reason with their words) and what changed (details.findings). Without
 * reasons, the server's message is the sentence.
 */
export function refusalOf(err: unknown, what: string): Refusal {
  const details = err instanceof BridgeError ? (err.details ?? {}) : {};
  const findings = strings(details['findings']);
  let reasons: Reason[] = Array.isArray(details['problems']) ? details['problems'].filter(isReason).map((p) => ({ reason: p.reason, message: p.message })) : [];
  if (reasons.length === 0) {
    const names = strings(details['reasons']);
    if (names.length === 0 && typeof details['reason'] === 'string') names.push(details['reason']);
    // One reason without its own words: the server's message is them.
    reasons = names.map((name) => ({ reason: name, message: names.length === 1 ? describeError(err) : (REASONS[name] ?? name) }));
  }
  return reasons.length > 0 ? { summary: `${what}:`, reasons, findings } : { summary: `${what}: ${describeError(err)}`, reasons, findings };
}

/** "in 7 h 12 min", "in 3 d 4 h", "12 min ago", relative to `now`. */
export function relativeTime(iso: string, now: number): string {
  const ms = Date.parse(iso) - now;
  if (Number.isNaN(ms)) return iso;
  const minutes = Math.floor(Math.abs(ms) / 60_000);
  const d = Math.floor(minutes / 1440);
  const h = Math.floor((minutes % 1440) / 60);
  const m = minutes % 60;
  const text = d > 0 ? `${d} d ${h} h` : h > 0 ? `${h} h ${m} min` : m > 0 ? `${m} min` : 'less than a minute';
  return ms >= 0 ? `in ${text}` : `${text} ago`;
}

/** "6d7c1a2b…9f0e" for a 64-digit PCR value; all zeros (a PCR never extended) is said so. */
export function shortHex(hex: string): string {
  if (/^0+$/.test(hex)) return '0…0';
  return hex.length > 14 ? `${hex.slice(0, 8)}…${hex.slice(-4)}` : hex;
}
