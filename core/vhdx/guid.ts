// GUIDs as MS-VHDX stores them: the first three fields little-endian, the last eight bytes as-is.
export function readGuid(buf: Buffer, at: number): string {
  const b = buf.subarray(at, at + 16);
  const hex = (x: Buffer) => x.toString('hex');
  const le = (x: Buffer) => Buffer.from(x).reverse().toString('hex');
  return `${le(b.subarray(0, 4))}-${le(b.subarray(4, 6))}-${le(b.subarray(6, 8))}-${hex(b.subarray(8, 10))}-${hex(b.subarray(10, 16))}`;
}

export function writeGuid(guid: string, buf: Buffer, at: number): void {
  const h = guid.replace(/[{}-]/g, '');
  const bytes = Buffer.from(h, 'hex');
  if (bytes.length !== 16) throw new Error(`not a GUID: ${guid}`);
  Buffer.from(bytes.subarray(0, 4)).reverse().copy(buf, at);
  Buffer.from(bytes.subarray(4, 6)).reverse().copy(buf, at + 4);
  Buffer.from(bytes.subarray(6, 8)).reverse().copy(buf, at + 6);
  bytes.subarray(8, 16).copy(buf, at + 8);
}

export const NULL_GUID = '00000000-0000-0000-0000-000000000000';
