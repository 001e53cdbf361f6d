// What the NBD server serves: any object with this shape. The server never imports a disk format;
// the VHDX engine (or a raw file, below in raw-disk.ts) comes in through this interface.

/** One run of the disk with the same allocation state, as base:allocation reports it. */
export interface NbdExtent {
  length: number;
  /** Not allocated in the backing store (NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads as zeros (NBD_STATE_ZERO). */
  zero: boolean;
}

/**
 * A disk served over NBD. Offsets and lengths are bytes, always inside [0, size) and multiples of
 * `minBlock` (the server checks before calling). Every method may throw a ShieldError; its code
 * becomes the NBD error (invalid_argument → EINVAL, io_error → EIO, disk_full → ENOSPC,
 * forbidden → EPERM, anything else → EIO) and its message stays in the server log.
 *
 * One object serves every connection: flush() must make durable every write that completed
 * before it was called, whichever connection sent it (that is what makes CAN_MULTI_CONN safe).
 */
export interface NbdDisk {
  readonly size: number;
  readonly readOnly?: boolean;
  /** Smallest I/O unit, a power of two 1 … 65536: the logical sector size (512 or 4096). Default 1. */
  readonly minBlock?: number;
  /** Reads `length` bytes. With `into` (exactly `length` bytes) it should read into it and return it. */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /** With `fua` the data is durable when the promise resolves. */
  write?(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Makes every completed write durable. */
  flush?(): Promise<void>;
  /** A hint that the range is unused; afterwards it reads as anything (zeros or the old data). */
  trim?(offset: number, length: number): Promise<void>;
  /** The range reads as zeros afterwards. `noHole`: keep it allocated (NBD_CMD_FLAG_NO_HOLE). */
  writeZeroes?(offset: number, length: number, fua: boolean, opts?: { noHole: boolean }): Promise<void>;
  /**
   * Whether writeZeroes on this range is fast (no data written: e.g. whole blocks turned into
   * ZERO blocks). Without it, NBD_CMD_FLAG_FAST_ZERO requests fail with ENOTSUP at once.
   */
  canZeroFast?(offset: number, length: number): boolean;
  /**
   * Allocation from `offset` on: consecutive extents, the first starting at `offset`. They may
   * cover less than `length` (at least one extent) or more (the server clips). Without it, the
   * whole disk is reported as data. Cheap answers are expected: the server may call it before a
   * read to send holes and zeros as OFFSET_HOLE chunks instead of data.
   */
  blockStatus?(offset: number, length: number): Promise<NbdExtent[]>;
}
