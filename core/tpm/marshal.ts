// Big-endian reader and writer for TPM 2.0 wire structures. The reader never reads past its end:
// every short read, oversized TPM2B or impossible count is a `tpm_malformed` ShieldError, so a
// damaged response cannot surface as a RangeError or as a huge allocation.
import { ShieldError } from '../errors.ts';

export function malformed(message: string): ShieldError {
  return new ShieldError('tpm_malformed', `Malformed TPM data: ${message}.`);
}

export class Reader {
  readonly buf: Buffer;
  private pos: number;
  private readonly end: number;

  constructor(buf: Buffer, start = 0, end = buf.length) {
    this.buf = buf;
    this.pos = start;
    this.end = end;
  }

  get offset(): number {
    return this.pos;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  private need(n: number, what: string): number {
    if (n > this.end - this.pos) throw malformed(`${what} needs ${n} bytes, ${this.end - this.pos} left`);
    const at = this.pos;
    this.pos += n;
    return at;
  }

  u8(what = 'UINT8'): number {
    return this.buf.readUInt8(this.need(1, what));
  }

  u16(what = 'UINT16'): number {
    return this.buf.readUInt16BE(this.need(2, what));
  }

  u32(what = 'UINT32'): number {
    return this.buf.readUInt32BE(this.need(4, what));
  }

  i32(what = 'INT32'): number {
    return this.buf.readInt32BE(this.need(4, what));
  }

  u64(what = 'UINT64'): bigint {
    return this.buf.readBigUInt64BE(this.need(8, what));
  }

  /** A copy, so callers may keep or wipe it independently of the response buffer. */
  bytes(n: number, what = 'bytes'): Buffer {
    const at = this.need(n, what);
    return Buffer.from(this.buf.subarray(at, at + n));
  }

  /** TPM2B_*: a UINT16 size then that many bytes; `max` is the structure's own limit. */
  tpm2b(what: string, max = 0xffff): Buffer {
    const size = this.u16(`${what}.size`);
    if (size > max) throw malformed(`${what} is ${size} bytes, more than its maximum ${max}`);
    return this.bytes(size, what);
  }

  /** A TPM2B whose contents are a structure: a sub-reader that must be consumed exactly. */
  sized<T>(what: string, parse: (r: Reader) => T, opts: { max?: number; allowEmpty?: boolean } = {}): T | undefined {
    const size = this.u16(`${what}.size`);
    if (size > (opts.max ?? 0xffff)) throw malformed(`${what} is ${size} bytes, more than its maximum ${opts.max}`);
    if (size === 0) {
      if (opts.allowEmpty) return undefined;
      throw malformed(`${what} is empty`);
    }
    const at = this.need(size, what);
    const sub = new Reader(this.buf, at, at + size);
    const value = parse(sub);
    sub.done(what);
    return value;
  }

  /** A list count, bounded by the structure's maximum and by what the bytes left could hold. */
  count(what: string, max: number, minElementSize: number): number {
    const n = this.u32(`${what}.count`);
    if (n > max) throw malformed(`${what} has ${n} entries, more than ${max}`);
    if (n * minElementSize > this.remaining) throw malformed(`${what} has ${n} entries but only ${this.remaining} bytes follow`);
    return n;
  }

  rest(): Buffer {
    return this.bytes(this.remaining, 'rest');
  }

  done(what: string): void {
    if (this.pos !== this.end) throw malformed(`${this.end - this.pos} trailing bytes after ${what}`);
  }
}

export class Writer {
  private chunks: Buffer[] = [];
  private length = 0;

  private push(b: Buffer): this {
    this.chunks.push(b);
    this.length += b.length;
    return this;
  }

  u8(v: number): this {
    const b = Buffer.alloc(1);
    b.writeUInt8(v);
    return this.push(b);
  }

  u16(v: number): this {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    return this.push(b);
  }

  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    return this.push(b);
  }

  i32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32BE(v);
    return this.push(b);
  }

  u64(v: bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v);
    return this.push(b);
  }

  bytes(b: Buffer): this {
    return this.push(Buffer.from(b));
  }

  tpm2b(b: Buffer = Buffer.alloc(0)): this {
    if (b.length > 0xffff) throw new ShieldError('invalid_argument', `A TPM2B cannot hold ${b.length} bytes.`);
    return this.u16(b.length).bytes(b);
  }

  /** A TPM2B wrapping a structure written by `fill`. */
  sized(fill: (w: Writer) => void): this {
    const inner = new Writer();
    fill(inner);
    return this.tpm2b(inner.finish());
  }

  get size(): number {
    return this.length;
  }

  finish(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

/** Marshals one structure to bytes. */
export function marshal(fill: (w: Writer) => void): Buffer {
  const w = new Writer();
  fill(w);
  return w.finish();
}

/** Unmarshals one structure that must span `buf` exactly. */
export function unmarshal<T>(buf: Buffer, what: string, parse: (r: Reader) => T): T {
  const r = new Reader(buf);
  const value = parse(r);
  r.done(what);
  return value;
}
