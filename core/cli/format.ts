// Human-readable output for the CLI. --json prints the contract's result as it is.
import type { MethodName } from '../app/contract.ts';

type Row = Record<string, unknown>;

function table(rows: Row[], columns: [string, string][]): string {
  if (rows.length === 0) return '(none)\n';
  const cells = rows.map((r) => columns.map(([k]) => {
    const v = r[k];
    return Array.isArray(v) ? v.join(',') : v === undefined || v === null ? '' : String(v);
  }));
  const widths = columns.map(([, h], i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) => c.map((x, i) => x.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(columns.map(([, h]) => h)), ...cells.map(line)].join('\n') + '\n';
}

function keyValues(obj: Row): string {
  return (
    Object.entries(obj)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}: ${typeof v === 'object' && v !== null ? (Array.isArray(v) ? v.join(', ') || '-' : JSON.stringify(v)) : String(v)}`)
      .join('\n') + '\n'
  );
}

export function formatHuman(method: MethodName, result: unknown): string {
  const r = result as Row;
  switch (method) {
    case 'vault.get':
      return `${String(r.value)}\n`;
    case 'vault.list':
      return table(r.records as Row[], [['name', 'NAME'], ['kind', 'KIND'], ['tags', 'TAGS'], ['version', 'VERSION'], ['updatedAt', 'UPDATED']]);
    case 'vault.audit': {
      let out = table([...(r.entries as Row[])].reverse(), [['seq', 'SEQ'], ['at', 'TIME'], ['action', 'ACTION'], ['subject', 'SUBJECT'], ['outcome', 'OUTCOME'], ['reason', 'REASON']]);
      const v = r.verification as { ok: boolean; entries: number; anchored: boolean; problems: { seq: number; problem: string }[] } | undefined;
      if (v) {
        out += v.ok
          ? `Audit chain intact: ${v.entries} entries${v.anchored ? ', anchored' : ''}.\n`
          : `Audit chain BROKEN:\n${v.problems.map((p) => `  entry ${p.seq}: ${p.problem}`).join('\n')}\n`;
      }
      return out;
    }
    case 'vault.recoverySplit': {
      const shares = r.shares as string[];
      return [
        `Recovery set ${String(r.setId)}: any ${String(r.threshold)} of these ${shares.length} shares recover the vault.`,
        'Print or write each on its own sheet and keep them in different places. They are shown only now.',
        '',
        ...shares.map((s, i) => `  share ${i + 1}: ${s}`),
        '',
      ].join('\n');
    }
    case 'guardian.list':
      return table(
        (r.guardians as Row[]).map((g) => ({
          ...g,
          keys: g.hasPrivateKeys ? 'private' : 'public',
          thumbprint: (g.signing as Row).thumbprint,
          expires: String((g.signing as Row).notAfter).slice(0, 10),
          backup: g.hasPrivateKeys ? (g.backedUpAt ? 'yes' : 'NOT BACKED UP') : '-',
          warn: g.warning ? `${(g.warning as Row).level} (${String((g.warning as Row).daysLeft)} d)` : '',
        })),
        [['name', 'NAME'], ['host', 'HOST'], ['keys', 'KEYS'], ['thumbprint', 'SIGNING THUMBPRINT'], ['expires', 'EXPIRES'], ['backup', 'BACKED UP'], ['warn', 'WARNING']],
      );
    case 'kp.create':
    case 'kp.inspect':
    case 'kp.grant':
    case 'kp.revoke':
    case 'kp.roll': {
      const policy = r.policy as { modes: string[]; hosts: string[] };
      return [
        `Key protector ${String(r.kpId)} (${String(r.file)}), version ${String(r.version)}, signed by ${String(r.signedBy)}`,
        String(r.summary),
        '',
        table((r.guardians as Row[]).map((g) => ({ ...g, role: g.owner ? 'owner' : 'guardian', here: g.heldHere ? 'yes' : '' })), [['name', 'GUARDIAN'], ['role', 'ROLE'], ['here', 'HELD HERE'], ['signingThumbprint', 'SIGNING THUMBPRINT']]).trimEnd(),
        '',
        `Allowed attestation: ${policy.modes.join(', ')}; hosts: ${policy.hosts.length ? policy.hosts.join(', ') : 'any attested host'}`,
        ...(r.lastKnownGood ? [`Last-known-good copy: ${String(r.lastKnownGood)} (commit with \`kp roll --commit\`)`] : []),
        '',
      ].join('\n');
    }
    case 'kp.release': {
      const reasons = r.reasons as { code: string; message: string }[];
      return r.allowed
        ? `This host may release the key: guardian ${String(r.guardian)}, ${String(r.mode)} attestation.\n`
        : `This host may NOT release the key:\n${reasons.map((x) => `  [${x.code}] ${x.message}`).join('\n')}\n`;
    }
    case 'vault.delete':
      return `Deleted ${String(r.name)}.\n`;
    case 'vault.put':
      return `${r.created ? 'Stored' : 'Updated'} ${String(r.name)} (version ${String(r.version)}).\n`;
    case 'vhdx.info': {
      const { parent, ...rest } = r;
      const p = parent as { locator: Record<string, string>; path: string | null; foundBy: string | null; linkage: string | null; dataWriteGuid: string | null; skipped: string[]; chain: Row[] } | null;
      if (!p) return keyValues(rest);
      return [
        keyValues(rest).trimEnd(),
        `parent: ${p.path ?? '(not open)'}${p.foundBy ? ` (found by ${p.foundBy}; its DataWriteGuid ${String(p.dataWriteGuid)} matches ${String(p.linkage)})` : ''}`,
        ...Object.entries(p.locator).map(([k, v]) => `  locator ${k}: ${v}`),
        ...p.skipped.map((x) => `  passed over: ${x}`),
        'parent chain (parent first):',
        ...p.chain.map((c, i) => `  ${i + 1}. ${String(c.path)}: ${String(c.type)}, ${String(c.virtualSize)} bytes, DataWriteGuid ${String(c.dataWriteGuid)}`),
        '',
      ].join('\n');
    }
    case 'vhdx.create':
      if (r.type === 'differencing') {
        return `Created ${String(r.file)}: differencing VHDX over ${String(r.parent)}, ${String(r.virtualSize)} bytes, ${Number(r.blockSize) / 1048576} MiB blocks, ${String(r.logicalSectorSize)}/${String(r.physicalSectorSize)}-byte logical/physical sectors (file ${String(r.fileSize)} bytes).\n`;
      }
      return `Created ${String(r.file)}: ${String(r.type)} VHDX, ${String(r.virtualSize)} bytes, ${Number(r.blockSize) / 1048576} MiB blocks, ${String(r.logicalSectorSize)}/${String(r.physicalSectorSize)}-byte logical/physical sectors (file ${String(r.fileSize)} bytes).\n`;
    case 'vhdx.convert':
      return `Converted ${String(r.input)} (${String(r.from)}) to ${String(r.output)} (${String(r.to)}): ${String(r.virtualSize)} bytes, ${String(r.dataBlocks)} of ${String(r.blocks)} blocks hold data (file ${String(r.fileSize)} bytes).\n`;
    case 'disk.info':
    case 'disk.grant':
    case 'disk.revoke': {
      const kp = r.kp as { kpId: string; summary: string };
      return [
        `Shielded disk ${String(r.file)}: ${String(r.virtualSize)} bytes, ${String(r.cipher)} in ${String(r.unitSize)}-byte units${r.integrity ? ', integrity mode' : ''}, ${Number(r.blockSize) / 1048576} MiB blocks (file ${String(r.fileSize)} bytes)`,
        `Disk ID ${String(r.diskId)}, generation ${String(r.generation)}; blocks: ${Object.entries(r.blocks as Record<string, number>).map(([k, v]) => `${v} ${k}`).join(', ')}`,
        `Key protector ${kp.kpId}: ${kp.summary}`,
        '',
      ].join('\n');
    }
    case 'disk.shield': {
      const kp = r.kp as { kpId: string; summary: string };
      return `Shielded ${String(r.input)} (${String(r.from)}) into ${String(r.output)}: ${String(r.virtualSize)} bytes, ${String(r.dataBlocks)} of ${String(r.blocks)} blocks hold data, ${String(r.unitSize)}-byte units (file ${String(r.fileSize)} bytes).\nKey protector ${kp.kpId}: ${kp.summary}\n`;
    }
    case 'disk.serve':
      return `Stopped serving ${String(r.file)}: ${String(r.connections)} connection(s), ${String(r.bytesRead)} bytes read, ${String(r.bytesWritten)} bytes written${r.generation ? `, generation ${String(r.generation)}` : ''}.\n`;
    case 'vm.create':
      return `Created VM ${String(r.name)} (${String(r.level)}, ${String(r.memoryMiB)} MiB, ${String(r.cpus)} CPU(s)) on ${String(r.disk)}; its vTPM is made on first start: \`shieldlab vm start ${String(r.name)}\`.\n`;
    case 'vm.start':
      if (r.status === 'running') {
        return `VM ${String(r.name)} runs in the background (${String(r.level)}, ${String(r.accel)}${r.secureBoot ? ', Secure Boot' : ''}; supervisor pid ${String(r.pid)}, QEMU pid ${String(r.qemuPid)}${r.consoleAt ? `; console: ${String(r.consoleAt)}` : ''}${r.supervisorLog ? `; log ${String(r.supervisorLog)}` : ''}). Stop it with \`shieldlab vm stop ${String(r.name)}\`.\n`;
      }
      return `VM ${String(r.name)} ${r.status === 'crashed' ? 'crashed' : 'stopped'}: ${String(r.reason)} (${String(r.accel)}${r.secureBoot ? ', Secure Boot' : ''}, ran ${String(r.startedAt)} → ${String(r.stoppedAt)}).\n`;
    case 'vm.stop':
      return r.how === 'not-running' ? `VM ${String(r.name)} is not running (${String(r.status)}).\n` : `VM ${String(r.name)} stopped (${String(r.how)}).\n`;
    case 'vm.status':
    case 'vm.list': {
      const host = r.host as { accel: string; accelReason: string } | undefined;
      const rows = (r.vms as Row[]).map((v) => ({ ...v, accel: v.accel, secureBoot: v.secureBoot ? 'on' : 'off', size: `${String(v.memoryMiB)}M/${String(v.cpus)}cpu` }));
      return `${host ? `Host: ${host.accel} (${host.accelReason})\n` : ''}${table(rows, [['name', 'NAME'], ['status', 'STATUS'], ['level', 'LEVEL'], ['accel', 'ACCEL'], ['secureBoot', 'SECURE BOOT'], ['size', 'SIZE'], ['consoleAt', 'CONSOLE'], ['reason', 'LAST'], ['disk', 'DISK']])}`;
    }
    case 'vm.console':
      return `${r.truncated ? `[… earlier output left out: the log holds ${String(r.size)} bytes; --bytes N for more]\n` : ''}${String(r.text)}${String(r.text).endsWith('\n') || r.text === '' ? '' : '\n'}`;
    case 'vm.delete':
      return `Deleted VM ${String(r.name)} and its vTPM state (${String(r.removed)}); the disk file stays.\n`;
    case 'disk.unshield':
      return `Decrypted ${String(r.input)} into ${String(r.output)} (${String(r.to)}): ${String(r.virtualSize)} bytes, ${String(r.dataBlocks)} blocks hold data.\n`;
    case 'vhdx.check':
      return formatCheck(r as unknown as CheckOutput);
    case 'vhdx.resize':
      return `Resized ${String(r.file)}: ${String(r.oldSize)} → ${String(r.newSize)} bytes${r.batMoved ? ' (the BAT moved to a larger region at the end of the file)' : ''}.\n`;
    case 'host.status':
    case 'host.attest':
    case 'host.register':
    case 'host.revokeCertificates':
      return formatHostStatus(r);
    case 'host.adTest':
      return formatAdTest(r);
    case 'host.adConfigure':
    case 'host.adShow':
      return `${formatAdInfo(r)}${r.warning ? `Warning: ${String(r.warning)}\n` : ''}`;
    case 'host.baselineCapture':
    case 'host.baselineShow': {
      const values = r.values as Record<string, string>;
      const head = r.relearned ? 'Baseline re-learnt' : r.changed ? 'Baseline captured' : 'Baseline';
      return [
        `${head} for TPM host ${String(r.hostId).slice(0, 16)}… at ${String(r.capturedAt)}: SHA-256 PCRs ${(r.pcrs as number[]).join(',')}, event log ${String(r.eventLog)} (${String(r.events)} events)`,
        ...(r.pcrs as number[]).map((p) => `  PCR ${String(p).padStart(2)}: ${values[p] ?? ''}`),
        ...((r.findings as string[]).length ? ['What changed:', ...(r.findings as string[]).map((f) => `  ${f}`)] : []),
        '',
      ].join('\n');
    }
    case 'host.baselineDiff': {
      const pcrs = r.pcrs as { pcr: number; baseline: string; current: string; matches: boolean }[];
      return [
        r.matches ? 'The TPM matches the baseline.' : `The TPM does NOT match the baseline${(r.reasons as string[]).length ? ` (${(r.reasons as string[]).join(', ')})` : ''}:`,
        ...pcrs.filter((p) => !p.matches).map((p) => `  PCR ${p.pcr}: ${p.baseline.slice(0, 16)}… → ${p.current.slice(0, 16)}…`),
        ...(r.findings as string[]).map((f) => `  ${f}`),
        '',
      ].join('\n');
    }
    case 'host.policyAddBinary':
    case 'host.policyRemoveBinary':
    case 'host.policyShow':
      return `Code-integrity allow-list:\n${table(r.binaries as Row[], [['path', 'PATH'], ['sha256', 'SHA-256'], ['current', 'NOW'], ['addedAt', 'ADDED']])}`;
    default:
      return keyValues(r);
  }
}

function formatHostStatus(r: Row): string {
  const cert = r.certificate as Row | null;
  const tpm = r.tpm as (Row & { baseline: Row | null; lastAttestation: Row | null }) | null;
  return [
    `Host ${String(r.hostName)}`,
    `  host key: ${r.hostId ? `${String(r.hostId)}${r.hostKeyRegistered ? ' (registered)' : ' (not registered)'}` : 'none'}`,
    `  TPM: ${tpm ? `${String(tpm.hostId)} at ${String(tpm.address)}, EK certificate: ${String(tpm.ekCertificate)}` : 'not registered'}`,
    ...(tpm
      ? [
          `  baseline: ${tpm.baseline ? `PCRs ${(tpm.baseline.pcrs as number[]).join(',')}, captured ${String(tpm.baseline.capturedAt)} from ${String(tpm.baseline.eventLog)}` : 'none (run `host baseline capture`)'}`,
          `  code-integrity allow-list: ${String(tpm.binaries)} binar${tpm.binaries === 1 ? 'y' : 'ies'}`,
        ]
      : []),
    ...(r.ad ? [`  Active Directory (ad-group): ${adSummary(r.ad as Row)}`] : []),
    `  health certificate: ${cert ? `${String(cert.mode)}, issued ${String(cert.issuedAt)}, expires ${String(cert.expiresAt)}, ${cert.valid ? 'valid' : `NOT valid (${String(cert.problem)})`}` : 'none'}`,
    '',
  ].join('\n');
}

const AD_CAVEAT = 'ad-group mode proves identity only (the computer account is in an approved AD group), not the host’s health: it is weaker than tpm mode.';

function adSummary(a: Row): string {
  const last = a.lastAttestation as (Row & { membership: Row }) | null;
  const refusal = a.lastRefusal as Row | null;
  return [
    `${String(a.computer)} in ${(a.groups as Row[]).map((g) => (g.name ? `${String(g.name)} (${String(g.sid)})` : String(g.sid))).join(' or ')}`,
    `via ${(a.urls as string[]).join(', ')}`,
    last ? `last attested ${String(last.at)} by ${String(last.dc)} through ${(last.membership.path as string[]).join(' → ')}` : 'never attested',
    ...(refusal ? [`last refused ${String(refusal.at)}: ${String(refusal.reason)}`] : []),
  ].join('; ');
}

function formatAdInfo(a: Row): string {
  const last = a.lastAttestation as (Row & { membership: Row }) | null;
  const refusal = a.lastRefusal as Row | null;
  const names = a.tlsNames as string[];
  return [
    'Active Directory (ad-group mode)',
    `  ${AD_CAVEAT}`,
    ...(a.urls as string[]).map((u, i) => `  DC ${i + 1}: ${u}${a.startTls ? ' + StartTLS' : ''}${names.length ? `, TLS name ${names.length === 1 ? names[0] : names[i]}` : ''}`),
    ...(a.allowPlainLdap ? ['  plain LDAP ALLOWED (lab only)'] : []),
    `  pinned CA: ${String(a.caSubject)}`,
    `  service account: ${String(a.bindDn)} (password in the vault)`,
    `  computer account: ${String(a.computer)}`,
    ...(a.groups as Row[]).map((g) => `  approved group: ${String(g.sid)}${g.name ? ` (${String(g.name)} when registered)` : ''}`),
    `  certificate validity: ${String(a.validityHours)} h; timeout per DC: ${Number(a.timeoutMs) / 1000} s`,
    `  last attestation: ${last ? `${String(last.at)} by ${String(last.dc)}: ${String(last.computerDn)} → ${(last.membership.path as string[]).join(' → ')}` : 'none'}`,
    ...(refusal ? [`  last refusal: ${String(refusal.at)}: ${String(refusal.reason)}: ${String(refusal.message)}`] : []),
    '',
  ].join('\n');
}

function formatAdTest(r: Row): string {
  const steps = r.steps as { dc: string; step: string; ok: boolean; detail: string; ms: number }[];
  const out: string[] = [];
  let dc = '';
  for (const s of steps) {
    if (s.dc !== dc) out.push(`${(dc = s.dc)}`);
    out.push(`  ${s.ok ? '✓' : '✗'} ${s.step.padEnd(10)} ${s.detail} (${s.ms} ms)`);
  }
  out.push(r.ok ? `OK: ${String(r.message)}${r.dc ? ` (answered by ${String(r.dc)})` : ''}` : `REFUSED (${String(r.reason)}): ${String(r.message)}`);
  out.push(AD_CAVEAT, '');
  return out.join('\n');
}

interface CheckReportOut {
  type: string;
  virtualSize: number;
  fileSize: number;
  checkedBlocks: number;
  findings: { code: string; severity: string; message: string; repairable: boolean; repaired: boolean; count: number }[];
  summary: { errors: number; leaks: number; leakedBytes: number; warnings: number; repairable: number; repaired: number };
  cannotRepair: string | null;
}
interface CheckOutput {
  file: string;
  repair: boolean;
  before: CheckReportOut;
  after: CheckReportOut | null;
}

function formatCheck(r: CheckOutput): string {
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const report = (c: CheckReportOut, showRepair: boolean) => {
    const lines = c.findings.map((f) => {
      const tag = f.repaired ? ' [repaired]' : showRepair && f.repairable ? ' [repairable]' : '';
      return `  ${f.severity.toUpperCase().padEnd(7)} ${f.code}: ${f.message}${tag}`;
    });
    const { errors, leaks, leakedBytes, warnings } = c.summary;
    lines.push(
      errors + leaks + warnings === 0
        ? '  No errors were found on the image.'
        : `  ${plural(errors, 'error')}, ${plural(leaks, 'leak')}${leakedBytes ? ` (${leakedBytes} bytes)` : ''}, ${plural(warnings, 'warning')}.`,
    );
    return lines.join('\n');
  };
  const b = r.before;
  const out = [`${r.file}: ${b.type} VHDX, ${b.virtualSize} bytes, ${b.checkedBlocks} blocks checked (file ${b.fileSize} bytes).`];
  if (!r.after) {
    out.push(report(b, true));
    if (b.summary.repairable > 0) out.push(`${b.summary.repairable} of these can be repaired: run again with --repair.`);
    if (b.cannotRepair) out.push(`Cannot repair: ${b.cannotRepair}.`);
  } else {
    out.push('Before repair:', report(b, false));
    if (b.cannotRepair) out.push(`Cannot repair: ${b.cannotRepair}.`);
    out.push(`After repair (${b.summary.repaired} repaired):`, report(r.after, false));
  }
  return `${out.join('\n')}\n`;
}

/**
 * A verification that found problems is a failed operation (exit 1), though the call itself worked.
 * `vhdx check` exits as `qemu-img check` does: 2 when errors remain (after --repair: unrepaired
 * ones), 3 when only leaks remain, 0 when clean (warnings do not count).
 */
export function exitStatusFor(method: MethodName, result: unknown): number {
  if (method === 'vhdx.check') {
    const c = result as CheckOutput;
    const s = (c.after ?? c.before).summary;
    return s.errors > 0 ? 2 : s.leaks > 0 ? 3 : 0;
  }
  if (method === 'kp.release' && !(result as { allowed: boolean }).allowed) return 1;
  if (method === 'vm.start' && (result as { status: string }).status === 'crashed') return 1;
  if (method === 'host.baselineDiff' && !(result as { matches: boolean }).matches) return 1;
  if (method === 'host.adTest' && !(result as { ok: boolean }).ok) return 1;
  if (method === 'vault.audit') {
    const v = (result as { verification?: { ok: boolean } }).verification;
    if (v && !v.ok) return 1;
  }
  return 0;
}
