// Real NBD clients (qemu-img, qemu-io from qemu-utils; nbdinfo, nbdcopy from libnbd-bin) run
// asynchronously: the server under test lives in the test process, so a synchronous child would
// deadlock it. Plus a disk with an allocation map (holes and zero blocks, as a VHDX has them) and
// a recording proxy that captures what a real client sends (the fuzzer's seeds).
import { execFile, spawnSync } from 'node:child_process';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { ShieldError } from '../../core/errors.ts';
import type { NbdDisk, NbdExtent } from '../../core/nbd/mod.ts';

const TOOLS = ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy'];

function has(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** null → run; otherwise the reason to skip. Under CI=true missing tools are an error, never a skip. */
export function nbdToolsMissing(): string | null {
  const missing = TOOLS.filter((c) => !has(c));
  if (missing.length === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but ${missing.join(', ')} missing: .ci/run must install qemu-utils and libnbd-bin`);
  return `needs ${missing.join(', ')} (Debian: qemu-utils, libnbd-bin)`;
}

export function uriOf(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`;
}

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a tool without blocking the event loop; never throws for a non-zero exit. */
export function runTool(cmd: string, args: string[], timeoutMs = 30_000): Promise<ToolResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a tool that must succeed; returns stdout. */
export async function tool(cmd: string, args: string[], timeoutMs = 30_000): Promise<string> {
  const r = await runTool(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}):\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** qemu-io exits 0 when a command fails ("write failed: …"), so its output is checked too. */
export async function qemuIoNbd(uri: string, cmds: string[]): Promise<string> {
  const out = await tool('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]);
  if (/ failed: |^can't open|Could not open|Pattern verification failed/im.test(out)) throw new Error(`qemu-io ${cmds.join(' ; ')} reported a failure:\n${out}`);
  return out;
}

type BlockState = 'unallocated' | 'zero' | 'data';

/**
 * An in-memory disk with an allocation map, the way a dynamic VHDX behaves: blocks start
 * unallocated, writeZeroes on whole blocks makes ZERO blocks (fast: no data written; with
 * NO_HOLE the block stays allocated instead), discard gives whole blocks back, partial pieces
 * keep or write bytes. Unallocated and ZERO blocks have no storage: both are holes that read as
 * zeros.
 */
export class MapDisk implements NbdDisk {
  readonly size: number;
  readonly minBlock: number;
  readonly blockSize: number;
  readonly bytes: Buffer;
  readonly states: BlockState[];
  flushes = 0;

  constructor(size: number, blockSize = 64 * 1024, minBlock = 512) {
    this.size = size;
    this.blockSize = blockSize;
    this.minBlock = minBlock;
    this.bytes = Buffer.alloc(size);
    this.states = new Array<BlockState>(Math.ceil(size / blockSize)).fill('unallocated');
  }

  private blocks(offset: number, length: number): { block: number; whole: boolean; start: number; end: number }[] {
    const out = [];
    for (let at = offset; at < offset + length; ) {
      const block = Math.floor(at / this.blockSize);
      const bStart = block * this.blockSize;
      const bEnd = Math.min(bStart + this.blockSize, this.size);
      const end = Math.min(bEnd, offset + length);
      out.push({ block, whole: at === bStart && end === bEnd, start: at, end });
      at = end;
    }
    return out;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const out = into ?? Buffer.allocUnsafe(length);
    this.bytes.copy(out, 0, offset, offset + length);
    return out;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    data.copy(this.bytes, offset);
    for (const b of this.blocks(offset, data.length)) this.states[b.block] = 'data';
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async writeZeroes(offset: number, length: number, _fua: boolean, opts?: { noHole: boolean }): Promise<void> {
    this.bytes.fill(0, offset, offset + length);
    for (const b of this.blocks(offset, length)) {
      if (b.whole) this.states[b.block] = opts?.noHole ? 'data' : 'zero';
    }
  }

  async trim(offset: number, length: number): Promise<void> {
    for (const b of this.blocks(offset, length)) {
      if (!b.whole) continue;
      this.states[b.block] = 'unallocated';
      this.bytes.fill(0, b.start, b.end);
    }
  }

  canZeroFast(offset: number, length: number): boolean {
    return this.blocks(offset, length).every((b) => b.whole);
  }

  async blockStatus(offset: number, length: number): Promise<NbdExtent[]> {
    if (offset + length > this.size) throw new ShieldError('invalid_argument', 'beyond the end');
    return this.blocks(offset, length).map((b) => {
      const s = this.states[b.block]!;
      return { length: b.end - b.start, hole: s !== 'data', zero: s !== 'data' };
    });
  }
}

export interface RecordingProxy {
  path: string;
  /** Client → server bytes of each connection, in order. */
  sessions: Buffer[][];
  close(): Promise<void>;
}

/** A Unix-socket proxy in front of `target` that records what clients send. */
export function recordingProxy(target: string, path: string): Promise<RecordingProxy> {
  const sessions: Buffer[][] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const record: Buffer[] = [];
    sessions.push(record);
    const upstream = connect(target);
    sockets.add(client).add(upstream);
    client.on('data', (d: Buffer) => {
      record.push(Buffer.from(d));
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => client.write(d));
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
    for (const s of [client, upstream]) {
      s.on('error', () => undefined);
      s.on('close', () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () =>
      resolve({
        path,
        sessions,
        close: () =>
          new Promise<void>((r) => {
            for (const s of sockets) s.destroy();
            server.close(() => r());
          }),
      }),
    );
  });
}
