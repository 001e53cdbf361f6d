// Inline I/O (OpenOptions.inlineIo): small payload reads and writes done synchronously on the event
// loop while they are fast, i.e. served by the page cache. Handing a 4 KiB pread to libuv's thread
// pool costs several times the copy itself (a futex wake-up there and an eventfd back, and on a
// busy machine a context switch each way), and an NBD client's random I/O is made of those. Two
// in a row that take longer than 1 ms (cache misses, writeback throttling) send every I/O back to
// the thread pool for a second, so a cold disk never stalls the event loop for more than two I/Os
// now and then. (core/nbd/raw-disk.ts backs off after one; on a busy machine a lone slow one is
// usually the thread being preempted, which the thread pool would not have avoided.)
import { readSync, writeSync } from 'node:fs';

const INLINE_MAX = 64 * 1024;
const SLOW_NS = 1_000_000n;
const BACKOFF_MS = 1000;

export class InlineIo {
  /** Inline I/O is off until then (ms since the epoch), after a slow one. */
  private resumeAt = 0;
  private slowInARow = 0;

  /** Whether an I/O of `length` bytes should be done inline now. */
  use(length: number): boolean {
    if (length > INLINE_MAX) return false;
    if (this.resumeAt !== 0 && Date.now() < this.resumeAt) return false;
    this.resumeAt = 0;
    return true;
  }

  /** Reads `length` bytes into buf[at…] from `position`; returns how many (fewer only at the end of the file). */
  read(fd: number, buf: Buffer, at: number, length: number, position: number): number {
    return this.timed(() => {
      let done = 0;
      while (done < length) {
        const n = readSync(fd, buf, at + done, length - done, position + done);
        if (n === 0) break;
        done += n;
      }
      return done;
    });
  }

  write(fd: number, buf: Buffer, position: number): void {
    this.timed(() => {
      for (let done = 0; done < buf.length; ) done += writeSync(fd, buf, done, buf.length - done, position + done);
    });
  }

  private timed<T>(fn: () => T): T {
    const t0 = process.hrtime.bigint();
    try {
      return fn();
    } finally {
      if (process.hrtime.bigint() - t0 <= SLOW_NS) this.slowInARow = 0;
      else if (++this.slowInARow >= 2) {
        this.resumeAt = Date.now() + BACKOFF_MS;
        this.slowInARow = 0;
      }
    }
  }
}
