// AD-group ("admin-trusted") attestation: the host may run shielded VMs because Active Directory
// says its computer account is an enabled member (transitively) of an approved security group,
// registered by objectSid as HGS does. Identity only: it proves nothing about the host's health,
// so it is weaker than TPM mode and the UI says so.
// The configuration (DC URLs, pinned CA, service account and its password, computer, group SIDs)
// lives in the vault record 'attestation'/'ad-group'; the password never leaves it except to bind.
import { X509Certificate, createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { ShieldError } from '../errors.ts';
import type { Vault } from '../vault/mod.ts';
import { DOMAIN_SID, checkDirectory, lookupGroups, parseDcUrl, type AdConnection, type AdMembership, type AdStep, type AdVerdict } from './ad-directory.ts';

export { AD_REASONS, type AdReason, type AdStep, type AdVerdict } from './ad-directory.ts';

export const DEFAULT_AD_TIMEOUT_MS = 5000;
export const DEFAULT_AD_VALIDITY_HOURS = 8;
const RECORD = 'ad-group';

export interface AdGroup {
  sid: string;
  /** The name when it was registered (display only: the SID decides). */
  name: string | null;
}

interface AdState {
  urls: string[];
  tlsNames: string[];
  caPem: string;
  startTls: boolean;
  allowPlainLdap: boolean;
  bindDn: string;
  bindPassword: string; // secret: only ever inside the vault and in the bind request
  computer: string;
  groups: AdGroup[];
  validityHours: number;
  timeoutMs: number;
  configuredAt: string;
  /** Set by the first successful attestation: the host's id in ad-group mode. */
  hostId: string | null;
  lastAttestation: { at: string; dc: string; computerDn: string; computerSid: string; membership: AdMembership } | null;
  lastRefusal: { at: string; reason: string; message: string } | null;
}

/** What `host ad show` and `host status` tell: the state without the password, the CA by its subject. */
export type AdInfo = Omit<AdState, 'bindPassword' | 'caPem'> & { caSubject: string };

export interface AdConfigInput {
  urls?: readonly string[] | undefined;
  tlsNames?: readonly string[] | undefined;
  caPem?: string | undefined;
  startTls?: boolean | undefined;
  allowPlainLdap?: boolean | undefined;
  bindDn?: string | undefined;
  /** Omitted: keep the stored one. */
  bindPassword?: string | undefined;
  computer?: string | undefined;
  groupSids?: readonly string[] | undefined;
  /** Group names to resolve to SIDs on the DC now. */
  groupNames?: readonly string[] | undefined;
  validityHours?: number | undefined;
  timeoutMs?: number | undefined;
}

export interface AdTestReport {
  ok: boolean;
  reason: string | null;
  message: string;
  dc: string | null;
  steps: AdStep[];
  computer: { dn: string; sid: string } | null;
  membership: AdMembership | null;
  failedDcs: AdVerdict['failedDcs'];
}

function load(vault: Vault): AdState | null {
  if (!vault.hasRecord('attestation', RECORD)) return null;
  return JSON.parse(Buffer.from(vault.getRecord('attestation', RECORD, { audit: false }).data, 'base64').toString('utf8')) as AdState;
}

function save(vault: Vault, state: AdState): void {
  const data = Buffer.from(JSON.stringify(state), 'utf8');
  vault.putRecord('attestation', { name: RECORD, data, notes: 'AD-group attestation: DCs, pinned CA, service account (password), approved group SIDs' });
  data.fill(0);
}

/** This machine's computer account name: its short host name, upper case, with `$`. */
export function defaultComputer(): string {
  return `${hostname().split('.')[0]!.toUpperCase()}$`;
}

/** The host id in ad-group mode: SHA-256 over the domain SID and the computer's objectSid, hex. */
export function adHostIdOf(domainSid: string, computerSid: string): string {
  return createHash('sha256').update(`ad-group\0${domainSid}\0${computerSid}`).digest('hex');
}

export function adHostId(vault: Vault): string | null {
  return load(vault)?.hostId ?? null;
}

function caSubject(pem: string): string {
  try {
    const c = new X509Certificate(pem);
    return `${c.subject.replace(/\n/g, ', ')}; valid to ${c.validTo}`;
  } catch {
    return '(unreadable)';
  }
}

export function adInfo(vault: Vault): AdInfo | null {
  const s = load(vault);
  if (!s) return null;
  const { bindPassword: _secret, caPem, ...rest } = s;
  return { ...rest, caSubject: caSubject(caPem) };
}

function bad(message: string, reason?: string): never {
  throw new ShieldError('invalid_argument', message, reason ? { details: { reason } } : undefined);
}

/** Validates a new configuration over the stored one (a field left out keeps its value). */
function merge(prev: AdState | null, input: AdConfigInput, now: Date): AdState {
  const urls = input.urls?.length ? [...input.urls] : prev?.urls ?? [];
  if (urls.length === 0) bad('Name at least one domain controller: --url ldaps://dc.example.org');
  const startTls = input.startTls ?? prev?.startTls ?? false;
  const allowPlainLdap = input.allowPlainLdap ?? prev?.allowPlainLdap ?? false;
  // A single TLS name (one for every DC) survives a new --url; names per URL only while the count fits.
  const kept = prev && (prev.tlsNames.length === 1 || prev.tlsNames.length === urls.length) ? prev.tlsNames : [];
  const tlsNames = input.tlsNames?.length ? [...input.tlsNames] : kept;
  if (tlsNames.length > 1 && tlsNames.length !== urls.length) bad('Give one --tls-name for every DC, or a single one for all of them.');
  for (const n of tlsNames) if (!/^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$/.test(n)) bad(`${n} is not a DNS name.`);
  urls.forEach((u, i) => {
    let t;
    try {
      t = parseDcUrl(u, tlsNames[i]);
    } catch {
      bad(`${u} is not an ldaps:// or ldap:// URL.`);
    }
    if (t.secure && startTls) bad(`${u} is LDAPS already: --starttls is for ldap:// URLs.`);
    if (!t.secure && !startTls && !allowPlainLdap) {
      bad(`${u} is plain LDAP: the service account's password and the directory's answers would cross the network unprotected. Use ldaps://, or ldap:// with --starttls (--allow-plain-ldap exists for a lab only).`, 'PlainLdapRefused');
    }
  });
  const caPem = input.caPem ?? prev?.caPem;
  if (!caPem) bad('Pin the DC\'s CA certificate: --ca-file F (PEM).');
  try {
    const c = new X509Certificate(caPem);
    if (!c.ca) bad('The pinned certificate is not a CA certificate (basicConstraints CA:TRUE): pin the CA that issued the DC\'s certificate.');
  } catch (err) {
    if (err instanceof ShieldError) throw err;
    bad('The CA file is not a PEM X.509 certificate.');
  }
  const bindDn = input.bindDn ?? prev?.bindDn;
  if (!bindDn) bad('Name the service account to bind as: --bind-dn "CN=svc,CN=Users,DC=…" (or svc@realm).');
  const bindPassword = input.bindPassword ?? prev?.bindPassword;
  if (!bindPassword) bad('The service account needs its password: --password-file P.');
  let computer = input.computer ?? prev?.computer ?? defaultComputer();
  if (!computer.endsWith('$')) computer += '$';
  if (!/^[^"/\\[\]:;|=,+*?<>@]{1,19}\$$/.test(computer)) bad(`${computer} is not a computer account name (sAMAccountName, at most 20 characters ending in $).`);
  const sids = input.groupSids?.length || input.groupNames?.length ? [...(input.groupSids ?? [])] : prev?.groups.map((g) => g.sid) ?? [];
  for (const sid of sids) if (!DOMAIN_SID.test(sid)) bad(`${sid} is not a domain group SID (S-1-5-21-…-RID).`);
  if (sids.length === 0 && !input.groupNames?.length) bad('Approve at least one group: --group-sid S-1-5-21-…');
  const validityHours = input.validityHours ?? prev?.validityHours ?? DEFAULT_AD_VALIDITY_HOURS;
  const timeoutMs = input.timeoutMs ?? prev?.timeoutMs ?? DEFAULT_AD_TIMEOUT_MS;
  const sameHost = prev !== null && prev.computer.toLowerCase() === computer.toLowerCase();
  return {
    urls, tlsNames, caPem, startTls, allowPlainLdap, bindDn, bindPassword, computer,
    groups: [...new Set(sids)].map((sid) => ({ sid, name: prev?.groups.find((g) => g.sid === sid)?.name ?? null })),
    validityHours, timeoutMs,
    configuredAt: now.toISOString(),
    // Another computer account is another host: its certificates must not carry over.
    hostId: sameHost ? prev.hostId : null,
    lastAttestation: sameHost ? prev.lastAttestation : null,
    lastRefusal: null,
  };
}

function connection(s: AdState): AdConnection {
  return {
    urls: s.urls, tlsNames: s.tlsNames, caPem: s.caPem, startTls: s.startTls, allowPlainLdap: s.allowPlainLdap,
    bindDn: s.bindDn, bindPassword: s.bindPassword, computer: s.computer, groupSids: s.groups.map((g) => g.sid), timeoutMs: s.timeoutMs,
  };
}

/**
 * Stores the configuration. Group names are looked up on the DC for display (and --group NAME
 * resolved to its SID); a DC that does not answer leaves the names unknown — only --group needs it.
 */
export async function configureAd(vault: Vault, input: AdConfigInput, now: Date): Promise<{ info: AdInfo; warning: string | null }> {
  const prev = load(vault);
  const state = merge(prev, input, now);
  let warning: string | null = null;
  try {
    const { bySid, byName } = await lookupGroups({ ...connection(state), groupSids: state.groups.map((g) => g.sid) }, input.groupNames ?? []);
    for (const n of input.groupNames ?? []) {
      const sid = byName.get(n);
      if (!sid) bad(`No group named ${n} in the directory.`);
      if (!state.groups.some((g) => g.sid === sid)) state.groups.push({ sid, name: n });
    }
    for (const g of state.groups) g.name = bySid.get(g.sid) ?? g.name;
    const unknown = state.groups.filter((g) => !bySid.has(g.sid) && !byName.has(g.name ?? ''));
    if (unknown.length) warning = `No group with SID ${unknown.map((g) => g.sid).join(', ')} in the directory (yet).`;
  } catch (err) {
    if (err instanceof ShieldError) throw err;
    if (input.groupNames?.length) throw new ShieldError('attestation_failed', `Cannot resolve --group on the DC: ${(err as Error).message}`, { details: { reason: 'DcUnreachable' } });
    warning = `Saved, but the group names could not be looked up: ${(err as Error).message}`;
  }
  if (state.groups.length === 0) bad('Approve at least one group: --group-sid S-1-5-21-…');
  save(vault, state);
  return { info: adInfo(vault)!, warning };
}

/** Runs every step against the configured DCs (or against `input` merged over them, unsaved). */
export async function testAd(vault: Vault, input: AdConfigInput | null, opts: { onStep?: (s: AdStep) => void; now: Date }): Promise<AdTestReport> {
  const prev = load(vault);
  if (!prev && !input) {
    return { ok: false, reason: 'NotConfigured', message: 'AD-group mode is not configured: run `shieldlab host ad configure` first.', dc: null, steps: [], computer: null, membership: null, failedDcs: [] };
  }
  const state = input ? merge(prev, input, opts.now) : prev!;
  const v = await checkDirectory(connection(state), opts.onStep ? { onStep: opts.onStep } : {});
  return { ok: v.ok, reason: v.reason, message: v.message, dc: v.dc, steps: v.steps, computer: v.computer ? { dn: v.computer.dn, sid: v.computer.sid } : null, membership: v.membership, failedDcs: v.failedDcs };
}

/**
 * The host's side of an ad-group attestation: the directory's verdict now. Success records the
 * host id and what was proven; a refusal is thrown as attestation_failed with its reason.
 */
export async function attestAdHost(vault: Vault, opts: { now: Date }): Promise<{ hostId: string; name: string; validityHours: number }> {
  const state = load(vault);
  const refuse = (reason: string, message: string, extra: Record<string, unknown> = {}): never => {
    throw new ShieldError('attestation_failed', message, { details: { reason, reasons: [reason], mode: 'ad-group', ...extra } });
  };
  if (!state) return refuse('NotConfigured', 'AD-group mode is not configured: run `shieldlab host ad configure` first.');
  const v = await checkDirectory(connection(state));
  if (!v.ok) {
    state.lastRefusal = { at: opts.now.toISOString(), reason: v.reason!, message: v.message };
    save(vault, state);
    return refuse(v.reason!, `AD-group attestation refused (${v.reason}): ${v.message}`, { failedDcs: v.failedDcs, ...(v.dc ? { dc: v.dc } : {}) });
  }
  const hostId = adHostIdOf(v.computer!.domainSid, v.computer!.sid);
  state.hostId = hostId;
  state.lastAttestation = { at: opts.now.toISOString(), dc: v.dc!, computerDn: v.computer!.dn, computerSid: v.computer!.sid, membership: v.membership! };
  state.lastRefusal = null;
  save(vault, state);
  return { hostId, name: state.computer.replace(/\$$/, ''), validityHours: state.validityHours };
}
