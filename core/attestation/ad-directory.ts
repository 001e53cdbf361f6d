// AD-group mode, the directory side: ask a domain controller whether this host's computer account
// exists, is enabled and is (transitively) in an approved security group. One DC after another,
// each with bounded connect and operation timeouts; TLS is always verified against the pinned CA
// (LDAPS, or LDAP + StartTLS). Every step is reported (connect, tls, bind, computer, enabled,
// membership) so `host ad test` and the UI can explain a refusal. The bind password never leaves
// this module in any message.
import { isIP, connect as netConnect } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Client, EqualityFilter, InvalidCredentialsError, ResultCodeError, StrongAuthRequiredError } from 'ldapts';

export type AdStepName = 'connect' | 'tls' | 'bind' | 'computer' | 'enabled' | 'membership';
export interface AdStep {
  /** The DC (URL) this step talked to. */
  dc: string;
  step: AdStepName;
  ok: boolean;
  detail: string;
  ms: number;
}

/** Why an AD-group attestation was refused (HGS spirit: one word, then the words for people). */
export const AD_REASONS = ['DcUnreachable', 'TlsUntrusted', 'BindFailed', 'ComputerNotFound', 'ComputerDisabled', 'NotAMember', 'PlainLdapRefused', 'NotConfigured', 'DirectoryError'] as const;
export type AdReason = (typeof AD_REASONS)[number];

/** What the directory check needs (the bind password included: callers keep it out of sight). */
export interface AdConnection {
  urls: readonly string[];
  /** Expected TLS names: one per URL, or one for all; none → the URL's host. */
  tlsNames: readonly string[];
  caPem: string;
  startTls: boolean;
  allowPlainLdap: boolean;
  bindDn: string;
  bindPassword: string;
  /** sAMAccountName, with the trailing $. */
  computer: string;
  groupSids: readonly string[];
  timeoutMs: number;
}

export interface AdMembership {
  groupSid: string;
  groupName: string;
  /** Group names from the computer's own group to the approved one, e.g. ['Lab Hosts', 'Shielded Hosts']. */
  path: string[];
}

export interface AdVerdict {
  ok: boolean;
  reason: AdReason | null;
  message: string;
  /** The DC that gave the answer, or null when none did. */
  dc: string | null;
  steps: AdStep[];
  computer: { dn: string; sid: string; domainSid: string } | null;
  membership: AdMembership | null;
  /** Each DC tried without an answer, with its error. */
  failedDcs: { dc: string; reason: AdReason; error: string }[];
}

// ---------------------------------------------------------------------------------------------
// SIDs

export const DOMAIN_SID = /^S-1-5-21-\d{1,10}-\d{1,10}-\d{1,10}-\d{1,10}$/;

/** Binary objectSid / tokenGroups value → S-1-5-21-… */
export function decodeSid(b: Buffer): string {
  if (b.length < 8 || b[0] !== 1 || b.length !== 8 + 4 * b[1]!) throw new Error(`not a SID: ${b.toString('hex')}`);
  const subs: number[] = [];
  for (let i = 0; i < b[1]!; i++) subs.push(b.readUInt32LE(8 + 4 * i));
  return ['S', 1, b.readUIntBE(2, 6), ...subs].join('-');
}

/** S-1-… → binary. */
export function encodeSid(sid: string): Buffer {
  const m = /^S-1-(\d+)((?:-\d+)*)$/i.exec(sid);
  if (!m) throw new Error(`not a SID: ${sid}`);
  const subs = m[2]!.split('-').slice(1).map(Number);
  const b = Buffer.alloc(8 + 4 * subs.length);
  b[0] = 1;
  b[1] = subs.length;
  b.writeUIntBE(Number(m[1]), 2, 6);
  subs.forEach((s, i) => b.writeUInt32LE(s, 8 + 4 * i));
  return b;
}

/** (objectSid=…) with the binary value (ldapts's string filter parser would mangle \XX escapes). */
function sidFilter(sid: string): EqualityFilter {
  return new EqualityFilter({ attribute: 'objectSid', value: encodeSid(sid) });
}

/** RFC 4515 escaping for a value inside a filter. */
export function escapeFilter(s: string): string {
  return s.replace(/[\\*()\0]/g, (c) => '\\' + c.charCodeAt(0).toString(16).padStart(2, '0'));
}

function buffers(v: unknown): Buffer[] {
  return v === undefined ? [] : Array.isArray(v) ? (v as Buffer[]) : [v as Buffer];
}

function strings(v: unknown): string[] {
  return v === undefined ? [] : Array.isArray(v) ? v.map(String) : [String(v)];
}

// ---------------------------------------------------------------------------------------------
// Failures

const UAC_ACCOUNTDISABLE = 0x2;

/** A refusal from one DC; `nextDc` says whether another DC could answer differently. */
class DcFailure extends Error {
  readonly reason: AdReason;
  readonly nextDc: boolean;
  constructor(reason: AdReason, message: string, nextDc: boolean) {
    super(message);
    this.reason = reason;
    this.nextDc = nextDc;
  }
}

const TLS_ERROR = /^(UNABLE_TO_|SELF_SIGNED_CERT|DEPTH_ZERO_SELF_SIGNED_CERT|CERT_|ERR_TLS_CERT_ALTNAME_INVALID|HOSTNAME_MISMATCH|ERR_SSL_|ERR_TLS_)/;

/** A network-level error: an untrusted certificate, or a DC that did not answer. */
function networkFailure(err: unknown, servername: string): DcFailure {
  const e = err as { code?: unknown; message?: unknown };
  const code = typeof e?.code === 'string' ? e.code : '';
  const msg = typeof e?.message === 'string' ? e.message : String(err);
  if (TLS_ERROR.test(code)) {
    const why = code === 'ERR_TLS_CERT_ALTNAME_INVALID'
      ? `its certificate is not for ${servername} (set the DC's name with --tls-name)`
      : `its certificate does not chain to the pinned CA (${code})`;
    return new DcFailure('TlsUntrusted', `the DC's TLS certificate is not trusted: ${why}`, true);
  }
  return new DcFailure('DcUnreachable', `no answer: ${code ? `${code} ` : ''}${msg}`.trim(), true);
}

// ---------------------------------------------------------------------------------------------
// One DC

interface Target {
  url: string;
  host: string;
  port: number;
  secure: boolean;
  servername: string;
}

export function parseDcUrl(url: string, tlsName?: string): Target {
  const u = new URL(url);
  if (u.protocol !== 'ldaps:' && u.protocol !== 'ldap:') throw new Error(`${url}: not an ldap:// or ldaps:// URL`);
  const secure = u.protocol === 'ldaps:';
  const host = u.hostname.replace(/^\[|\]$/g, '');
  return { url, host, port: u.port ? Number(u.port) : secure ? 636 : 389, secure, servername: tlsName ?? host };
}

function tlsOptionsFor(cfg: AdConnection, t: Target): ConnectionOptions {
  // An IP is checked against the certificate's IP SANs (SNI may not carry an IP: RFC 6066).
  return { ca: [cfg.caPem], ...(isIP(t.servername) ? {} : { servername: t.servername }), rejectUnauthorized: true, minVersion: 'TLSv1.2' };
}

type Record_ = (step: AdStepName, ok: boolean, detail: string, started: number) => void;

/** TCP connect (and for LDAPS the TLS handshake) once, so each step can be told apart. */
function probe(cfg: AdConnection, t: Target, record: Record_): Promise<void> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    let connectedAt = 0;
    let done = false;
    const finish = (err: unknown) => {
      if (done) return;
      done = true;
      sock.destroy();
      if (err === null) return resolve();
      const f = networkFailure(err, t.servername);
      if (connectedAt === 0) record('connect', false, `${t.host}:${t.port}: ${f.message}`, started);
      else if (t.secure) record('tls', false, f.message, connectedAt);
      reject(f);
    };
    const onConnect = () => {
      connectedAt = performance.now();
      record('connect', true, `${t.host}:${t.port}`, started);
    };
    const sock = t.secure ? tlsConnect({ host: t.host, port: t.port, ...tlsOptionsFor(cfg, t) }) : netConnect({ host: t.host, port: t.port });
    sock.setTimeout(cfg.timeoutMs, () => finish(Object.assign(new Error(`timed out after ${cfg.timeoutMs} ms`), { code: 'ETIMEDOUT' })));
    sock.once('connect', onConnect);
    sock.once('error', finish);
    if (t.secure) {
      sock.once('secureConnect', () => {
        const peer = (sock as ReturnType<typeof tlsConnect>).getPeerCertificate();
        const proto = (sock as ReturnType<typeof tlsConnect>).getProtocol();
        record('tls', true, `${proto ?? 'TLS'}, certificate CN=${String(peer.subject?.CN ?? '?')} issued by CN=${String(peer.issuer?.CN ?? '?')}, verified against the pinned CA as ${t.servername}`, connectedAt);
        finish(null);
      });
    } else {
      sock.once('connect', () => finish(null));
    }
  });
}

async function checkOne(cfg: AdConnection, t: Target, record: Record_): Promise<Omit<AdVerdict, 'steps' | 'failedDcs'>> {
  if (!t.secure && !cfg.startTls && !cfg.allowPlainLdap) {
    throw new DcFailure('PlainLdapRefused', `${t.url} is plain LDAP: use ldaps://, or --starttls (or --allow-plain-ldap in a lab only)`, false);
  }
  await probe(cfg, t, record);
  const client = new Client({ url: t.url, ...(t.secure ? { tlsOptions: tlsOptionsFor(cfg, t) } : {}), connectTimeout: cfg.timeoutMs, timeout: cfg.timeoutMs, strictDN: false });
  try {
    if (!t.secure) {
      const s = performance.now();
      if (cfg.startTls) {
        try {
          await client.startTLS(tlsOptionsFor(cfg, t));
        } catch (err) {
          const f = err instanceof ResultCodeError ? new DcFailure('TlsUntrusted', `StartTLS refused by the DC: ${err.message}`, true) : networkFailure(err, t.servername);
          record('tls', false, f.message, s);
          throw f;
        }
        record('tls', true, `StartTLS, verified against the pinned CA as ${t.servername}`, s);
      } else {
        record('tls', true, 'NONE: plain LDAP allowed for a lab (the bind password crosses the network in clear)', s);
      }
    }

    let s = performance.now();
    try {
      await client.bind(cfg.bindDn, cfg.bindPassword);
    } catch (err) {
      let f: DcFailure;
      if (err instanceof InvalidCredentialsError) f = new DcFailure('BindFailed', `the DC refused the service account's credentials (${cfg.bindDn}): wrong password, or the account is disabled or locked`, false);
      else if (err instanceof StrongAuthRequiredError) f = new DcFailure('BindFailed', 'the DC refuses simple binds without TLS (strong auth required): use ldaps:// or --starttls', false);
      else if (err instanceof ResultCodeError) f = new DcFailure('BindFailed', `the DC refused the bind as ${cfg.bindDn}: LDAP result ${err.code}`, false);
      else f = networkFailure(err, t.servername);
      record('bind', false, f.message, s);
      throw f;
    }
    record('bind', true, `bound as ${cfg.bindDn}`, s);

    s = performance.now();
    const root = (await client.search('', { scope: 'base', attributes: ['defaultNamingContext'] })).searchEntries[0];
    const baseDn = strings(root?.defaultNamingContext)[0];
    if (!baseDn) throw new DcFailure('DirectoryError', 'the DC did not name its domain (no defaultNamingContext in the root DSE)', true);
    const found = (await client.search(baseDn, {
      filter: `(&(objectCategory=computer)(sAMAccountName=${escapeFilter(cfg.computer)}))`,
      attributes: ['objectSid', 'userAccountControl', 'memberOf', 'primaryGroupID'],
      explicitBufferAttributes: ['objectSid'],
    })).searchEntries;
    if (found.length !== 1) {
      const msg = found.length === 0 ? `no computer account ${cfg.computer} in ${baseDn}` : `${found.length} computer accounts named ${cfg.computer}`;
      record('computer', false, msg, s);
      throw new DcFailure(found.length === 0 ? 'ComputerNotFound' : 'DirectoryError', msg, false);
    }
    const entry = found[0]!;
    const sid = decodeSid(buffers(entry.objectSid)[0]!);
    const domainSid = sid.slice(0, sid.lastIndexOf('-'));
    record('computer', true, `${entry.dn} (${sid})`, s);

    s = performance.now();
    const uac = Number(strings(entry.userAccountControl)[0]);
    if (!Number.isFinite(uac) || (uac & UAC_ACCOUNTDISABLE) !== 0) {
      const msg = `the computer account ${cfg.computer} is disabled`;
      record('enabled', false, msg, s);
      throw new DcFailure('ComputerDisabled', msg, false);
    }
    record('enabled', true, `userAccountControl 0x${uac.toString(16)}: enabled`, s);

    s = performance.now();
    // tokenGroups: the transitive closure the DC itself computes (nested groups, primary group).
    const tg = (await client.search(entry.dn, { scope: 'base', attributes: ['tokenGroups'], explicitBufferAttributes: ['tokenGroups'] })).searchEntries[0];
    const groups = new Set(buffers(tg?.tokenGroups).map(decodeSid));
    const matched = cfg.groupSids.filter((g) => groups.has(g));
    if (matched.length === 0) {
      const msg = `${cfg.computer} is in ${groups.size} group(s), none of them approved (${cfg.groupSids.join(', ')})`;
      record('membership', false, msg, s);
      throw new DcFailure('NotAMember', msg, false);
    }
    const membership = await explainMembership(client, baseDn, strings(entry.memberOf), new Set(matched), Number(strings(entry.primaryGroupID)[0]), domainSid);
    record('membership', true, `${cfg.computer} → ${membership.path.join(' → ')} (${membership.groupSid})`, s);
    return { ok: true, reason: null, message: `${cfg.computer} is in the approved group ${membership.groupName}`, dc: t.url, computer: { dn: entry.dn, sid, domainSid }, membership };
  } catch (err) {
    if (err instanceof DcFailure) throw err;
    if (err instanceof ResultCodeError) throw new DcFailure('DirectoryError', `the DC answered LDAP result ${err.code}: ${err.message}`, true);
    throw networkFailure(err, t.servername);
  } finally {
    await client.unbind().catch(() => {});
  }
}

/**
 * Which approved group the computer is in and through which groups: a breadth-first walk up
 * memberOf (tokenGroups already decided; this only explains). Bounded to 256 groups.
 */
async function explainMembership(client: Client, baseDn: string, memberOf: string[], approved: Set<string>, primaryGroupId: number, domainSid: string): Promise<AdMembership> {
  const queue: { dn: string; path: string[] }[] = memberOf.map((dn) => ({ dn, path: [] }));
  if (Number.isInteger(primaryGroupId)) {
    const primarySid = `${domainSid}-${primaryGroupId}`;
    const [p] = (await client.search(baseDn, { filter: sidFilter(primarySid), attributes: ['cn'] })).searchEntries;
    if (p) queue.push({ dn: p.dn, path: [] });
  }
  const seen = new Set<string>();
  while (queue.length > 0 && seen.size < 256) {
    const { dn, path } = queue.shift()!;
    if (seen.has(dn.toLowerCase())) continue;
    seen.add(dn.toLowerCase());
    const [g] = (await client.search(dn, { scope: 'base', attributes: ['objectSid', 'sAMAccountName', 'cn', 'memberOf'], explicitBufferAttributes: ['objectSid'] })).searchEntries;
    if (!g) continue;
    const name = strings(g.sAMAccountName)[0] ?? strings(g.cn)[0] ?? dn;
    const sid = buffers(g.objectSid)[0] ? decodeSid(buffers(g.objectSid)[0]!) : '';
    if (approved.has(sid)) return { groupSid: sid, groupName: name, path: [...path, name] };
    for (const parent of strings(g.memberOf)) queue.push({ dn: parent, path: [...path, name] });
  }
  // tokenGroups says yes but the walk cannot show how (e.g. a group we may not read).
  const sid = [...approved][0]!;
  const names = await resolveSids(client, baseDn, [sid]);
  return { groupSid: sid, groupName: names.get(sid) ?? sid, path: [`${names.get(sid) ?? sid} (path not readable)`] };
}

async function resolveSids(client: Client, baseDn: string, sids: readonly string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const sid of sids) {
    const [g] = (await client.search(baseDn, { filter: sidFilter(sid), attributes: ['sAMAccountName'] })).searchEntries;
    if (g) out.set(sid, strings(g.sAMAccountName)[0] ?? g.dn);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// All DCs

/** Asks each DC in turn until one gives an answer; reports every step. */
export async function checkDirectory(cfg: AdConnection, opts: { onStep?: (s: AdStep) => void } = {}): Promise<AdVerdict> {
  const steps: AdStep[] = [];
  const failedDcs: AdVerdict['failedDcs'] = [];
  for (let i = 0; i < cfg.urls.length; i++) {
    const url = cfg.urls[i]!;
    const tlsName = cfg.tlsNames.length === 1 ? cfg.tlsNames[0] : cfg.tlsNames[i];
    const record: Record_ = (step, ok, detail, started) => {
      const s: AdStep = { dc: url, step, ok, detail, ms: Math.round((performance.now() - started) * 10) / 10 };
      steps.push(s);
      opts.onStep?.(s);
    };
    try {
      const t = parseDcUrl(url, tlsName);
      const v = await checkOne(cfg, t, record);
      return { ...v, steps, failedDcs };
    } catch (err) {
      const f = err instanceof DcFailure ? err : new DcFailure('DirectoryError', err instanceof Error ? err.message : String(err), true);
      if (!f.nextDc) return { ok: false, reason: f.reason, message: f.message, dc: url, steps, computer: null, membership: null, failedDcs };
      failedDcs.push({ dc: url, reason: f.reason, error: f.message });
    }
  }
  const reason: AdReason = failedDcs.some((f) => f.reason === 'TlsUntrusted') ? 'TlsUntrusted' : failedDcs.some((f) => f.reason === 'DirectoryError') && !failedDcs.some((f) => f.reason === 'DcUnreachable') ? 'DirectoryError' : 'DcUnreachable';
  const message = `No domain controller gave an answer: ${failedDcs.map((f) => `${f.dc}: ${f.error}`).join('; ')}`;
  return { ok: false, reason, message, dc: null, steps, computer: null, membership: null, failedDcs };
}

/** Names for group SIDs and SIDs for group names, from the first DC that answers (for configure). */
export async function lookupGroups(cfg: AdConnection, names: readonly string[]): Promise<{ bySid: Map<string, string>; byName: Map<string, string> }> {
  let last: unknown = null;
  for (let i = 0; i < cfg.urls.length; i++) {
    const t = parseDcUrl(cfg.urls[i]!, cfg.tlsNames.length === 1 ? cfg.tlsNames[0] : cfg.tlsNames[i]);
    if (!t.secure && !cfg.startTls && !cfg.allowPlainLdap) throw new DcFailure('PlainLdapRefused', `${t.url} is plain LDAP`, false);
    const client = new Client({ url: t.url, ...(t.secure ? { tlsOptions: tlsOptionsFor(cfg, t) } : {}), connectTimeout: cfg.timeoutMs, timeout: cfg.timeoutMs, strictDN: false });
    try {
      if (!t.secure && cfg.startTls) await client.startTLS(tlsOptionsFor(cfg, t));
      await client.bind(cfg.bindDn, cfg.bindPassword);
      const root = (await client.search('', { scope: 'base', attributes: ['defaultNamingContext'] })).searchEntries[0];
      const baseDn = strings(root?.defaultNamingContext)[0] ?? '';
      const bySid = await resolveSids(client, baseDn, cfg.groupSids);
      const byName = new Map<string, string>();
      for (const n of names) {
        const found = (await client.search(baseDn, { filter: `(&(objectClass=group)(sAMAccountName=${escapeFilter(n)}))`, attributes: ['objectSid'], explicitBufferAttributes: ['objectSid'] })).searchEntries;
        if (found.length === 1) byName.set(n, decodeSid(buffers(found[0]!.objectSid)[0]!));
      }
      return { bySid, byName };
    } catch (err) {
      last = err instanceof ResultCodeError || err instanceof DcFailure ? err : networkFailure(err, t.servername);
      if (err instanceof ResultCodeError) break;
    } finally {
      await client.unbind().catch(() => {});
    }
  }
  throw last instanceof Error ? new Error(last instanceof InvalidCredentialsError ? 'the DC refused the service account’s credentials' : last.message) : new Error('no DC configured');
}
