// An NBD server on a Unix socket (fixed newstyle handshake, simple and structured replies,
// base:allocation). One disk, served under one export name (and the default empty name, as
// qemu-nbd does); any number of connections share it.
//
// Input is parsed incrementally: socket chunks are queued, headers sliced (copied only when one
// spans two chunks), WRITE payloads handed to the disk as a slice of the chunk when they fit in
// one. Requests run concurrently up to `maxInFlight` (and a byte budget); beyond that, or when the
// client does not read its replies, the socket is paused, so memory stays bounded whatever the
// client sends. Replies go out in any order, each kept whole; those finished in the same
// event-loop turn leave together in one write (READ data is read straight into a buffer that
// already holds room for the reply header, so large reads are never copied).
//
// Anything malformed (bad magic, unknown client flags, oversized options or writes, truncated
// input) closes that connection with a logged reason; the server and other connections carry on.
import { createServer, type Server, type Socket } from 'node:net';
import { ShieldError } from '../errors.ts';
import type { NbdDisk, NbdExtent } from './disk.ts';
import { bindSocket } from './listen.ts';
import {
  BASE_ALLOCATION,
  CHUNK_HEADER_SIZE,
  CLIENT_FLAG,
  CMD,
  CMD_FLAG,
  ERRNO,
  EXTENDED_REQUEST_MAGIC,
  HS_FLAG,
  IHAVEOPT,
  INFO,
  NBDMAGIC,
  OPT,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STATE,
  STRUCTURED_REPLY_MAGIC,
  TX_FLAG,
  commandName,
  optionName,
} from './protocol.ts';

const MiB = 1024 * 1024;
/** Strings in the protocol MUST be ≤ 4096 bytes. */
const MAX_STRING = 4096;
const META_CONTEXT_ID = 1;
const MAX_EXTENTS = 1024;
/** Replies queued together up to this size are copied into one buffer; bigger batches use writev. */
const COALESCE_BYTES = 64 * 1024;
/** Request errors logged per connection (a client sending garbage requests must not flood the log). */
const MAX_ERROR_LOGS = 100;
/** After our end of a connection, how long the client has to close its own. */
const CLOSE_GRACE_MS = 5000;

export type NbdEvent =
  | { event: 'listening'; socketPath: string }
  | { event: 'connect'; conn: number }
  /** Connections refused (too many, or shutting down); logged at most once a second, `count` since the last. */
  | { event: 'refused'; conn: number; reason: string; count: number }
  | { event: 'ready'; conn: number; exportName: string; via: 'go' | 'export_name'; structured: boolean; blockStatus: boolean; flags: number }
  | { event: 'protocol_error'; conn: number; reason: string }
  | { event: 'request_error'; conn: number; command: string; offset: number; length: number; errno: number; code: string; message: string }
  /** A connection's request errors beyond the first 100 are counted in stats, not logged. */
  | { event: 'log_suppressed'; conn: number; what: 'request_error' }
  | { event: 'disconnect'; conn: number; reason: string; requests: number }
  | { event: 'server_error'; message: string }
  | { event: 'closed'; stats: NbdStats };

export interface NbdServerOptions {
  disk: NbdDisk;
  /** A socket path to create (its folder must be ours, 0700/0755-like). Default: `disk.sock` in a new private folder. */
  socketPath?: string;
  /** Where the private folder is made when no socketPath is given (default os.tmpdir()). */
  dir?: string;
  /** The export's name; the default (empty) name is accepted too. Default ''. */
  exportName?: string;
  description?: string;
  log: (event: NbdEvent) => void;
  /** Largest READ/WRITE payload (advertised as the maximum block size). Default 32 MiB. */
  maxPayload?: number;
  /** Requests processed at once per connection. Default 64. */
  maxInFlight?: number;
  /**
   * Bytes of READ/WRITE payload in flight per connection before input is paused (a quarter of it
   * for replies waiting to be sent to a slow reader). Default 64 MiB.
   */
  maxInFlightBytes?: number;
  /** Connections at once; more are refused (closed at once). Default 32. */
  maxConnections?: number;
  /** Time a client has to finish the handshake. Default 30 s. */
  handshakeTimeoutMs?: number;
  /** Options a client may send in one handshake. Default 64. */
  maxOptions?: number;
  /** Longest option payload. Default 64 KiB. */
  maxOptionLength?: number;
  /** Advertise CAN_MULTI_CONN (safe: one disk object serves every connection). Default true. */
  multiConn?: boolean;
  /** Send zero ranges of READs as OFFSET_HOLE chunks, asking disk.blockStatus first. Default true when the disk has blockStatus. */
  holeReads?: boolean;
}

export interface NbdStats {
  connectionsTotal: number;
  connectionsActive: number;
  connectionsRefused: number;
  protocolErrors: number;
  requests: number;
  requestErrors: number;
  bytesRead: number;
  bytesWritten: number;
}

export interface NbdServer {
  readonly socketPath: string;
  /** Open connections. */
  readonly connections: number;
  stats(): NbdStats;
  /** Stops accepting, lets requests in flight finish, closes every connection, removes the socket. */
  close(): Promise<void>;
}

/** ShieldError codes (and raw system errors) as NBD errors, with the short text a client may see. */
export function nbdErrno(err: unknown): { errno: number; text: string } {
  const code = err instanceof ShieldError ? err.code : String((err as { code?: unknown } | null)?.code ?? '');
  switch (code) {
    case 'invalid_argument':
    case 'EINVAL':
      return { errno: ERRNO.EINVAL, text: 'invalid argument' };
    case 'disk_full':
    case 'ENOSPC':
      return { errno: ERRNO.ENOSPC, text: 'no space left' };
    case 'forbidden':
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return { errno: ERRNO.EPERM, text: 'not permitted' };
    default:
      return { errno: ERRNO.EIO, text: 'I/O error' };
  }
}

class RequestError extends Error {
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.errno = errno;
  }
}

interface Settings {
  disk: NbdDisk;
  size: number;
  minBlock: number;
  readOnly: boolean;
  exportName: string;
  description: string;
  log: (event: NbdEvent) => void;
  maxPayload: number;
  maxInFlight: number;
  maxInFlightBytes: number;
  maxQueuedReplyBytes: number;
  handshakeTimeoutMs: number;
  maxOptions: number;
  maxOptionLength: number;
  multiConn: boolean;
  holeReads: boolean;
  stats: NbdStats;
}

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n >= 1 && (n & (n - 1)) === 0;
}

const KNOWN_COMMANDS = new Set<number>(Object.values(CMD));

type Phase = 'flags' | 'option' | 'optionData' | 'request' | 'payload' | 'done';

interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
  data: Buffer | null;
  /** Set when the request was refused at parse time (after its payload, if any, was consumed). */
  refuse: RequestError | null;
}

class Connection {
  readonly id: number;
  private readonly socket: Socket;
  private readonly s: Settings;
  private readonly onGone: (c: Connection) => void;

  // ---- input queue
  private chunks: Buffer[] = [];
  private buffered = 0;
  private readonly scratch = Buffer.allocUnsafe(REQUEST_SIZE);

  // ---- state
  private phase: Phase = 'flags';
  private noZeroes = false;
  private optionCount = 0;
  private option = 0;
  private optionLength = 0;
  private structured = false;
  private metaContext = false;
  private txFlags = 0;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private current: Request | null = null;

  private inFlight = 0;
  private inFlightBytes = 0;
  private readonly pendingWrites = new Set<Promise<unknown>>();
  private pausedForBackpressure = false;
  private inputEnded = false;
  private stopping = false;
  private gone = false;
  private requests = 0;
  private closeReason = '';
  private idleWaiters: (() => void)[] = [];
  private outQueue: Buffer[] = [];
  private outBytes = 0;
  private flushScheduled = false;
  private errorsLogged = 0;

  constructor(id: number, socket: Socket, s: Settings, onGone: (c: Connection) => void) {
    this.id = id;
    this.socket = socket;
    this.s = s;
    this.onGone = onGone;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => this.onEnd());
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (!this.closeReason) this.closeReason = `socket error (${err.code ?? err.message})`;
    });
    socket.on('close', () => this.onClose());
    socket.on('drain', () => this.maybeResume());
    this.handshakeTimer = setTimeout(() => this.fail(`handshake not finished within ${s.handshakeTimeoutMs} ms`), s.handshakeTimeoutMs);
    this.handshakeTimer.unref?.();
    const hello = Buffer.allocUnsafe(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(HS_FLAG.FIXED_NEWSTYLE | HS_FLAG.NO_ZEROES, 16);
    socket.write(hello);
  }

  get inTransmission(): boolean {
    return this.phase === 'request' || this.phase === 'payload';
  }

  // ---- input -------------------------------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.phase === 'done' || this.gone) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.pump();
  }

  /** `n` contiguous bytes from the queue (a slice when they sit in one chunk). */
  private take(n: number, into?: Buffer): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n && !into) {
      this.buffered -= n;
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = into ?? Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return into ? out.subarray(0, n) : out;
  }

  private pump(): void {
    try {
      for (;;) {
        if (this.gone || this.stopping) return;
        switch (this.phase) {
          case 'flags': {
            if (this.buffered < 4) return;
            const flags = this.take(4).readUInt32BE(0);
            if ((flags & ~(CLIENT_FLAG.FIXED_NEWSTYLE | CLIENT_FLAG.NO_ZEROES)) !== 0) return this.fail(`unknown client flags 0x${flags.toString(16)}`);
            this.noZeroes = (flags & CLIENT_FLAG.NO_ZEROES) !== 0;
            this.phase = 'option';
            break;
          }
          case 'option': {
            if (this.buffered < OPTION_HEADER_SIZE) return;
            const h = this.take(OPTION_HEADER_SIZE, this.scratch);
            if (h.readBigUInt64BE(0) !== IHAVEOPT) return this.fail(`bad option magic 0x${h.readBigUInt64BE(0).toString(16)}`);
            this.option = h.readUInt32BE(8);
            this.optionLength = h.readUInt32BE(12);
            if (++this.optionCount > this.s.maxOptions) return this.fail(`more than ${this.s.maxOptions} options`);
            if (this.optionLength > this.s.maxOptionLength) return this.fail(`${optionName(this.option)} of ${this.optionLength} bytes (limit ${this.s.maxOptionLength})`);
            this.phase = 'optionData';
            break;
          }
          case 'optionData': {
            if (this.buffered < this.optionLength) return;
            const data = this.optionLength === 0 ? Buffer.alloc(0) : Buffer.from(this.take(this.optionLength));
            this.phase = 'option';
            this.handleOption(this.option, data);
            break;
          }
          case 'request': {
            if (this.blocked()) {
              this.pauseInput();
              return;
            }
            if (this.buffered < REQUEST_SIZE) return this.endIfDrained();
            const h = this.take(REQUEST_SIZE, this.scratch);
            this.parseRequest(h);
            break;
          }
          case 'payload': {
            const req = this.current!;
            if (this.buffered < req.length) return this.endIfDrained();
            req.data = this.take(req.length);
            this.current = null;
            this.phase = 'request';
            this.dispatch(req);
            break;
          }
          case 'done':
            return;
        }
      }
    } catch (err) {
      this.fail(`internal error while parsing: ${(err as Error).message}`);
    }
  }

  /**
   * No new request is taken while too many run, or while replies wait to leave (queued here or
   * in the socket): a client that does not read its replies stops being read.
   */
  private blocked(): boolean {
    return (
      this.inFlight >= this.s.maxInFlight ||
      this.inFlightBytes >= this.s.maxInFlightBytes ||
      this.outBytes + this.socket.writableLength >= this.s.maxQueuedReplyBytes
    );
  }

  private pauseInput(): void {
    if (!this.pausedForBackpressure) {
      this.pausedForBackpressure = true;
      this.socket.pause();
    }
  }

  private maybeResume(): void {
    if (this.gone || this.stopping || this.phase === 'done') return;
    if (this.blocked()) return;
    if (this.pausedForBackpressure) {
      this.pausedForBackpressure = false;
      this.socket.resume();
    }
    if (this.buffered > 0) this.pump();
  }

  private onEnd(): void {
    this.inputEnded = true;
    if (this.phase === 'done') return;
    if (this.inTransmission) return this.pump(); // requests still queued are run first
    const truncated = this.buffered > 0 || this.phase === 'optionData';
    if (truncated) {
      this.s.stats.protocolErrors++;
      this.s.log({ event: 'protocol_error', conn: this.id, reason: 'client closed in the middle of the handshake (truncated input)' });
    }
    this.closeReason ||= truncated ? 'truncated handshake' : 'client closed during the handshake';
    this.destroy();
  }

  /** In transmission, input has run out: once the client has closed its side, finish up. */
  private endIfDrained(): void {
    if (!this.inputEnded || this.phase === 'done') return;
    if (this.buffered > 0 || this.phase === 'payload') {
      this.s.stats.protocolErrors++;
      this.closeReason ||= `client closed with a truncated ${this.phase === 'payload' ? 'write payload' : 'request'}`;
      this.s.log({ event: 'protocol_error', conn: this.id, reason: this.closeReason });
    } else {
      this.closeReason ||= 'client closed the connection';
    }
    this.phase = 'done';
    void this.finish();
  }

  // ---- handshake ---------------------------------------------------------------------------------

  private optionReply(option: number, type: number, data?: Buffer | string): void {
    const payload = typeof data === 'string' ? Buffer.from(data) : data;
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(option >>> 0, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(payload ? payload.length : 0, 16);
    this.socket.write(payload && payload.length > 0 ? Buffer.concat([h, payload]) : h);
  }

  private nameMatches(name: string): boolean {
    return name === '' || name === this.s.exportName;
  }

  private handleOption(option: number, data: Buffer): void {
    switch (option) {
      case OPT.EXPORT_NAME: {
        const name = data.toString('utf8');
        if (data.length > MAX_STRING || !this.nameMatches(name)) return this.fail(`EXPORT_NAME for unknown export "${name.slice(0, 64)}"`);
        const flags = this.transmissionFlags();
        const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
        reply.writeBigUInt64BE(BigInt(this.s.size), 0);
        reply.writeUInt16BE(flags, 8);
        this.socket.write(reply);
        return this.enterTransmission('export_name', flags);
      }
      case OPT.ABORT:
        this.optionReply(option, REP.ACK);
        this.closeReason = 'client aborted the handshake';
        this.phase = 'done';
        this.clearHandshakeTimer();
        this.socket.end();
        return;
      case OPT.LIST: {
        if (data.length !== 0) return this.optionReply(option, REP.ERR_INVALID, 'LIST takes no data');
        const name = Buffer.from(this.s.exportName);
        this.optionReply(option, REP.SERVER, Buffer.concat([u32(name.length), name, Buffer.from(this.s.description)]));
        return this.optionReply(option, REP.ACK);
      }
      case OPT.STARTTLS:
        return this.optionReply(option, REP.ERR_POLICY, 'TLS is not offered on this local socket');
      case OPT.INFO:
      case OPT.GO:
        return this.infoOrGo(option, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length !== 0) return this.optionReply(option, REP.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        this.structured = true;
        return this.optionReply(option, REP.ACK);
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContextOption(option, data);
      case OPT.EXTENDED_HEADERS:
        return this.optionReply(option, REP.ERR_UNSUP, 'extended headers are not supported');
      default:
        return this.optionReply(option, REP.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  private infoOrGo(option: number, data: Buffer): void {
    if (data.length < 6) return this.optionReply(option, REP.ERR_INVALID, 'truncated request');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_STRING || 4 + nameLength + 2 > data.length) return this.optionReply(option, REP.ERR_INVALID, 'bad name length');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (4 + nameLength + 2 + 2 * count !== data.length) return this.optionReply(option, REP.ERR_INVALID, 'bad information request count');
    if (!this.nameMatches(name)) return this.optionReply(option, REP.ERR_UNKNOWN, 'no such export');
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
    const flags = this.transmissionFlags();
    if (wanted.has(INFO.NAME)) {
      const n = Buffer.from(this.s.exportName);
      const b = Buffer.allocUnsafe(2 + n.length);
      b.writeUInt16BE(INFO.NAME, 0);
      n.copy(b, 2);
      this.optionReply(option, REP.INFO, b);
    }
    if (wanted.has(INFO.DESCRIPTION) && this.s.description !== '') {
      const d = Buffer.from(this.s.description);
      const b = Buffer.allocUnsafe(2 + d.length);
      b.writeUInt16BE(INFO.DESCRIPTION, 0);
      d.copy(b, 2);
      this.optionReply(option, REP.INFO, b);
    }
    const exp = Buffer.allocUnsafe(12);
    exp.writeUInt16BE(INFO.EXPORT, 0);
    exp.writeBigUInt64BE(BigInt(this.s.size), 2);
    exp.writeUInt16BE(flags, 10);
    this.optionReply(option, REP.INFO, exp);
    // Always sent: a client that ignores it still gets EINVAL for misaligned requests.
    const bs = Buffer.allocUnsafe(14);
    bs.writeUInt16BE(INFO.BLOCK_SIZE, 0);
    bs.writeUInt32BE(this.s.minBlock, 2);
    bs.writeUInt32BE(Math.max(4096, this.s.minBlock), 6);
    bs.writeUInt32BE(this.s.maxPayload, 10);
    this.optionReply(option, REP.INFO, bs);
    this.optionReply(option, REP.ACK);
    if (option === OPT.GO) this.enterTransmission('go', flags);
  }

  private metaContextOption(option: number, data: Buffer): void {
    if (!this.structured) return this.optionReply(option, REP.ERR_INVALID, 'structured replies must be negotiated first');
    if (data.length < 8) return this.optionReply(option, REP.ERR_INVALID, 'truncated request');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_STRING || 4 + nameLength + 4 > data.length) return this.optionReply(option, REP.ERR_INVALID, 'bad name length');
    const name = data.toString('utf8', 4, 4 + nameLength);
    let at = 4 + nameLength;
    const count = data.readUInt32BE(at);
    at += 4;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return this.optionReply(option, REP.ERR_INVALID, 'truncated query');
      const len = data.readUInt32BE(at);
      at += 4;
      if (len > MAX_STRING || at + len > data.length) return this.optionReply(option, REP.ERR_INVALID, 'bad query length');
      queries.push(data.toString('utf8', at, at + len));
      at += len;
    }
    if (at !== data.length) return this.optionReply(option, REP.ERR_INVALID, 'trailing data');
    if (!this.nameMatches(name)) return this.optionReply(option, REP.ERR_UNKNOWN, 'no such export');
    const context = (id: number) => {
      const n = Buffer.from(BASE_ALLOCATION);
      return Buffer.concat([u32(id), n]);
    };
    if (option === OPT.LIST_META_CONTEXT) {
      // No query lists everything; "base:" lists the whole base namespace; other namespaces are not ours.
      if (count === 0 || queries.some((q) => q === 'base:' || q === BASE_ALLOCATION)) this.optionReply(option, REP.META_CONTEXT, context(0));
      return this.optionReply(option, REP.ACK);
    }
    this.metaContext = queries.includes(BASE_ALLOCATION);
    if (this.metaContext) this.optionReply(option, REP.META_CONTEXT, context(META_CONTEXT_ID));
    return this.optionReply(option, REP.ACK);
  }

  private transmissionFlags(): number {
    const d = this.s.disk;
    let f = TX_FLAG.HAS_FLAGS;
    if (d.flush) f |= TX_FLAG.SEND_FLUSH | TX_FLAG.SEND_FUA;
    if (this.s.readOnly) f |= TX_FLAG.READ_ONLY;
    else {
      f |= TX_FLAG.SEND_WRITE_ZEROES | TX_FLAG.SEND_FAST_ZERO;
      if (d.trim) f |= TX_FLAG.SEND_TRIM;
    }
    if (this.structured) f |= TX_FLAG.SEND_DF;
    if (this.s.multiConn) f |= TX_FLAG.CAN_MULTI_CONN;
    return f;
  }

  private clearHandshakeTimer(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
  }

  private enterTransmission(via: 'go' | 'export_name', flags: number): void {
    this.clearHandshakeTimer();
    this.txFlags = flags;
    this.phase = 'request';
    this.s.log({ event: 'ready', conn: this.id, exportName: this.s.exportName, via, structured: this.structured, blockStatus: this.metaContext, flags });
  }

  // ---- transmission: parsing ---------------------------------------------------------------------

  private parseRequest(h: Buffer): void {
    const magic = h.readUInt32BE(0);
    if (magic !== REQUEST_MAGIC) {
      return this.fail(magic === EXTENDED_REQUEST_MAGIC ? 'extended request header, never negotiated' : `bad request magic 0x${magic.toString(16)}`);
    }
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const offHi = h.readUInt32BE(16);
    const offLo = h.readUInt32BE(20);
    const length = h.readUInt32BE(24);
    // Offsets past 2^53 are past any disk: keep them out of range without losing precision.
    const offset = offHi >= 0x200000 ? Number.MAX_SAFE_INTEGER : offHi * 0x100000000 + offLo;
    const req: Request = { flags, type, cookieHi: h.readUInt32BE(8), cookieLo: h.readUInt32BE(12), offset, length, data: null, refuse: null };
    this.requests++;
    this.s.stats.requests++;
    if (type === CMD.WRITE) {
      if (length > this.s.maxPayload) return this.fail(`WRITE of ${length} bytes (maximum payload ${this.s.maxPayload})`);
      req.refuse = this.validate(req);
      if (length > 0) {
        this.current = req;
        this.phase = 'payload';
        return;
      }
      req.data = Buffer.alloc(0);
    } else if (type === CMD.DISC) {
      this.closeReason = 'client disconnected (DISC)';
      this.phase = 'done';
      this.socket.pause();
      void this.finish();
      return;
    } else {
      req.refuse = this.validate(req);
    }
    this.dispatch(req);
  }

  /** Checks that need no I/O: known command and flags, advertised feature, bounds, alignment. */
  private validate(req: Request): RequestError | null {
    const { type, flags, offset, length } = req;
    const cmd = () => commandName(type);
    if (!KNOWN_COMMANDS.has(type)) return new RequestError(ERRNO.EINVAL, `unknown command ${type}`);
    const allowed =
      type === CMD.READ
        ? this.structured
          ? CMD_FLAG.DF
          : 0
        : type === CMD.WRITE || type === CMD.TRIM
          ? this.txFlags & TX_FLAG.SEND_FUA
            ? CMD_FLAG.FUA
            : 0
          : type === CMD.WRITE_ZEROES
            ? (this.txFlags & TX_FLAG.SEND_FUA ? CMD_FLAG.FUA : 0) | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO
            : type === CMD.BLOCK_STATUS
              ? CMD_FLAG.REQ_ONE
              : 0;
    if ((flags & ~allowed) !== 0) return new RequestError(ERRNO.EINVAL, `${cmd()} with flags 0x${flags.toString(16)}`);
    const tx = this.txFlags;
    const advertised =
      type === CMD.READ ||
      type === CMD.WRITE ||
      (type === CMD.FLUSH && (tx & TX_FLAG.SEND_FLUSH) !== 0) ||
      (type === CMD.TRIM && ((tx & TX_FLAG.SEND_TRIM) !== 0 || this.s.readOnly)) ||
      (type === CMD.WRITE_ZEROES && ((tx & TX_FLAG.SEND_WRITE_ZEROES) !== 0 || this.s.readOnly)) ||
      (type === CMD.BLOCK_STATUS && this.metaContext);
    if (!advertised) return new RequestError(ERRNO.EINVAL, `${cmd()} was not negotiated`);
    if (type === CMD.FLUSH) return offset === 0 && length === 0 ? null : new RequestError(ERRNO.EINVAL, 'FLUSH with an offset or length');
    if (this.s.readOnly && (type === CMD.WRITE || type === CMD.TRIM || type === CMD.WRITE_ZEROES)) return new RequestError(ERRNO.EPERM, `${cmd()} on a read-only export`);
    if ((type === CMD.READ || type === CMD.WRITE) && length > this.s.maxPayload) return new RequestError(ERRNO.EINVAL, `${cmd()} of ${length} bytes (maximum payload ${this.s.maxPayload})`);
    if (type === CMD.BLOCK_STATUS && length === 0) return new RequestError(ERRNO.EINVAL, 'BLOCK_STATUS of 0 bytes');
    if (offset > this.s.size || length > this.s.size - offset) {
      const errno = type === CMD.WRITE || type === CMD.WRITE_ZEROES ? ERRNO.ENOSPC : ERRNO.EINVAL;
      return new RequestError(errno, `${cmd()} of ${length} bytes at ${offset} is beyond the ${this.s.size}-byte disk`);
    }
    const m = this.s.minBlock;
    if (m > 1 && type !== CMD.BLOCK_STATUS && (offset % m !== 0 || length % m !== 0)) {
      return new RequestError(ERRNO.EINVAL, `${cmd()} of ${length} bytes at ${offset} is not aligned to ${m} bytes`);
    }
    return null;
  }

  // ---- transmission: running ---------------------------------------------------------------------

  private dispatch(req: Request): void {
    const cost = req.type === CMD.READ || req.type === CMD.WRITE ? req.length : 0;
    this.inFlight++;
    this.inFlightBytes += cost;
    // run() answers every outcome itself; a throw from there (a logger, say) only costs this connection.
    const p = this.run(req).catch((err: unknown) => this.fail(`internal error: ${err instanceof Error ? err.message : String(err)}`));
    const isWrite = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES || req.type === CMD.TRIM;
    if (isWrite) this.pendingWrites.add(p);
    void p.then(() => {
      if (isWrite) this.pendingWrites.delete(p);
      this.inFlight--;
      this.inFlightBytes -= cost;
      if (this.inFlight === 0 && this.idleWaiters.length > 0) for (const w of this.idleWaiters.splice(0)) w();
      if (this.pausedForBackpressure || this.buffered > 0) this.maybeResume();
    });
  }

  /** Never rejects: every outcome is a reply (or nothing, when the connection is gone). */
  private async run(req: Request): Promise<void> {
    try {
      if (req.refuse) throw req.refuse;
      const d = this.s.disk;
      switch (req.type) {
        case CMD.READ:
          if (req.length === 0) return this.replyReadEmpty(req);
          if (this.structured && this.s.holeReads && d.blockStatus) return await this.readSparse(req);
          return await this.read(req);
        case CMD.WRITE:
          if (req.length > 0) {
            if (!d.write) throw new RequestError(ERRNO.EPERM, 'the disk is not writable');
            await d.write(req.offset, req.data!, (req.flags & CMD_FLAG.FUA) !== 0);
            this.s.stats.bytesWritten += req.length;
          }
          req.data = null;
          return this.replySimple(req, 0);
        case CMD.FLUSH: {
          // Every write that completed before this FLUSH arrived is in pendingWrites or done.
          const before = [...this.pendingWrites];
          if (before.length > 0) await Promise.all(before);
          await d.flush!();
          return this.replySimple(req, 0);
        }
        case CMD.TRIM:
          if (req.length > 0) {
            await d.trim!(req.offset, req.length);
            if (req.flags & CMD_FLAG.FUA) await d.flush!();
          }
          return this.replySimple(req, 0);
        case CMD.WRITE_ZEROES:
          if (req.flags & CMD_FLAG.FAST_ZERO && !(d.canZeroFast?.(req.offset, req.length) ?? false)) {
            throw new RequestError(ERRNO.ENOTSUP, 'zeroing this range would not be fast');
          }
          if (req.length > 0) await this.writeZeroes(req);
          return this.replySimple(req, 0);
        case CMD.BLOCK_STATUS:
          return await this.blockStatus(req);
        default:
          throw new RequestError(ERRNO.EINVAL, `unknown command ${req.type}`);
      }
    } catch (err) {
      this.replyError(req, err);
    }
  }

  private async writeZeroes(req: Request): Promise<void> {
    const d = this.s.disk;
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    if (d.writeZeroes) return d.writeZeroes(req.offset, req.length, fua, { noHole: (req.flags & CMD_FLAG.NO_HOLE) !== 0 });
    const piece = Math.min(req.length, MiB);
    const zeros = Buffer.alloc(piece);
    for (let done = 0; done < req.length; done += piece) {
      await d.write!(req.offset + done, zeros.subarray(0, Math.min(piece, req.length - done)), false);
    }
    if (fua) await d.flush!();
  }

  private async read(req: Request): Promise<void> {
    const headerSize = this.structured ? CHUNK_HEADER_SIZE + 8 : SIMPLE_REPLY_SIZE;
    const buf = Buffer.allocUnsafe(headerSize + req.length);
    const into = buf.subarray(headerSize);
    const got = await this.s.disk.read(req.offset, req.length, into);
    this.s.stats.bytesRead += req.length;
    if (this.gone) return;
    if (got.length !== req.length) throw new ShieldError('io_error', `the disk returned ${got.length} bytes for a ${req.length}-byte read`);
    this.writeReadHeader(buf, req, req.offset, req.length, REPLY_FLAG_DONE);
    if (got.buffer === into.buffer && got.byteOffset === into.byteOffset) {
      this.send(buf);
    } else {
      this.send(buf.subarray(0, headerSize), got);
    }
  }

  /**
   * Queues one reply (all its parts, kept together: a reply is never split by another). Replies
   * finished in the same event-loop turn leave in one write when the socket is idle: small
   * replies are copied into one buffer, large ones go out with writev.
   */
  private send(...parts: Buffer[]): void {
    if (this.gone || this.socket.destroyed) return;
    for (const p of parts) {
      this.outQueue.push(p);
      this.outBytes += p.length;
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushOut);
    }
  }

  private readonly flushOut = (): void => {
    this.flushScheduled = false;
    const q = this.outQueue;
    const bytes = this.outBytes;
    this.outQueue = [];
    this.outBytes = 0;
    if (this.gone || this.socket.destroyed || q.length === 0) return;
    if (q.length === 1) this.socket.write(q[0]!);
    else if (bytes <= COALESCE_BYTES) this.socket.write(Buffer.concat(q, bytes));
    else {
      this.socket.cork();
      for (const b of q) this.socket.write(b);
      this.socket.uncork();
    }
    // Paused for queued replies that have now gone to the socket: go on if it took them all.
    if (this.pausedForBackpressure) this.maybeResume();
  };

  /** Header for a READ reply of `length` data bytes at `offset` (simple, or an OFFSET_DATA chunk). */
  private writeReadHeader(buf: Buffer, req: Request, offset: number, length: number, flags: number): void {
    if (this.structured) {
      buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
      buf.writeUInt16BE(flags, 4);
      buf.writeUInt16BE(REPLY_TYPE.OFFSET_DATA, 6);
      buf.writeUInt32BE(req.cookieHi, 8);
      buf.writeUInt32BE(req.cookieLo, 12);
      buf.writeUInt32BE(8 + length, 16);
      buf.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
      buf.writeUInt32BE(offset >>> 0, 24);
    } else {
      buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
      buf.writeUInt32BE(0, 4);
      buf.writeUInt32BE(req.cookieHi, 8);
      buf.writeUInt32BE(req.cookieLo, 12);
    }
  }

  private chunkHeader(req: Request, flags: number, type: number, length: number, extra = 0): Buffer {
    const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + extra);
    b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeUInt32BE(req.cookieHi, 8);
    b.writeUInt32BE(req.cookieLo, 12);
    b.writeUInt32BE(length, 16);
    return b;
  }

  private holeChunk(req: Request, offset: number, length: number, flags: number): Buffer {
    const b = this.chunkHeader(req, flags, REPLY_TYPE.OFFSET_HOLE, 12, 12);
    b.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
    b.writeUInt32BE(offset >>> 0, 24);
    b.writeUInt32BE(length, 28);
    return b;
  }

  /** Zero ranges (by disk.blockStatus) go out as OFFSET_HOLE chunks, the rest as data; DF keeps one chunk. */
  private async readSparse(req: Request): Promise<void> {
    const extents = this.clip(req.length, await this.s.disk.blockStatus!(req.offset, req.length), Infinity, (e) => e.zero);
    if (extents.every((e) => !e.zero)) return this.read(req);
    if (extents.length === 1) {
      this.s.stats.bytesRead += req.length;
      this.send(this.holeChunk(req, req.offset, req.length, REPLY_FLAG_DONE));
      return;
    }
    if (req.flags & CMD_FLAG.DF) return this.read(req);
    const parts: Buffer[] = [];
    let at = req.offset;
    for (const e of extents) {
      if (e.zero) parts.push(this.holeChunk(req, at, e.length, 0));
      else {
        const buf = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + 8 + e.length);
        const into = buf.subarray(CHUNK_HEADER_SIZE + 8);
        const got = await this.s.disk.read(at, e.length, into);
        if (got !== into) got.copy(into);
        this.writeReadHeader(buf, req, at, e.length, 0);
        parts.push(buf);
      }
      at += e.length;
    }
    this.s.stats.bytesRead += req.length;
    if (this.gone) return;
    const last = parts[parts.length - 1]!;
    last.writeUInt16BE(REPLY_FLAG_DONE, 4);
    this.send(...parts);
  }

  /**
   * The disk's extents cut to [offset, offset+length), runs with equal flags merged, at most
   * `max` of them; at least one. `key` says which flags matter for merging.
   */
  private clip(length: number, extents: NbdExtent[], max: number, key: (e: NbdExtent) => unknown = (e) => (e.hole ? 1 : 0) | (e.zero ? 2 : 0)): NbdExtent[] {
    const out: NbdExtent[] = [];
    let covered = 0;
    for (const e of extents) {
      if (covered >= length) break;
      if (!Number.isSafeInteger(e.length) || e.length <= 0) throw new ShieldError('internal', `the disk reported an extent of ${e.length} bytes`);
      const n = Math.min(e.length, length - covered);
      const prev = out[out.length - 1];
      if (prev && key(prev) === key(e)) prev.length += n;
      else {
        if (out.length >= max) break;
        out.push({ length: n, hole: e.hole, zero: e.zero });
      }
      covered += n;
    }
    if (out.length === 0) throw new ShieldError('internal', 'the disk reported no extents');
    // Anything not covered is data as far as reads go (blockStatus may answer for less).
    if (covered < length && max === Infinity) {
      const prev = out[out.length - 1]!;
      if (!prev.zero && !prev.hole) prev.length += length - covered;
      else out.push({ length: length - covered, hole: false, zero: false });
    }
    return out;
  }

  private async blockStatus(req: Request): Promise<void> {
    const d = this.s.disk;
    const raw = d.blockStatus ? await d.blockStatus(req.offset, req.length) : [{ length: req.length, hole: false, zero: false }];
    const extents = this.clip(req.length, raw, req.flags & CMD_FLAG.REQ_ONE ? 1 : MAX_EXTENTS);
    if (this.gone) return;
    const b = this.chunkHeader(req, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, 4 + 8 * extents.length, 4 + 8 * extents.length);
    b.writeUInt32BE(META_CONTEXT_ID, 20);
    let at = 24;
    for (const e of extents) {
      b.writeUInt32BE(e.length, at);
      b.writeUInt32BE((e.hole ? STATE.HOLE : 0) | (e.zero ? STATE.ZERO : 0), at + 4);
      at += 8;
    }
    this.send(b);
  }

  private replyReadEmpty(req: Request): void {
    if (this.gone) return;
    if (!this.structured) return this.replySimple(req, 0);
    // A zero-length read: one empty NONE chunk ends the reply.
    this.send(this.chunkHeader(req, REPLY_FLAG_DONE, REPLY_TYPE.NONE, 0));
  }

  private replySimple(req: Request, errno: number): void {
    if (this.gone) return;
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    b.writeUInt32BE(errno, 4);
    b.writeUInt32BE(req.cookieHi, 8);
    b.writeUInt32BE(req.cookieLo, 12);
    this.send(b);
  }

  private replyError(req: Request, err: unknown): void {
    const { errno, text } = err instanceof RequestError ? { errno: err.errno, text: err.message.slice(0, 200) } : nbdErrno(err);
    this.s.stats.requestErrors++;
    const se = err instanceof RequestError ? null : err instanceof ShieldError ? err : null;
    if (++this.errorsLogged === MAX_ERROR_LOGS + 1) this.s.log({ event: 'log_suppressed', conn: this.id, what: 'request_error' });
    if (this.errorsLogged <= MAX_ERROR_LOGS) this.s.log({
      event: 'request_error',
      conn: this.id,
      command: commandName(req.type),
      offset: req.offset,
      length: req.length,
      errno,
      code: se ? se.code : err instanceof RequestError ? 'refused' : 'internal',
      message: err instanceof Error ? err.message : String(err),
    });
    if (this.gone) return;
    // A simple reply with an error carries no data, READ included.
    if (!this.structured) return this.replySimple(req, errno);
    const msg = Buffer.from(text);
    const b = this.chunkHeader(req, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, 6 + msg.length, 6 + msg.length);
    b.writeUInt32BE(errno, 20);
    b.writeUInt16BE(msg.length, 24);
    msg.copy(b, 26);
    this.send(b);
  }

  // ---- ending ------------------------------------------------------------------------------------

  private waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** Requests in flight are answered, then the connection is closed. */
  private async finish(): Promise<void> {
    this.clearHandshakeTimer();
    await this.waitIdle();
    if (this.outQueue.length > 0) this.flushOut();
    if (this.socket.destroyed) return;
    this.socket.end();
    // Read on (anything after the end is dropped by onData) so the client's own end is seen and the
    // socket closes at once: input paused by DISC or backpressure would hold it until the grace below.
    this.socket.resume();
    // A client that never closes its side (or never reads the last replies) is cut after a while.
    setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS).unref();
  }

  /** Server shutdown: handshakes are cut, transmissions stop reading and end after their requests. */
  shutdown(): void {
    if (this.gone) return;
    if (!this.inTransmission) {
      this.closeReason ||= 'server shutting down';
      this.destroy();
      return;
    }
    this.closeReason ||= 'server shutting down';
    this.stopping = true;
    this.phase = 'done';
    this.socket.pause();
    void this.finish();
  }

  destroy(): void {
    this.clearHandshakeTimer();
    this.phase = 'done';
    this.socket.destroy();
  }

  /** A protocol violation: logged, and the connection is dropped at once. */
  private fail(reason: string): void {
    if (this.phase === 'done' && this.gone) return;
    this.s.stats.protocolErrors++;
    this.closeReason = `protocol error: ${reason}`;
    this.s.log({ event: 'protocol_error', conn: this.id, reason });
    this.chunks = [];
    this.buffered = 0;
    this.destroy();
  }

  private onClose(): void {
    if (this.gone) return;
    this.gone = true;
    this.clearHandshakeTimer();
    this.phase = 'done';
    this.chunks = [];
    this.buffered = 0;
    this.s.log({ event: 'disconnect', conn: this.id, reason: this.closeReason || 'connection closed', requests: this.requests });
    for (const w of this.idleWaiters.splice(0)) w();
    this.onGone(this);
  }
}

export async function startNbdServer(opts: NbdServerOptions): Promise<NbdServer> {
  const disk = opts.disk;
  const minBlock = disk.minBlock ?? 1;
  if (!isPowerOfTwo(minBlock) || minBlock > 65536) throw new ShieldError('invalid_argument', `The disk's minimum block size ${minBlock} is not a power of two up to 65536.`);
  if (!Number.isSafeInteger(disk.size) || disk.size < 0) throw new ShieldError('invalid_argument', `The disk size ${disk.size} is not valid.`);
  if (disk.size % minBlock !== 0) throw new ShieldError('invalid_argument', `The disk size ${disk.size} is not a multiple of its ${minBlock}-byte block size.`);
  const maxPayload = opts.maxPayload ?? 32 * MiB;
  if (!Number.isInteger(maxPayload) || maxPayload < Math.max(minBlock, 4096) || maxPayload > 0xffffffff || maxPayload % minBlock !== 0) {
    throw new ShieldError('invalid_argument', `maxPayload ${maxPayload} must be a multiple of the block size, 4096 bytes or more.`);
  }
  const exportName = opts.exportName ?? '';
  const description = opts.description ?? '';
  if (Buffer.byteLength(exportName) > MAX_STRING || Buffer.byteLength(description) > MAX_STRING) {
    throw new ShieldError('invalid_argument', 'The export name and description must be at most 4096 bytes.');
  }
  const stats: NbdStats = { connectionsTotal: 0, connectionsActive: 0, connectionsRefused: 0, protocolErrors: 0, requests: 0, requestErrors: 0, bytesRead: 0, bytesWritten: 0 };
  const log = (e: NbdEvent) => {
    try {
      opts.log(e);
    } catch {
      // A failing logger must not take the server down.
    }
  };
  const settings: Settings = {
    disk,
    size: disk.size,
    minBlock,
    readOnly: disk.readOnly === true || typeof disk.write !== 'function',
    exportName,
    description,
    log,
    maxPayload,
    maxInFlight: Math.max(1, opts.maxInFlight ?? 64),
    maxInFlightBytes: Math.max(1, opts.maxInFlightBytes ?? 64 * MiB),
    maxQueuedReplyBytes: Math.max(1, opts.maxInFlightBytes ?? 64 * MiB) / 4,
    handshakeTimeoutMs: opts.handshakeTimeoutMs ?? 30_000,
    maxOptions: opts.maxOptions ?? 64,
    maxOptionLength: opts.maxOptionLength ?? 64 * 1024,
    multiConn: opts.multiConn ?? true,
    holeReads: opts.holeReads ?? true,
    stats,
  };
  const maxConnections = opts.maxConnections ?? 32;
  const connections = new Set<Connection>();
  let nextId = 1;
  let closing = false;
  let lastRefusedLog = 0;
  let refusedSinceLog = 0;

  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => {
    const id = nextId++;
    if (closing || connections.size >= maxConnections) {
      stats.connectionsRefused++;
      refusedSinceLog++;
      const now = Date.now();
      if (now - lastRefusedLog >= 1000) {
        log({ event: 'refused', conn: id, reason: closing ? 'server shutting down' : `more than ${maxConnections} connections`, count: refusedSinceLog });
        lastRefusedLog = now;
        refusedSinceLog = 0;
      }
      socket.destroy();
      return;
    }
    stats.connectionsTotal++;
    stats.connectionsActive++;
    log({ event: 'connect', conn: id });
    const conn = new Connection(id, socket, settings, (c) => {
      connections.delete(c);
      stats.connectionsActive--;
      if (connections.size === 0) for (const w of idleWaiters.splice(0)) w();
    });
    connections.add(conn);
  });
  // Listen errors are handled in bindSocket; later ones (EMFILE on accept) are transient: logged.
  server.on('error', (err: NodeJS.ErrnoException) => {
    if (server.listening) log({ event: 'server_error', message: `${err.code ?? ''} ${err.message}`.trim() });
  });
  const idleWaiters: (() => void)[] = [];

  const bound = await bindSocket(server, { socketPath: opts.socketPath, dir: opts.dir });
  log({ event: 'listening', socketPath: bound.socketPath });

  let closed: Promise<void> | null = null;
  return {
    socketPath: bound.socketPath,
    get connections() {
      return connections.size;
    },
    stats: () => ({ ...stats }),
    close(): Promise<void> {
      closed ??= (async () => {
        closing = true;
        const serverClosed = new Promise<void>((r) => server.close(() => r()));
        for (const c of connections) c.shutdown();
        if (connections.size > 0) {
          const allGone = new Promise<void>((r) => idleWaiters.push(r));
          const timer = setTimeout(() => {
            for (const c of connections) c.destroy();
          }, 10_000);
          await allGone;
          clearTimeout(timer);
        }
        await serverClosed;
        await bound.cleanup();
        log({ event: 'closed', stats: { ...stats } });
      })();
      return closed;
    },
  };
}
