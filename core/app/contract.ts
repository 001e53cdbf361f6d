// The one declaration of ShieldLab's API. The CLI, Electron IPC, the web server and the renderer's
// bridge are all derived from this object: add a method here and it appears at every front door.
import { z } from 'zod';
import { ERROR_CODES } from '../errors.ts';

/** A secret input: never taken from argv. The CLI offers --NAME-file F and --NAME-stdin instead. */
export const secretText = () => z.string().min(1).max(64 * 1024).meta({ secret: true });

export type Needs = 'nothing' | 'vault' | 'unlocked';

export interface MethodSpec<A extends z.ZodObject = z.ZodObject, R extends z.ZodType = z.ZodType> {
  summary: string;
  /** CLI words, e.g. ['vault', 'put'], and which arguments are positional. */
  cli: { path: readonly string[]; positional?: readonly string[] };
  args: A;
  result: R;
  /** What must be true before the call: the CLI unlocks first for 'unlocked'. */
  needs: Needs;
  /** Emits progress events while it runs. */
  progress?: boolean;
}

function method<A extends z.ZodObject, R extends z.ZodType>(spec: MethodSpec<A, R>): MethodSpec<A, R> {
  return spec;
}

const name = z.string().min(1).max(200).regex(/^[^\u0000-\u001f]+$/, 'no control characters');
const path = z.string().min(1).max(4096);
const shareList = z.array(z.string().min(8).max(200)).min(1).max(255);

export const SlotKind = z.enum(['keychain', 'passphrase', 'recovery']);
export const RecordKind = z.enum(['secret', 'guardian-key', 'key-protector', 'recovery', 'host-key', 'attestation', 'shielded-disk', 'vm']);

export const VaultStatus = z.object({
  initialised: z.boolean(),
  home: z.string(),
  path: z.string().optional(),
  vaultId: z.string().optional(),
  unlocked: z.boolean(),
  schemaVersion: z.number().optional(),
  slots: z.array(SlotKind),
  kdf: z.object({ algorithm: z.literal('scrypt'), N: z.number(), r: z.number(), p: z.number() }).nullable().optional(),
  keychainStore: z.string().nullable().optional(),
  recovery: z.object({ shares: z.number(), threshold: z.number() }).nullable().optional(),
  records: z.number().optional(),
  auditEntries: z.number().optional(),
  autoLockMinutes: z.number().optional(),
  createdAt: z.string().optional(),
});
export type VaultStatus = z.infer<typeof VaultStatus>;

export const RecordSummary = z.object({
  id: z.string(),
  kind: RecordKind,
  name: z.string(),
  tags: z.array(z.string()),
  notes: z.string(),
  version: z.number(),
  createdAt: z.string(),
  updatedAt: z.string(),
});
export type RecordSummary = z.infer<typeof RecordSummary>;

export const AuditEntry = z.object({
  seq: z.number(),
  at: z.string(),
  action: z.string(),
  outcome: z.enum(['ok', 'refused', 'failed']),
  subject: z.string().optional(),
  reason: z.string().optional(),
});
export type AuditEntry = z.infer<typeof AuditEntry>;

export const AuditVerification = z.object({
  ok: z.boolean(),
  entries: z.number(),
  anchored: z.boolean(),
  problems: z.array(z.object({ seq: z.number(), problem: z.enum(['edited', 'missing', 'reordered', 'unreadable', 'truncated']) })),
});


export const AttestationMode = z.enum(['tpm', 'host-key', 'ad-group']);

export const CertificateInfo = z.object({
  subject: z.string(),
  thumbprint: z.string(),
  notBefore: z.string(),
  notAfter: z.string(),
});

export const GuardianInfo = z.object({
  name: z.string(),
  host: z.string(),
  source: z.string(),
  hasPrivateKeys: z.boolean(),
  createdAt: z.string(),
  backedUpAt: z.string().nullable(),
  signing: CertificateInfo,
  encryption: CertificateInfo,
  warning: z.object({ level: z.enum(['expired', 'soon']), daysLeft: z.number() }).nullable(),
});
export type GuardianInfo = z.infer<typeof GuardianInfo>;

export const KpInfo = z.object({
  file: z.string(),
  kpId: z.string(),
  version: z.number(),
  authVersion: z.number(),
  rolledAt: z.string(),
  owner: z.object({ name: z.string(), thumbprint: z.string(), trusted: z.boolean(), heldHere: z.boolean() }),
  guardians: z.array(z.object({ name: z.string(), signingThumbprint: z.string(), encryptionThumbprint: z.string(), heldHere: z.boolean(), owner: z.boolean() })),
  policy: z.object({ modes: z.array(AttestationMode), hosts: z.array(z.string()) }),
  signedBy: z.string(),
  lastKnownGood: z.string().nullable(),
  summary: z.string(),
});
export type KpInfo = z.infer<typeof KpInfo>;

export const ReleaseCheck = z.object({
  allowed: z.boolean(),
  kpId: z.string().nullable(),
  guardian: z.string().nullable(),
  mode: z.string().nullable(),
  hostId: z.string().nullable(),
  reasons: z.array(z.object({ code: z.string(), message: z.string() })),
});

export const RegisteredHost = z.object({ name: z.string(), hostId: z.string(), registeredAt: z.string() });

export const TpmHostInfo = z.object({
  name: z.string(),
  hostId: z.string(),
  address: z.string(),
  registeredAt: z.string(),
  ekCertificate: z.string(),
  akName: z.string(),
  baseline: z.object({ pcrs: z.array(z.number()), capturedAt: z.string(), eventLog: z.string(), events: z.number() }).nullable(),
  binaries: z.number(),
  lastAttestation: z.object({ at: z.string(), resetCount: z.number(), restartCount: z.number() }).nullable(),
});

export const BaselineReport = z.object({
  hostId: z.string(),
  bank: z.literal('sha256'),
  pcrs: z.array(z.number()),
  values: z.record(z.string(), z.string()),
  eventLog: z.string(),
  events: z.number(),
  capturedAt: z.string(),
  changed: z.boolean(),
  relearned: z.boolean(),
  findings: z.array(z.string()),
});

export const BaselineDiff = z.object({
  matches: z.boolean(),
  pcrs: z.array(z.object({ pcr: z.number(), baseline: z.string(), current: z.string(), matches: z.boolean() })),
  findings: z.array(z.string()),
  reasons: z.array(z.string()),
});

export const CodeIntegrityPolicy = z.object({
  binaries: z.array(z.object({ path: z.string(), sha256: z.string(), addedAt: z.string(), current: z.enum(['ok', 'changed', 'missing']) })),
});

/** --tpm and --event-log, for every host command that talks to the TPM. */
const tpmArgs = {
  tpm: z.string().min(1).max(300).optional().describe('TPM address: device[:/dev/tpmrm0], swtpm:host=H,port=P or mssim:… (default: the one registered, else device:/dev/tpmrm0)'),
  eventLog: path.optional().describe('TCG event log file (default: the baseline’s, else /sys/kernel/security/tpm0/binary_bios_measurements)'),
};

const AdMembership = z.object({ groupSid: z.string(), groupName: z.string(), path: z.array(z.string()) });

/** AD-group mode's configuration as shown (never the bind password). */
export const AdInfo = z.object({
  urls: z.array(z.string()),
  tlsNames: z.array(z.string()),
  caSubject: z.string(),
  startTls: z.boolean(),
  allowPlainLdap: z.boolean(),
  bindDn: z.string(),
  computer: z.string(),
  groups: z.array(z.object({ sid: z.string(), name: z.string().nullable() })),
  validityHours: z.number(),
  timeoutMs: z.number(),
  configuredAt: z.string(),
  hostId: z.string().nullable(),
  lastAttestation: z.object({ at: z.string(), dc: z.string(), computerDn: z.string(), computerSid: z.string(), membership: AdMembership }).nullable(),
  lastRefusal: z.object({ at: z.string(), reason: z.string(), message: z.string() }).nullable(),
});

export const AdStep = z.object({ dc: z.string(), step: z.enum(['connect', 'tls', 'bind', 'computer', 'enabled', 'membership']), ok: z.boolean(), detail: z.string(), ms: z.number() });

export const AdTestReport = z.object({
  ok: z.boolean(),
  reason: z.string().nullable(),
  message: z.string(),
  dc: z.string().nullable(),
  steps: z.array(AdStep),
  computer: z.object({ dn: z.string(), sid: z.string() }).nullable(),
  membership: AdMembership.nullable(),
  failedDcs: z.array(z.object({ dc: z.string(), reason: z.string(), error: z.string() })),
});

/** The AD-group configuration fields: configure stores them; test may try them unsaved. A field left out keeps its stored value. */
const adArgs = {
  url: z.array(z.string().min(1).max(500)).max(8).default([]).describe('domain controller: ldaps://dc:636, or ldap://dc:389 with --starttls; repeat for several DCs, tried in turn'),
  caFile: path.optional().describe('the DC’s CA certificate (PEM), pinned: no other CA is trusted'),
  caPem: z.string().min(1).max(64 * 1024).optional().describe('the CA certificate as PEM text, instead of --ca-file'),
  tlsName: z.array(z.string().min(1).max(253)).max(8).default([]).describe('the DC’s name in its TLS certificate: one for every DC or one per --url (default: the URL’s host)'),
  bindDn: z.string().min(1).max(1000).optional().describe('service account to bind as (DN, or user@realm)'),
  password: secretText().optional().describe('the service account’s password (kept in the vault only)'),
  groupSid: z.array(z.string().regex(/^S-1-5-21-\d+-\d+-\d+-\d+$/, 'a domain group SID: S-1-5-21-…')).max(32).default([]).describe('approved security group, by objectSid'),
  group: z.array(name).max(32).default([]).describe('approved group by name, resolved to its SID on the DC now'),
  computer: z.string().min(1).max(20).optional().describe('this host’s computer account, NAME$ (default: this machine’s name + $)'),
  starttls: z.boolean().optional().describe('ldap:// URLs: StartTLS before binding'),
  allowPlainLdap: z.boolean().optional().describe('allow ldap:// without TLS (a lab only: the password crosses the network in clear)'),
  validityHours: z.coerce.number().int().min(1).max(168).optional().describe('health certificate validity (default 8)'),
  timeoutSeconds: z.coerce.number().min(0.5).max(60).optional().describe('connect and operation timeout per DC (default 5)'),
};

export const HostStatus = z.object({
  hostName: z.string(),
  hostId: z.string().nullable(),
  hostKeyRegistered: z.boolean(),
  registeredHosts: z.array(RegisteredHost),
  validityHours: z.number(),
  revokedBefore: z.string().nullable(),
  certificate: z
    .object({ mode: AttestationMode, hostId: z.string(), hostName: z.string(), issuedAt: z.string(), expiresAt: z.string(), serial: z.string(), valid: z.boolean(), problem: z.string().nullable() })
    .nullable(),
  tpm: TpmHostInfo.nullable(),
  ad: AdInfo.nullable(),
});


export const VhdxCreated = z.object({
  file: z.string(),
  type: z.enum(['fixed', 'dynamic', 'differencing']),
  parent: z.string().optional(),
  virtualSize: z.number(),
  blockSize: z.number(),
  logicalSectorSize: z.number(),
  physicalSectorSize: z.number(),
  fileSize: z.number(),
});

export const VhdxConverted = z.object({
  input: z.string(),
  output: z.string(),
  from: z.enum(['raw', 'vhdx']),
  to: z.enum(['raw', 'vhdx']),
  virtualSize: z.number(),
  blocks: z.number(),
  dataBlocks: z.number(),
  fileSize: z.number(),
});

export const VhdxInfo = z.object({
  fileSize: z.number(),
  creator: z.string(),
  type: z.enum(['fixed', 'dynamic', 'differencing']),
  header: z.object({
    slot: z.number(),
    sequenceNumber: z.string(),
    fileWriteGuid: z.string(),
    dataWriteGuid: z.string(),
    logGuid: z.string(),
    logVersion: z.number(),
    version: z.number(),
    logLength: z.number(),
    logOffset: z.number(),
  }),
  headers: z.array(z.object({ slot: z.number(), valid: z.boolean(), sequenceNumber: z.string().nullable(), problem: z.string().nullable() })),
  regions: z.array(z.object({ guid: z.string(), name: z.string(), fileOffset: z.number(), length: z.number(), required: z.boolean() })),
  metadata: z.object({
    blockSize: z.number(),
    leaveBlockAllocated: z.boolean(),
    hasParent: z.boolean(),
    virtualSize: z.number(),
    virtualDiskId: z.string(),
    logicalSectorSize: z.number(),
    physicalSectorSize: z.number(),
    items: z.array(z.object({ itemId: z.string(), name: z.string(), offset: z.number(), length: z.number(), isUser: z.boolean(), isVirtualDisk: z.boolean(), isRequired: z.boolean() })),
  }),
  bat: z.object({ entries: z.number(), payloadBlocks: z.number(), chunkRatio: z.number(), states: z.record(z.string(), z.number()) }),
  logDirty: z.boolean(),
  parent: z
    .object({
      locator: z.record(z.string(), z.string()),
      path: z.string().nullable(),
      foundBy: z.string().nullable(),
      linkage: z.string().nullable(),
      dataWriteGuid: z.string().nullable(),
      skipped: z.array(z.string()),
      chain: z.array(z.object({ path: z.string(), type: z.enum(['fixed', 'dynamic', 'differencing']), virtualSize: z.number(), dataWriteGuid: z.string() })),
    })
    .nullable(),
});

const VhdxCheckReport = z.object({
  type: z.enum(['fixed', 'dynamic', 'differencing']),
  virtualSize: z.number(),
  blockSize: z.number(),
  fileSize: z.number(),
  checkedBlocks: z.number(),
  findings: z.array(
    z.object({
      code: z.string(),
      severity: z.enum(['error', 'leak', 'warning']),
      message: z.string(),
      repairable: z.boolean(),
      repaired: z.boolean(),
      count: z.number(),
      bytes: z.number().optional(),
    }),
  ),
  summary: z.object({ errors: z.number(), leaks: z.number(), leakedBytes: z.number(), warnings: z.number(), repairable: z.number(), repaired: z.number() }),
  cannotRepair: z.string().nullable(),
});

export const VhdxChecked = z.object({ file: z.string(), repair: z.boolean(), before: VhdxCheckReport, after: VhdxCheckReport.nullable() });

export const VhdxResized = z.object({ file: z.string(), oldSize: z.number(), newSize: z.number(), batMoved: z.boolean() });

const DiskFormat = z.enum(['raw', 'vhdx']);

export const DiskInfo = z.object({
  file: z.string(),
  virtualSize: z.number(),
  blockSize: z.number(),
  logicalSectorSize: z.number(),
  fileSize: z.number(),
  cipher: z.literal('aes-256-xts'),
  unitSize: z.number(),
  integrity: z.boolean(),
  diskId: z.string(),
  generation: z.string(),
  blocks: z.record(z.string(), z.number()),
  kp: KpInfo,
});

export type DiskInfo = z.infer<typeof DiskInfo>;

export const DiskShielded = z.object({
  input: z.string(),
  output: z.string(),
  from: DiskFormat,
  virtualSize: z.number(),
  blocks: z.number(),
  dataBlocks: z.number(),
  unitSize: z.number(),
  integrity: z.boolean(),
  generation: z.string(),
  diskId: z.string(),
  fileSize: z.number(),
  kp: KpInfo,
});

export const DiskServed = z.object({
  file: z.string(),
  socket: z.string(),
  uri: z.string(),
  readOnly: z.boolean(),
  generation: z.string().nullable(),
  connections: z.number(),
  bytesRead: z.number(),
  bytesWritten: z.number(),
});

export const DiskUnshielded = z.object({ input: z.string(), output: z.string(), to: DiskFormat, virtualSize: z.number(), dataBlocks: z.number() });

const guardianName = z.string().min(1).max(64);

/** Who may run a VM, for a new key protector (kp create, disk shield). */
const newKpArgs = {
  owner: guardianName.describe('owner guardian (held here, backed up)'),
  guardian: z.array(guardianName).max(64).meta({ commaList: true }).default([]).describe('another guardian allowed to run the VM'),
  allowMode: z.array(AttestationMode).min(1).meta({ commaList: true }).default(['tpm', 'host-key']).describe('attestation modes that may release'),
  allowHost: z.array(z.string().regex(/^[0-9a-f]{64}$/)).max(256).meta({ commaList: true }).default([]).describe('host id allowed to release (default: any attested host)'),
};

const protectionArgs = {
  passphrase: secretText().optional().describe('passphrase protecting the vault key'),
  keychain: z.boolean().default(true).describe('keep the vault key in the OS keychain (--no-keychain to skip)'),
  kdfMemoryMib: z
    .number()
    .int()
    .min(16)
    .max(1024)
    .refine((v) => (v & (v - 1)) === 0, 'a power of two')
    .default(128)
    .describe('scrypt memory per passphrase derivation, MiB (power of two)'),
};


// ---- shielded QEMU VMs ----------------------------------------------------------------------------

const vmName = z.string().min(1).max(63).regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'letters, digits, ".", "_" or "-", starting with a letter or digit');
export const SecurityLevel = z.enum(['shielded', 'encryption-supported']);
export const VmRunStatus = z.enum(['starting', 'running', 'stopping', 'stopped', 'crashed']);
export const Accelerator = z.enum(['kvm', 'tcg']);

export const VmInfo = z.object({
  name: z.string(),
  disk: z.string(),
  diskId: z.string(),
  memoryMiB: z.number(),
  cpus: z.number(),
  level: SecurityLevel,
  console: z.enum(['serial-log', 'vnc']).nullable(),
  kernel: z.string().nullable(),
  initrd: z.string().nullable(),
  append: z.string().nullable(),
  createdAt: z.string(),
  tpmState: z.string(),
  vtpmProvisioned: z.boolean(),
  status: VmRunStatus,
  /** The accelerator of the run (or of the last run; when it never ran, what a start would use now). */
  accel: Accelerator,
  accelReason: z.string(),
  secureBoot: z.boolean(),
  startedAt: z.string().nullable(),
  stoppedAt: z.string().nullable(),
  reason: z.string().nullable(),
  pid: z.number().nullable(),
  qemuPid: z.number().nullable(),
  consoleAt: z.string().nullable(),
});
export type VmInfo = z.infer<typeof VmInfo>;

export const VmRun = z.object({
  name: z.string(),
  level: SecurityLevel,
  /** running: a detached start returned once the VM ran; stopped/crashed: how a foreground run ended. */
  status: z.enum(['running', 'stopped', 'crashed']),
  cause: z.enum(['guest', 'stop', 'qemu', 'swtpm', 'nbd']).nullable(),
  reason: z.string(),
  accel: Accelerator,
  secureBoot: z.boolean(),
  vtpmProvisioned: z.boolean(),
  startedAt: z.string(),
  stoppedAt: z.string().nullable(),
  qemuExit: z.object({ code: z.number().nullable(), signal: z.string().nullable() }).nullable(),
  /** The process that owns the running VM (serves its disk): detached starts only. */
  pid: z.number().nullable(),
  qemuPid: z.number().nullable(),
  consoleAt: z.string().nullable(),
  /** Detached from the CLI: where the supervisor process writes what it says (no secrets). */
  supervisorLog: z.string().nullable(),
});

export const contract = {
  'vault.status': method({
    summary: 'Show whether a vault exists, how it is protected, and whether it is unlocked',
    cli: { path: ['vault', 'status'] },
    args: z.object({}),
    result: VaultStatus,
    needs: 'nothing',
  }),
  'vault.init': method({
    summary: 'Create the vault (OS keychain by default, and/or a passphrase)',
    cli: { path: ['vault', 'init'] },
    args: z.object(protectionArgs),
    result: VaultStatus,
    needs: 'nothing',
  }),
  'vault.unlock': method({
    summary: 'Unlock the vault with the OS keychain, or with the passphrase when given',
    cli: { path: ['vault', 'unlock'] },
    args: z.object({ passphrase: secretText().optional().describe('the vault passphrase') }),
    result: VaultStatus,
    needs: 'vault',
  }),
  'vault.lock': method({
    summary: 'Lock the vault: keys are wiped from memory',
    cli: { path: ['vault', 'lock'] },
    args: z.object({}),
    result: VaultStatus,
    needs: 'vault',
  }),
  'vault.put': method({
    summary: 'Store a secret (creates it or replaces its value)',
    cli: { path: ['vault', 'put'], positional: ['name'] },
    args: z.object({
      name,
      value: secretText().describe('the secret value'),
      tags: z.array(z.string().min(1).max(64)).max(32).default([]).describe('tag (repeatable)'),
      notes: z.string().max(4096).default('').describe('free-text notes'),
    }),
    result: z.object({ name: z.string(), version: z.number(), created: z.boolean() }),
    needs: 'unlocked',
  }),
  'vault.get': method({
    summary: 'Read a secret (audited)',
    cli: { path: ['vault', 'get'], positional: ['name'] },
    args: z.object({ name }),
    result: z.object({ name: z.string(), value: z.string(), tags: z.array(z.string()), notes: z.string(), version: z.number(), updatedAt: z.string() }),
    needs: 'unlocked',
  }),
  'vault.list': method({
    summary: 'List records (names, kinds, tags — never values)',
    cli: { path: ['vault', 'list'] },
    args: z.object({ kind: RecordKind.optional().describe('only this kind') }),
    result: z.object({ records: z.array(RecordSummary) }),
    needs: 'unlocked',
  }),
  'vault.delete': method({
    summary: 'Delete a secret',
    cli: { path: ['vault', 'delete'], positional: ['name'] },
    args: z.object({ name }),
    result: z.object({ name: z.string(), deleted: z.literal(true) }),
    needs: 'unlocked',
  }),
  'vault.audit': method({
    summary: 'Show the audit trail; --verify checks the hash chain',
    cli: { path: ['vault', 'audit'] },
    args: z.object({
      verify: z.boolean().default(false).describe('verify the hash chain and report broken entries'),
      limit: z.number().int().min(1).max(100000).default(200).describe('newest entries to show'),
    }),
    result: z.object({ entries: z.array(AuditEntry), verification: AuditVerification.optional() }),
    needs: 'unlocked',
  }),
  'vault.backup': method({
    summary: 'Write an encrypted backup of the whole vault under the recovery key',
    cli: { path: ['vault', 'backup'] },
    args: z.object({ out: path.describe('backup file to write') }),
    result: z.object({ file: z.string(), bytes: z.number(), records: z.number(), recoverySetId: z.string() }),
    needs: 'unlocked',
  }),
  'vault.restore': method({
    summary: 'Restore a backup into an empty home with M recovery shares',
    cli: { path: ['vault', 'restore'], positional: ['file'] },
    args: z.object({ file: path, share: shareList.describe('a recovery share (repeat M times)'), ...protectionArgs }),
    result: VaultStatus,
    needs: 'nothing',
  }),
  'vault.recoverySplit': method({
    summary: 'Create a new recovery key split into N printable shares, M of which recover the vault',
    cli: { path: ['vault', 'recovery', 'split'] },
    args: z.object({
      shares: z.number().int().min(2).max(255).describe('number of shares to print'),
      threshold: z.number().int().min(2).max(255).describe('shares needed to recover'),
    }),
    result: z.object({ setId: z.string(), threshold: z.number(), shares: z.array(z.string()) }),
    needs: 'unlocked',
  }),
  'vault.recover': method({
    summary: 'Regain a vault whose keychain entry or passphrase is lost, with M shares; sets new protection',
    cli: { path: ['vault', 'recover'] },
    args: z.object({ share: shareList.describe('a recovery share (repeat M times)'), ...protectionArgs }),
    result: VaultStatus,
    needs: 'vault',
  }),
  'vault.changePassphrase': method({
    summary: 'Set a new passphrase (adds one if the vault had only the keychain)',
    cli: { path: ['vault', 'passphrase'] },
    args: z.object({ newPassphrase: secretText().describe('the new passphrase'), kdfMemoryMib: protectionArgs.kdfMemoryMib }),
    result: VaultStatus,
    needs: 'unlocked',
  }),
  'vault.rotateKey': method({
    summary: 'Replace the vault key and re-encrypt every record in one transaction',
    cli: { path: ['vault', 'rotate-key'] },
    args: z.object({ passphrase: secretText().optional().describe('the vault passphrase (needed when the vault has one)') }),
    result: z.object({ records: z.number() }),
    needs: 'unlocked',
    progress: true,
  }),
  'vault.settings': method({
    summary: 'Show or change vault settings',
    cli: { path: ['vault', 'settings'] },
    args: z.object({ autoLockMinutes: z.number().int().min(0).max(24 * 60).optional().describe('lock after this many idle minutes (0 = never)') }),
    result: z.object({ autoLockMinutes: z.number() }),
    needs: 'unlocked',
  }),

  'guardian.create': method({
    summary: 'Create a guardian: signing and encryption key pairs in self-signed certificates (Hyper-V naming)',
    cli: { path: ['guardian', 'create'], positional: ['name'] },
    args: z.object({
      name: guardianName,
      host: z.string().min(1).max(64).optional().describe('host name in the certificate subjects (default: this machine)'),
      validityYears: z.number().int().min(1).max(30).default(10).describe('certificate validity in years'),
    }),
    result: GuardianInfo,
    needs: 'unlocked',
  }),
  'guardian.list': method({
    summary: 'List guardians with expiry and backup warnings',
    cli: { path: ['guardian', 'list'] },
    args: z.object({}),
    result: z.object({ guardians: z.array(GuardianInfo) }),
    needs: 'unlocked',
  }),
  'guardian.show': method({
    summary: 'Show one guardian',
    cli: { path: ['guardian', 'show'], positional: ['name'] },
    args: z.object({ name: guardianName }),
    result: GuardianInfo,
    needs: 'unlocked',
  }),
  'guardian.export': method({
    summary: 'Export a guardian: --public (certificates, for another host) or --pfx (two password-protected PFX files, a backup)',
    cli: { path: ['guardian', 'export'], positional: ['name'] },
    args: z.object({
      name: guardianName,
      public: z.boolean().default(false).describe('certificates only'),
      pfx: z.boolean().default(false).describe('full guardian as NAME-signing.pfx and NAME-encryption.pfx'),
      out: path.optional().describe('file to write (--public)'),
      outDir: path.optional().describe('folder to write the PFX files to (--pfx)'),
      password: secretText().optional().describe('PFX password'),
    }),
    result: z.object({ name: z.string(), files: z.array(z.string()), backedUp: z.boolean() }),
    needs: 'unlocked',
  }),
  'guardian.import': method({
    summary: 'Import a guardian: a public guardian file, a folder of PFX files, or a signing PFX with --encryption-file',
    cli: { path: ['guardian', 'import'], positional: ['file'] },
    args: z.object({
      file: path,
      encryptionFile: path.optional().describe('the encryption PFX, when FILE is the signing PFX'),
      password: secretText().optional().describe('PFX password'),
      name: guardianName.optional().describe('name to import it under'),
    }),
    result: GuardianInfo,
    needs: 'unlocked',
  }),
  'guardian.delete': method({
    summary: 'Delete a guardian (refused while a key protector depends on it alone)',
    cli: { path: ['guardian', 'delete'], positional: ['name'] },
    args: z.object({ name: guardianName }),
    result: z.object({ name: z.string(), deleted: z.literal(true) }),
    needs: 'unlocked',
  }),
  'kp.create': method({
    summary: 'Create a key protector owned by a guardian of this host (the owner must be backed up)',
    cli: { path: ['kp', 'create'] },
    args: z.object({
      ...newKpArgs,
      out: path.describe('key protector file to write'),
    }),
    result: KpInfo,
    needs: 'unlocked',
  }),
  'kp.inspect': method({
    summary: 'Explain a key protector: owner, guardians, policy, which of them this host holds',
    cli: { path: ['kp', 'inspect'], positional: ['file'] },
    args: z.object({ file: path }),
    result: KpInfo,
    needs: 'unlocked',
  }),
  'kp.grant': method({
    summary: 'Allow another guardian to run the VM (owner only; re-wraps, never re-encrypts)',
    cli: { path: ['kp', 'grant'], positional: ['file'] },
    args: z.object({ file: path, guardian: guardianName.describe('guardian to add') }),
    result: KpInfo,
    needs: 'unlocked',
  }),
  'kp.revoke': method({
    summary: 'Remove a guardian (owner only); the next roll gives the others a key it never saw',
    cli: { path: ['kp', 'revoke'], positional: ['file'] },
    args: z.object({ file: path, guardian: guardianName.describe('guardian to remove') }),
    result: KpInfo,
    needs: 'unlocked',
  }),
  'kp.roll': method({
    summary: 'A fresh transport key; the previous key protector is kept as last-known-good until committed',
    cli: { path: ['kp', 'roll'], positional: ['file'] },
    args: z.object({ file: path, commit: z.boolean().default(false).describe('drop the last-known-good copy (the new key protector is in use)') }),
    result: KpInfo,
    needs: 'unlocked',
  }),
  'kp.release': method({
    summary: 'Check whether this host may release the key protector’s key, and why not (never prints keys)',
    cli: { path: ['kp', 'release'], positional: ['file'] },
    args: z.object({ file: path, check: z.boolean().default(false).describe('only check (the key itself never leaves ShieldLab)') }),
    result: ReleaseCheck,
    needs: 'unlocked',
  }),
  'host.status': method({
    summary: 'This host: identity, registered host keys, current health certificate',
    cli: { path: ['host', 'status'] },
    args: z.object({}),
    result: HostStatus,
    needs: 'unlocked',
  }),
  'host.registerKey': method({
    summary: 'Register this host’s key with the guardian (host-key attestation), or another host’s public key',
    cli: { path: ['host', 'register-key'] },
    args: z.object({
      publicKeyFile: path.optional().describe('another host’s public key (PEM), from `host export-key`'),
      name: z.string().min(1).max(64).optional().describe('name for that host'),
    }),
    result: RegisteredHost,
    needs: 'unlocked',
  }),
  'host.exportKey': method({
    summary: 'Write this host’s public key, to register it with another guardian',
    cli: { path: ['host', 'export-key'] },
    args: z.object({ out: path.describe('PEM file to write') }),
    result: z.object({ file: z.string(), hostId: z.string() }),
    needs: 'unlocked',
  }),
  'host.attest': method({
    summary: 'Attest this host and get a health certificate (default 8 h); tpm mode quotes the registered TPM, ad-group asks the configured DCs',
    cli: { path: ['host', 'attest'] },
    args: z.object({ mode: AttestationMode.default('host-key').describe('attestation mode'), ...tpmArgs }),
    result: HostStatus,
    needs: 'unlocked',
  }),
  'host.register': method({
    summary: 'Register this host for attestation: --mode tpm records its TPM (EK, EK certificate, an AK proven by credential activation)',
    cli: { path: ['host', 'register'] },
    args: z.object({
      mode: AttestationMode.default('tpm').describe('attestation mode (host-key: as `host register-key`)'),
      tpm: tpmArgs.tpm,
      name: z.string().min(1).max(64).optional().describe('name for this host (default: its host name)'),
      yes: z.boolean().default(false).describe('replace a registration of another TPM (its baseline goes with it)'),
    }),
    result: HostStatus,
    needs: 'unlocked',
  }),
  'host.adConfigure': method({
    summary: 'Configure ad-group attestation (identity only, weaker than tpm mode): DCs, pinned CA, service account, approved group SIDs',
    cli: { path: ['host', 'ad', 'configure'] },
    args: z.object(adArgs),
    result: AdInfo.extend({ warning: z.string().nullable() }),
    needs: 'unlocked',
  }),
  'host.adTest': method({
    summary: 'Check the AD configuration step by step (connect, TLS, bind, computer, enabled, membership path) without attesting (exit 1 on a refusal)',
    cli: { path: ['host', 'ad', 'test'] },
    args: z.object(adArgs),
    result: AdTestReport,
    needs: 'unlocked',
  }),
  'host.adShow': method({
    summary: 'The ad-group configuration (never the password) and the last attestation',
    cli: { path: ['host', 'ad', 'show'] },
    args: z.object({}),
    result: AdInfo,
    needs: 'unlocked',
  }),
  'host.baselineCapture': method({
    summary: 'Capture the TPM baseline (SHA-256 PCRs and the event log, from a verified quote); a change needs --yes and is audited',
    cli: { path: ['host', 'baseline', 'capture'] },
    args: z.object({
      ...tpmArgs,
      pcrs: z.array(z.coerce.number().int().min(0).max(23)).min(1).max(24).meta({ commaList: true }).optional().describe('PCRs to baseline (default 0,1,2,3,4,5,6,7, or the current baseline’s)'),
      yes: z.boolean().default(false).describe('re-learn a baseline that changed (audited)'),
    }),
    result: BaselineReport,
    needs: 'unlocked',
  }),
  'host.baselineShow': method({
    summary: 'Show the TPM baseline: PCR values, event log, when it was captured',
    cli: { path: ['host', 'baseline', 'show'] },
    args: z.object({}),
    result: BaselineReport,
    needs: 'unlocked',
  }),
  'host.baselineDiff': method({
    summary: 'Compare the TPM’s PCRs now (verified quote) with the baseline, explained event by event (exit 1 when they differ)',
    cli: { path: ['host', 'baseline', 'diff'] },
    args: z.object({ ...tpmArgs }),
    result: BaselineDiff,
    needs: 'unlocked',
  }),
  'host.policyAddBinary': method({
    summary: 'Allow a binary that touches shielded VMs (QEMU, swtpm, OVMF, ShieldLab) at its current SHA-256; again after an update',
    cli: { path: ['host', 'policy', 'add-binary'], positional: ['path'] },
    args: z.object({ path }),
    result: CodeIntegrityPolicy,
    needs: 'unlocked',
  }),
  'host.policyRemoveBinary': method({
    summary: 'Remove a binary from the code-integrity allow-list',
    cli: { path: ['host', 'policy', 'remove-binary'], positional: ['path'] },
    args: z.object({ path }),
    result: CodeIntegrityPolicy,
    needs: 'unlocked',
  }),
  'host.policyShow': method({
    summary: 'The code-integrity allow-list, each binary checked against its file now',
    cli: { path: ['host', 'policy', 'show'] },
    args: z.object({}),
    result: CodeIntegrityPolicy,
    needs: 'unlocked',
  }),
  'host.revokeCertificates': method({
    summary: 'Deny every health certificate issued before a time (default: now)',
    cli: { path: ['host', 'revoke-certificates'] },
    args: z.object({ before: z.iso.datetime({ offset: true }).optional().describe('ISO time; certificates issued earlier are refused') }),
    result: HostStatus,
    needs: 'unlocked',
  }),
  'vhdx.info': method({
    summary: 'Every header field of a VHDX file: headers, regions, metadata, block states, a differencing disk\'s parent chain',
    cli: { path: ['vhdx', 'info'], positional: ['file'] },
    args: z.object({
      file: path,
      parent: path.optional().describe("a differencing disk's parent file, instead of the paths its parent locator names (still identity-checked)"),
    }),
    result: VhdxInfo,
    needs: 'nothing',
  }),
  'vhdx.create': method({
    summary: 'Create an empty VHDX: dynamic (default), fixed, or differencing over a parent (--parent), laid out as Hyper-V does',
    cli: { path: ['vhdx', 'create'], positional: ['file'] },
    args: z.object({
      file: path,
      size: z.string().min(1).max(40).optional().describe('virtual disk size: bytes or with a suffix (512K, 10M, 1G, 2T); with --parent, the parent\'s'),
      fixed: z.boolean().default(false).describe('a fixed disk: every block allocated up front'),
      parent: path.optional().describe('a differencing disk over this VHDX: it reads as the parent until written (size and sector size from the parent)'),
      blockSize: z.string().min(1).max(40).optional().describe('block size, a power of two from 1M to 256M (default 32M; 2M with --parent)'),
      logicalSector: z.number().int().optional().describe('logical sector size, 512 or 4096 (default 512; with --parent, the parent\'s)'),
    }),
    result: VhdxCreated,
    needs: 'nothing',
  }),
  'vhdx.convert': method({
    summary: 'Convert raw ⇄ VHDX, streaming (format by extension .vhdx / .raw / .img, or --from/--to)',
    cli: { path: ['vhdx', 'convert'], positional: ['input', 'output'] },
    args: z.object({
      input: path,
      output: path,
      from: z.enum(['raw', 'vhdx']).optional().describe('input format (default: by extension)'),
      to: z.enum(['raw', 'vhdx']).optional().describe('output format (default: by extension)'),
      fixed: z.boolean().default(false).describe('VHDX output: a fixed disk (default dynamic)'),
      blockSize: z.string().min(1).max(40).optional().describe('VHDX output: block size, 1M to 256M (default 32M)'),
      logicalSector: z.number().int().optional().describe('VHDX output: logical sector size, 512 or 4096 (default 512)'),
    }),
    result: VhdxConverted,
    needs: 'nothing',
    progress: true,
  }),
  'vhdx.check': method({
    summary: 'Check a VHDX like qemu-img check (exit 0 clean, 2 errors, 3 leaks only); --repair fixes what it can, then checks again',
    cli: { path: ['vhdx', 'check'], positional: ['file'] },
    args: z.object({
      file: path,
      repair: z.boolean().default(false).describe('repair: replay the log, rewrite damaged header and region table copies, drop bad BAT entries (they read as zeros), cut leaked space off the end'),
    }),
    result: VhdxChecked,
    needs: 'nothing',
    progress: true,
  }),
  'vhdx.resize': method({
    summary: 'Grow a fixed or dynamic VHDX in place (moving the BAT when it must); shrinking is refused',
    cli: { path: ['vhdx', 'resize'], positional: ['file'] },
    args: z.object({ file: path, size: z.string().min(1).max(40).describe('the new virtual disk size: bytes or with a suffix (10M, 20G, 2T)') }),
    result: VhdxResized,
    needs: 'nothing',
  }),

  'disk.shield': method({
    summary: 'Shield a raw or VHDX disk: a new VHDX whose payload is AES-256-XTS ciphertext, its key protector inside (format by extension or --from)',
    cli: { path: ['disk', 'shield'], positional: ['input'] },
    args: z.object({
      input: path,
      out: path.describe('the shielded VHDX to write'),
      from: DiskFormat.optional().describe('input format (default: by extension)'),
      ...newKpArgs,
      unitSize: z.number().int().optional().describe('bytes per encrypted data unit, a power of two from 512 to 1M (default 4096)'),
      integrity: z.boolean().default(false).describe('per-unit tags: any edit, move or rollback of the file is detected (the disk is fully allocated)'),
    }),
    result: DiskShielded,
    needs: 'unlocked',
    progress: true,
  }),
  'disk.unshield': method({
    summary: 'Decrypt a shielded disk to a raw or VHDX file (owner only, audited; format by extension or --to)',
    cli: { path: ['disk', 'unshield'], positional: ['file'] },
    args: z.object({ file: path, out: path.describe('the plain disk to write'), to: DiskFormat.optional().describe('output format (default: by extension)') }),
    result: DiskUnshielded,
    needs: 'unlocked',
    progress: true,
  }),
  'disk.serve': method({
    summary: 'Serve a shielded disk decrypted over NBD on a private Unix socket until stopped (Ctrl-C, SIGTERM): the host must be attested and allowed by the key protector',
    cli: { path: ['disk', 'serve'], positional: ['file'] },
    args: z.object({
      file: path,
      socket: path.optional().describe('the Unix socket to create (its folder must be yours alone; default: a new private folder)'),
      readOnly: z.boolean().default(false).describe('refuse writes'),
    }),
    result: DiskServed,
    needs: 'unlocked',
  }),
  'disk.info': method({
    summary: 'A shielded disk: structure, encryption and its key protector in words (no key needed)',
    cli: { path: ['disk', 'info'], positional: ['file'] },
    args: z.object({ file: path }),
    result: DiskInfo,
    needs: 'unlocked',
  }),
  'disk.grant': method({
    summary: 'Allow another guardian to run this disk (owner only): rewrites the key protector item, never the payload',
    cli: { path: ['disk', 'grant'], positional: ['file'] },
    args: z.object({ file: path, guardian: guardianName.describe('guardian to add') }),
    result: DiskInfo,
    needs: 'unlocked',
  }),
  'disk.revoke': method({
    summary: 'Remove a guardian from this disk (owner only): rewrites the key protector item, never the payload',
    cli: { path: ['disk', 'revoke'], positional: ['file'] },
    args: z.object({ file: path, guardian: guardianName.describe('guardian to remove') }),
    result: DiskInfo,
    needs: 'unlocked',
  }),

  'vm.create': method({
    summary: 'Create a shielded QEMU VM from a shielded disk (nothing starts; the vTPM is made on first start)',
    cli: { path: ['vm', 'create'], positional: ['name'] },
    args: z.object({
      name: vmName,
      disk: path.describe('the shielded VHDX (from `disk shield`)'),
      memory: z.number().int().min(64).max(1024 * 1024).default(1024).describe('memory in MiB'),
      cpus: z.number().int().min(1).max(256).default(2).describe('virtual CPUs'),
      level: SecurityLevel.default('shielded').describe('shielded: no console, Secure Boot; encryption-supported: the admin keeps a console'),
      console: z.enum(['serial-log', 'vnc']).optional().describe('encryption-supported only: the serial console to a log file (default) or VNC on 127.0.0.1'),
      kernel: path.optional().describe('lab/test guests: boot this kernel directly (under Secure Boot it must be signed for the enrolled keys)'),
      initrd: path.optional().describe('lab/test guests: the initrd for --kernel'),
      append: z.string().max(4096).optional().describe('lab/test guests: the kernel command line for --kernel'),
    }),
    result: VmInfo,
    needs: 'unlocked',
  }),
  'vm.start': method({
    summary: 'Start a VM: attest, release the key, serve the disk, start the encrypted vTPM, launch QEMU. Runs until it stops (Ctrl-C, SIGTERM or `vm stop`), or with --detach returns once it runs',
    cli: { path: ['vm', 'start'], positional: ['name'] },
    args: z.object({
      name: vmName,
      detach: z.boolean().default(false).describe('return once the VM runs: from the CLI a supervisor process keeps it running; in the app and web mode the app process does, until it quits'),
      testChannel: path.optional().describe('TEST ONLY (encryption-supported level): connect a virtio-serial port named org.shieldlab.test to this Unix socket'),
      powerDownTimeout: z.number().int().min(1).max(3600).default(60).describe('seconds an ACPI power-down may take on Ctrl-C before the VM is stopped hard'),
    }),
    result: VmRun,
    needs: 'unlocked',
  }),
  'vm.stop': method({
    summary: 'Stop a running VM: ACPI power-down, then a hard stop after the timeout (--force: at once)',
    cli: { path: ['vm', 'stop'], positional: ['name'] },
    args: z.object({
      name: vmName,
      force: z.boolean().default(false).describe('stop hard now (no power-down)'),
      timeout: z.number().int().min(1).max(3600).default(60).describe('seconds to wait for the power-down'),
    }),
    result: z.object({ name: z.string(), how: z.enum(['powerdown', 'quit', 'kill', 'not-running']), status: VmRunStatus }),
    needs: 'unlocked',
  }),
  'vm.status': method({
    summary: 'VMs and how they run: state, accelerator (KVM or TCG), Secure Boot, console',
    cli: { path: ['vm', 'status'], positional: ['name'] },
    args: z.object({ name: vmName.optional() }),
    result: z.object({ host: z.object({ accel: Accelerator, accelReason: z.string() }), vms: z.array(VmInfo) }),
    needs: 'unlocked',
  }),
  'vm.list': method({
    summary: 'The VMs of this ShieldLab home',
    cli: { path: ['vm', 'list'] },
    args: z.object({}),
    result: z.object({ vms: z.array(VmInfo) }),
    needs: 'unlocked',
  }),
  'vm.console': method({
    summary: 'The serial console of an encryption-supported VM (the end of its log; the last run stays readable after it stops). Shielded VMs have none',
    cli: { path: ['vm', 'console'], positional: ['name'] },
    args: z.object({ name: vmName, bytes: z.number().int().min(1).max(1024 * 1024).default(64 * 1024).describe('how much of the end of the log') }),
    result: z.object({ name: z.string(), file: z.string(), status: VmRunStatus, text: z.string(), size: z.number(), truncated: z.boolean() }),
    needs: 'unlocked',
  }),
  'vm.delete': method({
    summary: 'Delete a stopped VM: its record and its vTPM state (the guest’s TPM keys are lost); the disk file stays. Needs --yes',
    cli: { path: ['vm', 'delete'], positional: ['name'] },
    args: z.object({ name: vmName, yes: z.boolean().default(false).describe('yes, delete it and its vTPM') }),
    result: z.object({ name: z.string(), deleted: z.literal(true), removed: z.string() }),
    needs: 'unlocked',
  }),
} as const;

export type Contract = typeof contract;
export type MethodName = keyof Contract;
export type Args<M extends MethodName> = z.input<Contract[M]['args']>;
export type ParsedArgs<M extends MethodName> = z.output<Contract[M]['args']>;
export type Result<M extends MethodName> = z.output<Contract[M]['result']>;

export const METHOD_NAMES = Object.keys(contract) as MethodName[];

export function isMethodName(value: unknown): value is MethodName {
  return typeof value === 'string' && Object.hasOwn(contract, value);
}

/** Events pushed to a front door while it is connected. */
export const ProgressEvent = z.object({
  type: z.literal('progress'),
  callId: z.string(),
  method: z.string(),
  phase: z.string(),
  done: z.number(),
  total: z.number(),
  unit: z.enum(['records', 'bytes', 'steps']),
});
export const StateEvent = z.object({ type: z.literal('state'), unlocked: z.boolean(), reason: z.string().optional() });
export const AppEvent = z.discriminatedUnion('type', [ProgressEvent, StateEvent]);
export type AppEvent = z.infer<typeof AppEvent>;
export type ProgressEvent = z.infer<typeof ProgressEvent>;

export const SerializedError = z.object({ code: z.enum(ERROR_CODES), message: z.string(), details: z.record(z.string(), z.unknown()).optional() });

/** Wire envelope used by web mode and Electron IPC alike. */
export type CallOutcome<M extends MethodName = MethodName> = { ok: true; result: Result<M> } | { ok: false; error: z.infer<typeof SerializedError> };

/** The API as a typed client sees it (bridge, tests). */
export type ShieldLabApi = { [M in MethodName]: (args: Args<M>, opts?: { onProgress?: (e: ProgressEvent) => void }) => Promise<Result<M>> };

/** Channel names for Electron IPC, derived from the method names. */
export const IPC_PREFIX = 'shieldlab:';
export const IPC_EVENT_CHANNEL = 'shieldlab:event';
