// QEMU (qemu-img, qemu-io) and libvhdi (vhdiinfo) as independent VHDX oracles: images made and
// written by qemu, qemu's own raw conversion of them, and what each tool reports about them.
// Skips only when the tools are absent and CI is not set; under CI=true they must exist.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export const MiB = 1024 * 1024;

function has(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** null → the caller should skip (tools missing outside CI). */
export function qemuMissing(): string | null {
  const missing = ['qemu-img', 'qemu-io'].filter((c) => !has(c));
  if (missing.length === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but ${missing.join(', ')} missing: .ci/run must install them`);
  return `needs ${missing.join(', ')} (Debian: qemu-utils)`;
}

/** null → vhdiinfo is there; same CI rule as qemuMissing(). */
export function vhdiMissing(): string | null {
  if (has('vhdiinfo')) return null;
  if (process.env.CI) throw new Error('CI=true but vhdiinfo missing: .ci/run must install libvhdi-utils');
  return 'needs vhdiinfo (Debian: libvhdi-utils)';
}

function run(tool: string, args: string[]): string {
  try {
    return execFileSync(tool, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * MiB });
  } catch (err) {
    const e = err as { status?: number | null; signal?: string | null; stdout?: string; stderr?: string; message: string };
    const how = e.signal ? `signal ${e.signal}` : `exit ${e.status}`;
    throw new Error(`${tool} ${args.map((a) => (/\s/.test(a) ? `'${a}'` : a)).join(' ')} failed (${how}):\n${e.stderr || ''}${e.stdout || ''}`.trimEnd(), { cause: err });
  }
}

export function qemuImg(args: string[]): string {
  return run('qemu-img', args);
}

/**
 * qemu-io exits 0 even when a command fails (it prints "write failed: …"), so its output is
 * checked for failures too.
 */
export function qemuIo(args: string[]): string {
  const out = run('qemu-io', args);
  if (/ failed: |^can't open|Could not open/im.test(out)) throw new Error(`qemu-io ${args.join(' ')} reported a failure:\n${out}`);
  return out;
}

export function vhdiinfo(path: string): { diskType: string; mediaSize: number; bytesPerSector: number; identifier: string; formatVersion: number } {
  const out = run('vhdiinfo', [path]);
  const field = (name: string): string => {
    const m = new RegExp(`^\\s*${name}\\s*:\\s*(.+)$`, 'm').exec(out);
    if (!m) throw new Error(`vhdiinfo output has no "${name}":\n${out}`);
    return m[1]!.trim();
  };
  const media = /\((\d+) bytes\)/.exec(field('Media size'));
  if (!media) throw new Error(`vhdiinfo media size unparsed:\n${out}`);
  return {
    diskType: field('Disk type').toLowerCase(),
    mediaSize: Number(media[1]),
    bytesPerSector: Number(/^(\d+)/.exec(field('Bytes per sector'))![1]),
    identifier: field('Identifier').toLowerCase(),
    formatVersion: Number(field('Format version')),
  };
}

export interface QemuInfo {
  'virtual-size': number;
  'cluster-size'?: number;
  format: string;
  'actual-size'?: number;
  'dirty-flag'?: boolean;
  'format-specific'?: unknown;
}

export function qemuInfo(path: string): QemuInfo {
  return JSON.parse(qemuImg(['info', '-f', 'vhdx', '--output=json', path])) as QemuInfo;
}

export function qemuVersion(): string {
  const m = /qemu-img version (\d+\.\d+\.\d+)/.exec(qemuImg(['--version']));
  if (!m) throw new Error('qemu-img --version unparsed');
  return m[1]!;
}

export interface Extent {
  offset: number;
  length: number;
}

export interface ImageSpec {
  type: 'dynamic' | 'fixed';
  /** Virtual size in bytes; qemu rounds it up to 512. */
  size: number;
  /** Bytes, a power of two 1 MiB … 256 MiB; qemu picks 8 MiB+ by size when omitted. */
  blockSize?: number;
  /** Bytes, a multiple of 1 MiB (qemu default 1 MiB). */
  logSize?: number;
  /** qemu's non-standard default (on): unwritten blocks are ZERO; off → NOT_PRESENT (dynamic) or FULLY_PRESENT with offsets (fixed). */
  blockStateZero?: boolean;
  /** `write -P byte offset length`, in order. */
  writes?: (Extent & { byte: number })[];
  /** `write -z offset length` (qemu's vhdx driver writes real zeros: the block gets allocated). */
  zeroWrites?: Extent[];
  /** `discard offset length` (qemu's vhdx driver ignores it; the data stays). */
  discards?: Extent[];
}

export interface Image {
  path: string;
  /** qemu's own raw conversion of the image (`qemu-img convert -f vhdx -O raw`). */
  raw: string;
  spec: ImageSpec;
}

let counter = 0;

/** Creates an image with qemu-img, writes it with one qemu-io run, converts it to raw with qemu-img. */
export function makeImage(dir: string, spec: ImageSpec, name = `img${++counter}`): Image {
  const path = join(dir, `${name}.vhdx`);
  const raw = join(dir, `${name}.raw`);
  const opts = [`subformat=${spec.type}`];
  if (spec.blockSize !== undefined) opts.push(`block_size=${spec.blockSize}`);
  if (spec.logSize !== undefined) opts.push(`log_size=${spec.logSize}`);
  if (spec.blockStateZero !== undefined) opts.push(`block_state_zero=${spec.blockStateZero ? 'on' : 'off'}`);
  qemuImg(['create', '-q', '-f', 'vhdx', '-o', opts.join(','), path, String(spec.size)]);
  const cmds: string[] = [];
  for (const w of spec.writes ?? []) cmds.push('-c', `write -P 0x${w.byte.toString(16)} ${w.offset} ${w.length}`);
  for (const z of spec.zeroWrites ?? []) cmds.push('-c', `write -z ${z.offset} ${z.length}`);
  for (const d of spec.discards ?? []) cmds.push('-c', `discard ${d.offset} ${d.length}`);
  // One qemu-io run: every rw open rewrites the headers (new FileWriteGuid, sequence number).
  if (cmds.length > 0) qemuIo(['-f', 'vhdx', ...cmds, path]);
  qemuImg(['convert', '-f', 'vhdx', '-O', 'raw', path, raw]);
  return { path, raw, spec };
}

/** The bytes qemu reads from the image, via its raw conversion. */
export function rawBytes(img: Image): Buffer {
  return readFileSync(img.raw);
}
