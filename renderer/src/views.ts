// The navigation. One entry per view whose capability works today; a new capability (VMs, …)
// appears by adding its entry here.
import type { Component } from 'svelte';
import type { Needs } from '../../core/app/contract.ts';
import VaultView from './views/VaultView.svelte';
import AuditView from './views/AuditView.svelte';
import GuardiansView from './views/GuardiansView.svelte';
import KeyProtectorsView from './views/KeyProtectorsView.svelte';
import DisksView from './views/DisksView.svelte';
import HostView from './views/HostView.svelte';
import VmsView from './views/VmsView.svelte';

export interface ViewEntry {
  /** The URL fragment: #/vault */
  id: string;
  label: string;
  /** What the view needs before it can show: the shell puts Create or Unlock in its place. */
  needs: Needs;
  component: Component;
}

export const views: readonly [ViewEntry, ...ViewEntry[]] = [
  { id: 'vault', label: 'Vault', needs: 'unlocked', component: VaultView },
  { id: 'guardians', label: 'Guardians', needs: 'unlocked', component: GuardiansView },
  { id: 'key-protectors', label: 'Key protectors', needs: 'unlocked', component: KeyProtectorsView },
  { id: 'disks', label: 'Disks', needs: 'unlocked', component: DisksView },
  { id: 'vms', label: 'VMs', needs: 'unlocked', component: VmsView },
  { id: 'host', label: 'Host health', needs: 'unlocked', component: HostView },
  { id: 'audit', label: 'Audit', needs: 'unlocked', component: AuditView },
];

export function viewFromHash(hash: string): ViewEntry {
  const id = hash.replace(/^#\/?/, '');
  return views.find((v) => v.id === id) ?? views[0];
}
