// QEMU (qemu-img, qemu-io) and libvhdi (vhdiinfo, and pyvhdi for differencing chains) as
// independent VHDX oracles: images made and written by qemu, qemu's own raw conversion of them,
// libvhdi's reading of a chain, and what each tool reports about them.
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

/** Debian's python3-libvhdi, used through the system interpreter (a PATH python may lack it). */
export const SYSTEM_PYTHON = '/usr/bin/python3';

/** null → pyvhdi is importable by /usr/bin/python3; same CI rule as qemuMissing(). */
export function pyvhdiMissing(): string | null {
  if (spawnSync(SYSTEM_PYTHON, ['-c', 'import pyvhdi']).status === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but ${SYSTEM_PYTHON} cannot import pyvhdi: .ci/run must install python3-libvhdi`);
  return `needs pyvhdi for ${SYSTEM_PYTHON} (Debian: python3-libvhdi)`;
}

const PYVHDI_READ = `
import json, sys, pyvhdi
out, ranges, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
files = []
for p in paths:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for i in range(len(files) - 2, -1, -1):
    files[i].set_parent(files[i + 1])
disk = files[0]
size = disk.get_media_size()
with open(out, 'wb') as o:
    for off, n in (ranges or [[0, size]]):
        done = 0
        while done < n:
            k = min(1 << 22, n - done)
            o.write(disk.read_buffer_at_offset(k, off + done))
            done += k
print(json.dumps({'diskType': disk.get_disk_type(), 'mediaSize': size, 'bytesPerSector': disk.get_bytes_per_sector(),
  'identifier': disk.get_identifier(), 'parentIdentifier': disk.get_parent_identifier(), 'parentFilename': disk.get_parent_filename()}))
`;

export interface PyvhdiResult {
  /** pyvhdi.disk_types: 2 fixed, 3 dynamic, 4 differential. */
  diskType: number;
  mediaSize: number;
  bytesPerSector: number;
  identifier: string;
  parentIdentifier: string | null;
  parentFilename: string | null;
  /** The bytes read: the ranges asked for, one after another (the whole disk by default). */
  bytes: Buffer;
}

/**
 * libvhdi reads a chain: `chain[0]` is the disk, each next file the previous one's parent, joined
 * with set_parent (libvhdi does not search for parents itself). Writes the bytes to `out`.
 */
export function pyvhdiRead(chain: string[], out: string, ranges: [number, number][] = []): PyvhdiResult {
  const info = JSON.parse(run(SYSTEM_PYTHON, ['-c', PYVHDI_READ, out, JSON.stringify(ranges), ...chain])) as Omit<PyvhdiResult, 'bytes'>;
  return { ...info, bytes: readFileSync(out) };
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

export function vhdiinfo(path: string): { diskType: string; mediaSize: number; bytesPerSector: number; identifier: string; formatVersion: number; parentIdentifier: string | null; parentFilename: string | null } {
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
    parentIdentifier: /^\s*Parent identifier\s*:/m.test(out) ? field('Parent identifier').toLowerCase() : null,
    parentFilename: /^\s*Parent filename\s*:/m.test(out) ? field('Parent filename') : null,
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
