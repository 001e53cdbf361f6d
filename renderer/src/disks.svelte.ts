// The renderer's view of shielded disks: the disk open in the Disks view and the two long calls,
// shield and unshield. They live here, not in the page, so that leaving the page and coming back
// shows the same disk and a call still running with its progress (and its Cancel). Plus the words
// the page uses.
import type { Args, Result } from '../../core/app/contract.ts';
import { BridgeError, describeError, isCancelled } from './bridge.ts';
import { session } from './session.svelte.ts';
import { Transfer } from './transfer.svelte.ts';

export type DiskInfo = Result<'disk.info'>;
export type DiskFormat = NonNullable<Args<'disk.shield'>['from']>;

class OpenDisk {
  /** The path in the page's Open field. */
  path = $state('');
  info = $state<DiskInfo | null>(null);
  busy = $state(false);
  refusal = $state<string | null>(null);

  async open(file = this.path.trim()): Promise<void> {
    if (!file) return;
    this.path = file;
    this.busy = true;
    this.refusal = null;
    try {
      this.show(await session.call('disk.info', { file }));
    } catch (err) {
      this.info = null;
      this.refusal = `Cannot open it: ${describeError(err)}`;
    } finally {
      this.busy = false;
    }
  }

  /** A disk to show: opened, or changed by grant or revoke. */
  show(info: DiskInfo): void {
    this.info = info;
    this.path = info.file;
  }
}

export const disk = new OpenDisk();

export const shielding = new Transfer();
export const unshielding = new Transfer();

/** Shields a disk, following its progress; the new disk is opened when it is done. */
export async function shield(args: Args<'disk.shield'>): Promise<boolean> {
  const signal = shielding.start(`Shielding ${baseName(args.input)} into ${baseName(args.out)}`, args.out);
  try {
    const r = await session.call('disk.shield', args, { onProgress: shielding.progress, signal });
    shielding.finish(`Shielded ${r.input} into ${r.output}: ${blocksHoldingData(r.dataBlocks, r.blocks)}.`, r.virtualSize);
    void disk.open(r.output);
    return true;
  } catch (err) {
    if (isCancelled(err)) {
      shielding.stopped();
      return false;
    }
    // The server's words for this one name CLI commands.
    const notBackedUp = err instanceof BridgeError && err.code === 'guardian_not_backed_up';
    shielding.fail(
      notBackedUp
        ? `Not shielded: guardian ${args.owner} has not been backed up, and a lost owner would strand every VM it protects. Export its PFX files on the Guardians page, or make a vault backup, first.`
        : `Not shielded: ${describeError(err)}`,
    );
    return false;
  }
}

/** Decrypts the disk to a plain one (owner only, audited), following its progress. */
export async function unshield(args: Args<'disk.unshield'>): Promise<boolean> {
  const signal = unshielding.start(`Unshielding ${baseName(args.file)} to ${baseName(args.out)}`, args.file);
  try {
    const r = await session.call('disk.unshield', args, { onProgress: unshielding.progress, signal });
    unshielding.finish(`Unshielded to ${r.output} (${FORMATS[r.to]}): ${r.dataBlocks} block${r.dataBlocks === 1 ? '' : 's'} with data written.`, r.virtualSize);
    return true;
  } catch (err) {
    if (isCancelled(err)) {
      unshielding.stopped();
      return false;
    }
    unshielding.fail(`Not unshielded: ${describeError(err)}`);
    return false;
  }
}

// ---- words -------------------------------------------------------------------------------------

export const FORMATS: Record<DiskFormat, string> = { raw: 'raw image', vhdx: 'VHDX' };

/** "vm.img" from "/data/vm.img": labels stay short, the notes give the whole path. */
export function baseName(path: string): string {
  return path.split(/[\\/]/).filter(Boolean).pop() ?? path;
}

function blocksHoldingData(data: number, all: number): string {
  return `${data} of ${all} block${all === 1 ? '' : 's'} hold data`;
}

/** VHDX payload block states (BAT), in the order they are listed, in words. */
const BLOCK_STATES: readonly [string, string][] = [
  ['FULLY_PRESENT', 'with data'],
  ['PARTIALLY_PRESENT', 'partly present'],
  ['NOT_PRESENT', 'never written'],
  ['ZERO', 'zeroed'],
  ['UNMAPPED', 'unmapped'],
  ['UNDEFINED', 'undefined'],
];

/** "3 with data · 1 never written", from disk.info's block-state counts. */
export function blockStates(blocks: Record<string, number>): string {
  const known = new Map(BLOCK_STATES);
  const order = [...BLOCK_STATES.map(([state]) => state), ...Object.keys(blocks).filter((s) => !known.has(s))];
  const parts = order.filter((s) => (blocks[s] ?? 0) > 0).map((s) => `${blocks[s]} ${known.get(s) ?? s.toLowerCase().replaceAll('_', ' ')}`);
  return parts.length ? parts.join(' · ') : 'no blocks';
}
