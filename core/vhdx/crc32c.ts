// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as MS-VHDX checksums use it.
// Check value: crc32c("123456789") = 0xE3069283.
const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

export function crc32c(data: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < data.length; i++) c = TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

/** The checksum of a structure whose 4-byte checksum field (at `at`) counts as zero. */
export function structureChecksum(data: Buffer, at: number): number {
  const copy = Buffer.from(data);
  copy.writeUInt32LE(0, at);
  return crc32c(copy);
}
