// A raw file as an NbdDisk, for tests and benchmarks (and as the simplest possible backend).
// Reads and writes are positional (pread/pwrite in libuv's thread pool); flush is fdatasync;
// write-zeroes and trim write zero bytes (Node has no fallocate/punch-hole). Every range reports
// as data: without lseek(SEEK_DATA) there is no cheap way to find a raw file's holes.
//
// `inlineIo`: small reads and writes (≤ 64 KiB) are done synchronously on the event loop while
// they are fast, i.e. served by the page cache: handing a 4 KiB pread to a pool thread costs
// several times the copy itself (a futex wake-up there and an eventfd back). One that takes longer
// than 1 ms (a cache miss, writeback throttling) sends every I/O back to the thread pool for a
// second, so a cold disk never stalls the server for more than one I/O now and then.
import { close, fdatasync, fstat, open, read, readSync, write, writeSync } from 'node:fs';
import { ShieldError } from '../errors.ts';
import type { NbdDisk } from './disk.ts';

const ZERO_CHUNK = 1024 * 1024;
const INLINE_MAX = 64 * 1024;
const INLINE_SLOW_NS = 1_000_000n;
const INLINE_BACKOFF_MS = 1000;
let zeros: Buffer | null = null;

function fsError(err: NodeJS.ErrnoException, what: string): ShieldError {
  if (err.code === 'ENOSPC' || err.code === 'EDQUOT') return new ShieldError('disk_full', `The disk is full (${what}).`, { cause: err });
  if (err.code === 'EROFS' || err.code === 'EPERM' || err.code === 'EACCES') return new ShieldError('forbidden', `${what}: not permitted (${err.code}).`, { cause: err });
  return new ShieldError('io_error', `${what} failed (${err.code ?? 'error'}).`, { cause: err });
}

export interface RawFileDiskOptions {
  readOnly?: boolean;
  /** Logical sector size advertised to clients (power of two, 1 … 65536). Default 512. */
  minBlock?: number;
  /** Small I/O synchronously while the page cache answers it (see above). Default false. */
  inlineIo?: boolean;
}

export class RawFileDisk implements NbdDisk {
  readonly size: number;
  readonly readOnly: boolean;
  readonly minBlock: number;
  private fd: number;
  private readonly inlineIo: boolean;
  /** Inline I/O is off until then (ms since the epoch), after a slow one. */
  private inlineResumeAt = 0;

  private constructor(fd: number, size: number, readOnly: boolean, minBlock: number, inlineIo: boolean) {
    this.fd = fd;
    this.size = size;
    this.readOnly = readOnly;
    this.minBlock = minBlock;
    this.inlineIo = inlineIo;
  }

  private inline(length: number): boolean {
    return this.inlineIo && length <= INLINE_MAX && (this.inlineResumeAt === 0 || Date.now() >= this.inlineResumeAt);
  }

  /** Times a synchronous I/O; a slow one turns inline I/O off for a while. */
  private timed<T>(fn: () => T): T {
    const t0 = process.hrtime.bigint();
    try {
      return fn();
    } finally {
      if (process.hrtime.bigint() - t0 > INLINE_SLOW_NS) this.inlineResumeAt = Date.now() + INLINE_BACKOFF_MS;
      else this.inlineResumeAt = 0;
    }
  }

  static async open(path: string, opts: RawFileDiskOptions = {}): Promise<RawFileDisk> {
    const minBlock = opts.minBlock ?? 512;
    if (!Number.isInteger(minBlock) || minBlock < 1 || minBlock > 65536 || (minBlock & (minBlock - 1)) !== 0) {
      throw new ShieldError('invalid_argument', `minBlock must be a power of two from 1 to 65536, not ${minBlock}.`);
    }
    const readOnly = opts.readOnly ?? false;
    const fd = await new Promise<number>((resolve, reject) =>
      open(path, readOnly ? 'r' : 'r+', (err, fd) => (err ? reject(err.code === 'ENOENT' ? new ShieldError('not_found', `File not found: ${path}`, { cause: err }) : fsError(err, `Opening ${path}`)) : resolve(fd))),
    );
    try {
      const st = await new Promise<{ size: number; isFile: boolean }>((resolve, reject) =>
        fstat(fd, (err, s) => (err ? reject(fsError(err, `Reading ${path}`)) : resolve({ size: s.size, isFile: s.isFile() }))),
      );
      if (!st.isFile) throw new ShieldError('invalid_argument', `${path} is not a regular file.`);
      if (st.size % minBlock !== 0) throw new ShieldError('invalid_argument', `${path} is ${st.size} bytes, not a multiple of the ${minBlock}-byte block size.`);
      return new RawFileDisk(fd, st.size, readOnly, minBlock, opts.inlineIo ?? false);
    } catch (err) {
      await new Promise<void>((resolve) => close(fd, () => resolve()));
      throw err;
    }
  }

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = into && into.length === length ? into : Buffer.allocUnsafe(length);
    if (this.inline(length)) {
      try {
        this.timed(() => {
          for (let done = 0; done < length; ) {
            const n = readSync(this.fd, buf, done, length - done, offset + done);
            if (n === 0) {
              buf.fill(0, done);
              break;
            }
            done += n;
          }
        });
        return Promise.resolve(buf);
      } catch (err) {
        return Promise.reject(fsError(err as NodeJS.ErrnoException, 'Reading the disk'));
      }
    }
    return new Promise((resolve, reject) => {
      let done = 0;
      const step = (): void => {
        read(this.fd, buf, done, length - done, offset + done, (err, n) => {
          if (err) return reject(fsError(err, 'Reading the disk'));
          if (n === 0) {
            buf.fill(0, done); // beyond the end of a file that shrank: zeros
            return resolve(buf);
          }
          done += n;
          if (done < length) step();
          else resolve(buf);
        });
      };
      if (length === 0) resolve(buf);
      else step();
    });
  }

  private writeAt(offset: number, data: Buffer): Promise<void> {
    if (this.inline(data.length)) {
      try {
        this.timed(() => {
          for (let done = 0; done < data.length; ) done += writeSync(this.fd, data, done, data.length - done, offset + done);
        });
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(fsError(err as NodeJS.ErrnoException, 'Writing the disk'));
      }
    }
    return new Promise((resolve, reject) => {
      let done = 0;
      const step = (): void => {
        write(this.fd, data, done, data.length - done, offset + done, (err, n) => {
          if (err) return reject(fsError(err, 'Writing the disk'));
          done += n;
          if (done < data.length) step();
          else resolve();
        });
      };
      if (data.length === 0) resolve();
      else step();
    });
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    if (this.readOnly) throw new ShieldError('forbidden', 'The disk is read-only.');
    await this.writeAt(offset, data);
    if (fua) await this.flush();
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => fdatasync(this.fd, (err) => (err ? reject(fsError(err, 'Flushing the disk')) : resolve())));
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.readOnly) throw new ShieldError('forbidden', 'The disk is read-only.');
    zeros ??= Buffer.alloc(ZERO_CHUNK);
    for (let done = 0; done < length; done += ZERO_CHUNK) {
      await this.writeAt(offset + done, zeros.subarray(0, Math.min(ZERO_CHUNK, length - done)));
    }
    if (fua) await this.flush();
  }

  /** Zeros too: the simplest correct discard when the space cannot be given back. */
  trim(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length, false);
  }

  close(): Promise<void> {
    const fd = this.fd;
    this.fd = -1;
    return new Promise((resolve) => (fd < 0 ? resolve() : close(fd, () => resolve())));
  }
}
