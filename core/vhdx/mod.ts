// Public face of the VHDX engine.
export { openVhdx, VhdxImage, type VhdxInfo, type OpenOptions } from './reader.ts';
export { createVhdx, parseSize, type CreateOptions, type CreatedVhdx, type VhdxType } from './create.ts';
export { convertRawToVhdx, convertVhdxToRaw, type ConvertOptions, type ConvertResult } from './convert.ts';
export { crc32c } from './crc32c.ts';
export { MiB, PAYLOAD_STATE, REGION, METADATA_ITEM } from './structures.ts';
