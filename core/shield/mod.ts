// Public face of shielded disks.
export { SHIELD_ITEM, KEY_LABELS, deriveKey, parseShieldItem, type ShieldItem } from './format.ts';
export { ShieldedDisk, shieldImage, unshieldImage, readShieldItem, DEFAULT_UNIT, DEFAULT_BLOCK, type DiskFormat, type ShieldCreateOptions, type ShieldCreateResult } from './disk.ts';
