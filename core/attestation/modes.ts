// The ways a host can prove it may run shielded VMs (HGS's attestation modes).
export const ATTESTATION_MODES = ['tpm', 'host-key', 'ad-group'] as const;
export type AttestationMode = (typeof ATTESTATION_MODES)[number];
