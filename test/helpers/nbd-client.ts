// A small, deliberately literal NBD client for tests: it speaks the protocol byte by byte so
// tests can check what the server sends (chunk types, flags, errors) and send what no real client
// would (bad magic, oversized options, unknown commands). Real clients (qemu-img, qemu-io,
// nbdinfo, nbdcopy) are used for everything else; see test/helpers/nbd.ts.
import { connect, type Socket } from 'node:net';

export const NBD = {
  NBDMAGIC: 0x4e42444d41474943n,
  IHAVEOPT: 0x49484156454f5054n,
  REP_MAGIC: 0x0003e889045565a9n,
  REQUEST_MAGIC: 0x25609513,
  SIMPLE_MAGIC: 0x67446698,
  STRUCTURED_MAGIC: 0x668e33ef,
  OPT: { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11 },
  REP: { ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006 },
  CMD: { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 },
  FLAG: { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 },
  TX: { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, SEND_DF: 128, CAN_MULTI_CONN: 256, SEND_FAST_ZERO: 2048 },
  CHUNK: { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 32769 },
  ERR: { EPERM: 1, EIO: 5, EINVAL: 22, ENOSPC: 28, ENOTSUP: 95 },
} as const;

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

export interface ReplyResult {
  cookie: bigint;
  /** 0 on success. */
  error: number;
  /** READ data assembled from OFFSET_DATA / OFFSET_HOLE chunks (or the simple reply's data). */
  data: Buffer;
  chunks: Chunk[];
  simple: boolean;
  /** From an ERROR chunk. */
  message: string;
}

export interface Negotiated {
  size: number;
  flags: number;
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
  contextId: number | null;
}

export class RawNbdClient {
  readonly socket: Socket;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | null = null;
  private ended = false;
  readonly closed: Promise<void>;
  private nextCookie = 1n;
  structured = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.waiter?.();
    });
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.ended = true;
        this.waiter?.();
        resolve();
      }),
    );
    socket.on('end', () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawNbdClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }

  send(b: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  /** Exactly n bytes; rejects when the server closes first (or after timeoutMs). One reader at a time. */
  async readExact(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buffered}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buffered})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          resolve();
        };
      });
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Resolves true when the server closes within timeoutMs. */
  async waitClosed(timeoutMs = 3000): Promise<boolean> {
    if (this.ended) return true;
    return Promise.race([this.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), timeoutMs))]);
  }

  close(): void {
    this.socket.destroy();
  }

  /** Half-closes: no more requests from us (FIN); replies can still come. */
  end(): void {
    this.socket.end();
  }

  // ---- handshake ---------------------------------------------------------------------------------

  async greeting(): Promise<number> {
    const g = await this.readExact(18);
    if (g.readBigUInt64BE(0) !== NBD.NBDMAGIC || g.readBigUInt64BE(8) !== NBD.IHAVEOPT) throw new Error('bad greeting');
    return g.readUInt16BE(16);
  }

  sendClientFlags(flags = 3): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags);
    this.send(b);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.send(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<OptionReply> {
    const h = await this.readExact(20);
    if (h.readBigUInt64BE(0) !== NBD.REP_MAGIC) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len > 0 ? await this.readExact(len) : Buffer.alloc(0) };
  }

  /** Replies up to and including the final one (ACK or an error). */
  async optionReplies(): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === NBD.REP.ACK || r.type >= 0x80000000) return out;
    }
  }

  static metaContextData(exportName: string, queries: string[]): Buffer {
    const parts = [u32(Buffer.byteLength(exportName)), Buffer.from(exportName), u32(queries.length)];
    for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
    return Buffer.concat(parts);
  }

  static infoData(exportName: string, infos: number[]): Buffer {
    const b = Buffer.alloc(4 + Buffer.byteLength(exportName) + 2 + 2 * infos.length);
    b.writeUInt32BE(Buffer.byteLength(exportName), 0);
    b.write(exportName, 4);
    let at = 4 + Buffer.byteLength(exportName);
    b.writeUInt16BE(infos.length, at);
    for (const i of infos) b.writeUInt16BE(i, (at += 2));
    return b;
  }

  /** Fixed newstyle, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO with BLOCK_SIZE, as QEMU does. */
  async handshake(opts: { structured?: boolean; meta?: boolean; exportName?: string } = {}): Promise<Negotiated> {
    const structured = opts.structured ?? true;
    const meta = opts.meta ?? structured;
    const name = opts.exportName ?? '';
    await this.greeting();
    this.sendClientFlags(3);
    if (structured) {
      this.sendOption(NBD.OPT.STRUCTURED_REPLY);
      const r = await this.optionReply();
      if (r.type !== NBD.REP.ACK) throw new Error(`STRUCTURED_REPLY: ${r.type}`);
      this.structured = true;
    }
    let contextId: number | null = null;
    if (meta) {
      this.sendOption(NBD.OPT.SET_META_CONTEXT, RawNbdClient.metaContextData(name, ['base:allocation']));
      for (const r of await this.optionReplies()) if (r.type === NBD.REP.META_CONTEXT) contextId = r.data.readUInt32BE(0);
    }
    this.sendOption(NBD.OPT.GO, RawNbdClient.infoData(name, [3]));
    const n: Negotiated = { size: -1, flags: 0, minBlock: 1, preferredBlock: 4096, maxBlock: 32 << 20, contextId };
    for (const r of await this.optionReplies()) {
      if (r.type >= 0x80000000) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.type !== NBD.REP.INFO) continue;
      const t = r.data.readUInt16BE(0);
      if (t === 0) {
        n.size = Number(r.data.readBigUInt64BE(2));
        n.flags = r.data.readUInt16BE(10);
      } else if (t === 3) {
        n.minBlock = r.data.readUInt32BE(2);
        n.preferredBlock = r.data.readUInt32BE(6);
        n.maxBlock = r.data.readUInt32BE(10);
      }
    }
    return n;
  }

  // ---- transmission ------------------------------------------------------------------------------

  /** Sends one request; returns its cookie. */
  request(type: number, r: { flags?: number; offset?: number; length?: number; data?: Buffer; cookie?: bigint; magic?: number } = {}): bigint {
    const cookie = r.cookie ?? this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(r.magic ?? NBD.REQUEST_MAGIC, 0);
    h.writeUInt16BE(r.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(r.offset ?? 0), 16);
    h.writeUInt32BE(r.length ?? r.data?.length ?? 0, 24);
    this.send(r.data ? Buffer.concat([h, r.data]) : h);
    return cookie;
  }

  /** One whole reply (a simple reply, or structured chunks up to DONE). `readLength` for simple READ replies. */
  async reply(readLength = 0): Promise<ReplyResult> {
    const magic = (await this.readExact(4)).readUInt32BE(0);
    if (magic === NBD.SIMPLE_MAGIC) {
      const h = await this.readExact(12);
      const error = h.readUInt32BE(0);
      const data = error === 0 && readLength > 0 ? await this.readExact(readLength) : Buffer.alloc(0);
      return { cookie: h.readBigUInt64BE(4), error, data, chunks: [], simple: true, message: '' };
    }
    if (magic !== NBD.STRUCTURED_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const chunks: Chunk[] = [];
    let first = true;
    for (;;) {
      if (!first && (await this.readExact(4)).readUInt32BE(0) !== NBD.STRUCTURED_MAGIC) throw new Error('bad chunk magic');
      first = false;
      const h = await this.readExact(16);
      const len = h.readUInt32BE(12);
      const chunk = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), payload: len > 0 ? await this.readExact(len) : Buffer.alloc(0) };
      chunks.push(chunk);
      if (chunk.flags & 1) break;
    }
    let error = 0;
    let message = '';
    const pieces: { offset: number; data: Buffer }[] = [];
    for (const c of chunks) {
      if (c.type === NBD.CHUNK.ERROR) {
        error = c.payload.readUInt32BE(0);
        message = c.payload.toString('utf8', 6, 6 + c.payload.readUInt16BE(4));
      } else if (c.type === NBD.CHUNK.OFFSET_DATA) pieces.push({ offset: Number(c.payload.readBigUInt64BE(0)), data: c.payload.subarray(8) });
      else if (c.type === NBD.CHUNK.OFFSET_HOLE) pieces.push({ offset: Number(c.payload.readBigUInt64BE(0)), data: Buffer.alloc(c.payload.readUInt32BE(8)) });
    }
    pieces.sort((a, b) => a.offset - b.offset);
    return { cookie: chunks[0]!.cookie, error, data: Buffer.concat(pieces.map((p) => p.data)), chunks, simple: false, message };
  }

  async read(offset: number, length: number, flags = 0): Promise<ReplyResult> {
    this.request(NBD.CMD.READ, { offset, length, flags });
    return this.reply(length);
  }

  async write(offset: number, data: Buffer, flags = 0): Promise<ReplyResult> {
    this.request(NBD.CMD.WRITE, { offset, data, flags });
    return this.reply();
  }

  async blockStatus(offset: number, length: number, flags = 0): Promise<{ error: number; contextId: number; extents: { length: number; flags: number }[] }> {
    this.request(NBD.CMD.BLOCK_STATUS, { offset, length, flags });
    const r = await this.reply();
    const c = r.chunks.find((x) => x.type === NBD.CHUNK.BLOCK_STATUS);
    const extents: { length: number; flags: number }[] = [];
    if (c) for (let at = 4; at < c.payload.length; at += 8) extents.push({ length: c.payload.readUInt32BE(at), flags: c.payload.readUInt32BE(at + 4) });
    return { error: r.error, contextId: c ? c.payload.readUInt32BE(0) : -1, extents };
  }

  disconnect(): void {
    this.request(NBD.CMD.DISC);
  }
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}
