// core/vtpm: one swtpm per VM, its state encrypted under a key derived from the KP's transport key
// and handed over by file descriptor; first-start provisioning (SHA-256 PCR bank, EK, EK
// certificate from the owner guardian's CA in NV 0x01C00002).
export { deriveVtpmKey } from './key.ts';
export { startVtpm, STATE_KEY_BYTES, type Vtpm, type VtpmExit, type VtpmOptions } from './process.ts';
export { provisionVtpm, readMarker, MARKER_FILE, EK_PERSISTENT_HANDLE, EK_CERT_NV_ATTRIBUTES, type ProvisionOptions, type ProvisionResult, type VtpmMarker } from './provision.ts';
export { ekCaCertificate, issueEkCertificate, type EkCaOwner, type EkCertificateOptions } from './ek-cert.ts';
export { vtpmKeyCheck } from './key.ts';
export { rekeyVtpmState, settleVtpmState, promoteNext, stateFolders, readKeyCheck, writeKeyCheck, KEY_CHECK_FILE, type RekeyOptions, type StateFolders } from './rekey.ts';
