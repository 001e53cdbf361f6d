// Public face of the VHDX engine.
export { VhdxImage, MAX_PARENT_CHAIN, type VhdxInfo, type VhdxParentInfo, type OpenOptions } from './reader.ts';
export { openVhdx, resizeVhdx, VhdxWritable, type ReplayReport, type ResizeResult } from './writer.ts';
export { createVhdx, createDifferencingVhdx, parseSize, type CreateOptions, type CreatedVhdx, type DifferencingOptions, type VhdxType } from './create.ts';
export { convertRawToVhdx, convertVhdxToRaw, type ConvertOptions, type ConvertResult } from './convert.ts';
export { checkVhdx, type CheckFinding, type CheckOptions, type CheckReport, type CheckResult, type CheckSeverity } from './check.ts';
export { crc32c } from './crc32c.ts';
export { MiB, PAYLOAD_STATE, REGION, METADATA_ITEM, SB_STATE, parseParentLocator, type ParentLocator } from './structures.ts';
