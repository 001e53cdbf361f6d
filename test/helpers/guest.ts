// A tiny real Linux guest for end-to-end tests: Debian's kernel (linux-image-amd64) booted by QEMU
// (TCG, no KVM needed) straight into a busybox initramfs built here, in Node, from the host's
// busybox-static and the few virtio modules the kernel has as modules. The guest's /init reads
// its virtio disk and its TPM and reports both as one JSON line on a virtio-serial port the test
// owns (org.shieldlab.test), then powers off. Skips only when the pieces are absent and CI is not
// set; under CI=true they must exist (.ci/run installs linux-image-amd64, busybox-static,
// qemu-system-x86, swtpm and, for the OVMF variant, ovmf).
//
// Modes, chosen on the kernel command line with `shieldlab.mode=<mode>` (guestAppend()):
//   report     (the default) as above.
//   acpi       the same report, then no power-off: the guest waits for the ACPI power button (what
//              QMP `system_powerdown` sends; busybox acpid on the button's evdev device, both
//              modules loaded only in this mode), prints SHIELDLAB-POWERDOWN, syncs, powers off.
//   bench-seq  a disk throughput probe: the whole /dev/vda read, then written (zeros), sequentially
//              in 1 MiB O_DIRECT blocks (the write ends with an fsync), each timed in the guest
//              with ash's $EPOCHREALTIME (µs); one GuestBenchReport line on the port, then power-off.
//              It overwrites the disk: give it a writable one (BootOptions.writable).
import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The virtio-serial port name the guest reports on. */
export const GUEST_CHANNEL = 'org.shieldlab.test';
/** Prefix of the copy of the report the guest also prints on its serial console. */
export const CONSOLE_PREFIX = 'SHIELDLAB-REPORT ';
export const QEMU_SYSTEM = 'qemu-system-x86_64';
export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';

/** Printed on the console by an `acpi`-mode guest when the power button reached it, before it powers off. */
export const POWERDOWN_MARKER = 'SHIELDLAB-POWERDOWN';
/** The guest's modes (kernel command line `shieldlab.mode=<mode>`); `report` when absent. */
export const GUEST_MODES = ['report', 'acpi', 'bench-seq'] as const;
export type GuestMode = (typeof GUEST_MODES)[number];

/** The kernel command line word that selects a mode (for BootOptions.append or `vm create --append`). */
export function guestAppend(mode: GuestMode): string {
  return `shieldlab.mode=${mode}`;
}

/** Modules the guest needs (with their dependencies, from modules.dep), unless built in. */
const WANTED_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_console'];
/** The ACPI power button as an input device (acpi mode only); skipped when the kernel has them neither as modules nor built in. */
const ACPI_MODULES = ['button', 'evdev'];

function has(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

function busyboxPath(): string | null {
  // Only a static busybox runs in an initramfs with no libc.
  for (const p of ['/bin/busybox', '/usr/bin/busybox']) if (existsSync(p) && !hasInterp(p)) return p;
  return null;
}

/** Whether an ELF64 file has a PT_INTERP program header (i.e. is dynamically linked). */
function hasInterp(path: string): boolean {
  const b = readFileSync(path);
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2) return true;
  const phoff = Number(b.readBigUInt64LE(32));
  const phentsize = b.readUInt16LE(54);
  const phnum = b.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) if (b.readUInt32LE(phoff + i * phentsize) === 3) return true;
  return false;
}

export interface HostKernel {
  version: string;
  /** /boot/vmlinuz-<version>. */
  kernel: string;
  /** /lib/modules/<version>. */
  modulesDir: string;
}

function versionCompare(a: string, b: string): number {
  const pa = a.split(/[.-]/).map((x) => (/^\d+$/.test(x) ? Number(x) : x));
  const pb = b.split(/[.-]/).map((x) => (/^\d+$/.test(x) ? Number(x) : x));
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? -1;
    const y = pb[i] ?? -1;
    if (x === y) continue;
    if (typeof x === 'number' && typeof y === 'number') return x - y;
    return String(x) < String(y) ? -1 : 1;
  }
  return 0;
}

/** The newest Debian kernel in /boot that has its modules installed, or null. */
export function hostKernel(): HostKernel | null {
  let names: string[];
  try {
    names = readdirSync('/boot');
  } catch {
    return null;
  }
  const versions = names
    .filter((n) => n.startsWith('vmlinuz-'))
    .map((n) => n.slice('vmlinuz-'.length))
    .filter((v) => existsSync(join('/lib/modules', v, 'modules.dep')))
    .sort(versionCompare);
  const version = versions.at(-1);
  if (version === undefined) return null;
  return { version, kernel: join('/boot', `vmlinuz-${version}`), modulesDir: join('/lib/modules', version) };
}

/** null → a guest can be built and booted; otherwise why the caller should skip. */
export function guestMissing(): string | null {
  const missing: string[] = [];
  if (hostKernel() === null) missing.push('a kernel in /boot with its modules (Debian: linux-image-amd64)');
  if (busyboxPath() === null) missing.push('a static busybox (Debian: busybox-static)');
  if (!has(QEMU_SYSTEM)) missing.push(`${QEMU_SYSTEM} (Debian: qemu-system-x86)`);
  if (missing.length === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but the test guest needs ${missing.join(', ')}: .ci/run must install them`);
  return `needs ${missing.join(', ')}`;
}

/** null → OVMF is there (for firmware: 'ovmf'); same CI rule. */
export function ovmfMissing(): string | null {
  if (existsSync(OVMF_CODE) && existsSync(OVMF_VARS)) return null;
  if (process.env.CI) throw new Error(`CI=true but ${OVMF_CODE} missing: .ci/run must install ovmf`);
  return 'needs OVMF (Debian: ovmf)';
}

// ---------------------------------------------------------------------------------------------
// The initramfs: a newc cpio archive written here (no cpio binary needed), uncompressed.

type CpioEntry =
  | { kind: 'dir'; path: string; mode?: number }
  | { kind: 'file'; path: string; data: Buffer; mode?: number }
  | { kind: 'symlink'; path: string; target: string }
  | { kind: 'chardev'; path: string; major: number; minor: number; mode?: number };

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** A newc ("070701") cpio archive, as the kernel unpacks it into the initramfs. */
export function newcCpio(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const push = (name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0], nlink = 1) => {
    const fields = [ino++, mode, 0, 0, nlink, 0, data.length, 0, 0, rdev[0], rdev[1], Buffer.byteLength(name) + 1, 0];
    const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'ascii');
    const nameBuf = Buffer.concat([Buffer.from(name), Buffer.alloc(1)]);
    parts.push(header, nameBuf, Buffer.alloc(pad4(header.length + nameBuf.length)), data, Buffer.alloc(pad4(data.length)));
  };
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, '');
    if (e.kind === 'dir') push(name, 0o040000 | (e.mode ?? 0o755), Buffer.alloc(0), [0, 0], 2);
    else if (e.kind === 'file') push(name, 0o100000 | (e.mode ?? 0o644), e.data);
    else if (e.kind === 'symlink') push(name, 0o120777, Buffer.from(e.target));
    else push(name, 0o020000 | (e.mode ?? 0o600), Buffer.alloc(0), [e.major, e.minor]);
  }
  push('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

/**
 * The guest's /init (busybox ash). Reads its mode from /proc/cmdline and loads the modules. In
 * `report` mode (the default) it reads the disk (the first sector's text and a SHA-256 of the whole
 * disk) and the TPM (sysfs: version, PCRs 0–23 of the SHA-256 and SHA-1 banks), writes one JSON
 * line to the org.shieldlab.test port, waits for the host's "ack" (so nothing is lost to the
 * power-off), copies the line to the console, and powers off. `acpi` mode starts acpid on the power
 * button first, reports the same way, then waits for the button instead of powering off. `bench-seq`
 * times a sequential read and write of the whole disk and reports that (GuestBenchReport) instead.
 * An unknown mode runs as `report` with `unknown-mode:<mode>` in errors.
 */
export const INIT_SCRIPT = `#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
log() { echo "shieldlab-init: $*"; }
errors=""
mode=report
for w in $(cat /proc/cmdline); do
  case "$w" in shieldlab.mode=*) mode="\${w#shieldlab.mode=}" ;; esac
done
case "$mode" in
  report|acpi|bench-seq) ;;
  *) errors="$errors unknown-mode:$(echo "$mode" | tr -cd 'A-Za-z0-9_.-')"; mode=report ;;
esac
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || errors="$errors insmod:$m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
# Sends $1 on the port, waits for the ack, copies it to the console.
send_report() {
  port=""
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "${GUEST_CHANNEL}" ] && port=/dev/\${p##*/}
  done
  if [ -n "$port" ]; then
    exec 3<>"$port"
    echo "$1" >&3
    read -t 10 ack <&3 || log "no ack on $port"
    exec 3>&-
  else
    log "no virtio port named ${GUEST_CHANNEL}"
  fi
  echo "${CONSOLE_PREFIX}$1"
}
if [ "$mode" = acpi ]; then
  # The power button: button.ko makes it an input device, evdev gives it /dev/input/eventN, busybox
  # acpid (which opens event0, event1, … at start) runs /etc/acpi/PWRF/00000080 on KEY_POWER; that
  # handler wakes this script through a FIFO. All set up before the report, so a power-down sent
  # once the report is in is never missed.
  [ -s /modules.acpi ] && for m in $(cat /modules.acpi); do
    insmod "/lib/modules/$m" || errors="$errors insmod:$m"
  done
  ev=""
  i=0
  while [ -z "$ev" ] && [ $i -lt 200 ]; do
    for e in /sys/class/input/event*; do
      [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] && [ -c /dev/input/\${e##*/} ] && ev=/dev/input/\${e##*/}
    done
    [ -n "$ev" ] || { sleep 0.05; i=$((i+1)); }
  done
  if [ -n "$ev" ]; then
    mkdir -p /etc/acpi/PWRF
    mkfifo /tmp/power-button
    printf '#!/bin/sh\\necho pressed >/tmp/power-button\\n' >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -d -c /etc/acpi -a /etc/acpid.conf -M /etc/acpi.map -p /tmp/acpid.pid &
    i=0
    while [ ! -s /tmp/acpid.pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    [ -s /tmp/acpid.pid ] || errors="$errors acpid-not-ready"
  else
    errors="$errors no-power-button"
  fi
fi
if [ "$mode" = bench-seq ]; then
  # Sequential read, then write, of the whole disk: 1 MiB O_DIRECT blocks (no guest page cache),
  # the write closed by an fsync (a flush down to the host). Timed with $EPOCHREALTIME (µs).
  us() { echo "\${1%.*}\${1#*.}"; }
  ms() { printf '%d.%03d' $(($1/1000)) $(($1%1000)); }
  bytes=0
  read_us=0
  write_us=0
  if [ -b /dev/vda ]; then
    mib=$(( $(cat /sys/block/vda/size) / 2048 ))
    bytes=$((mib * 1048576))
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t0=$EPOCHREALTIME
    dd if=/dev/vda of=/dev/null bs=1M count=$mib iflag=direct 2>/tmp/dd-read.log || errors="$errors read-failed"
    t1=$EPOCHREALTIME
    dd if=/dev/zero of=/dev/vda bs=1M count=$mib oflag=direct conv=notrunc,fsync 2>/tmp/dd-write.log || errors="$errors write-failed"
    t2=$EPOCHREALTIME
    read_us=$(( $(us $t1) - $(us $t0) ))
    write_us=$(( $(us $t2) - $(us $t1) ))
    grep -q "^$mib+0 records in" /tmp/dd-read.log || errors="$errors short-read"
    grep -q "^$mib+0 records out" /tmp/dd-write.log || errors="$errors short-write"
  else
    errors="$errors no-vda"
  fi
  uptime=$(cut -d' ' -f1 /proc/uptime)
  send_report "{\\"mode\\":\\"bench-seq\\",\\"bytes\\":$bytes,\\"readMs\\":$(ms $read_us),\\"writeMs\\":$(ms $write_us),\\"blockBytes\\":1048576,\\"direct\\":true,\\"kernel\\":\\"$(uname -r)\\",\\"uptime\\":$uptime,\\"errors\\":\\"$errors\\"}"
  sync
  poweroff -f
fi
marker=""
disk_sha=""
disk_size=0
if [ -b /dev/vda ]; then
  marker=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\\000' | tr -cd 'A-Za-z0-9_.:-')
  disk_sha=$(sha256sum /dev/vda | cut -d' ' -f1)
  disk_size=$(cat /sys/block/vda/size)
else
  errors="$errors no-vda"
fi
t=/sys/class/tpm/tpm0
tpm_present=false
tpm_major=null
[ -e /dev/tpm0 ] && tpm_present=true
[ -r $t/tpm_version_major ] && tpm_major=$(cat $t/tpm_version_major)
bank() {
  out=""
  if [ -d "$t/pcr-$1" ]; then
    for p in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23; do
      [ -r "$t/pcr-$1/$p" ] || continue
      v=$(cat "$t/pcr-$1/$p" 2>/dev/null | tr -cd '0-9A-Fa-f')
      out="$out\${out:+,}\\"$p\\":\\"$v\\""
    done
  fi
  echo "{$out}"
}
sha256=$(bank sha256)
sha1=$(bank sha1)
uptime=$(cut -d' ' -f1 /proc/uptime)
report="{\\"marker\\":\\"$marker\\",\\"disk\\":{\\"sha256\\":\\"$disk_sha\\",\\"sectors\\":$disk_size},\\"tpm\\":{\\"present\\":$tpm_present,\\"versionMajor\\":$tpm_major,\\"pcrs\\":{\\"sha256\\":$sha256,\\"sha1\\":$sha1}},\\"kernel\\":\\"$(uname -r)\\",\\"uptime\\":$uptime,\\"errors\\":\\"$errors\\"}"
send_report "$report"
if [ "$mode" = acpi ] && [ -n "$ev" ]; then
  read pressed </tmp/power-button
  echo "${POWERDOWN_MARKER}"
fi
sync
poweroff -f
`;

interface ModuleDep {
  path: string;
  deps: string[];
}

/**
 * The modules (paths relative to modulesDir) to load, dependencies first; built-ins skipped. A
 * wanted module the kernel has neither as a module nor built in throws, unless `optional` (then it
 * is left out); `exclude` drops modules already loaded by another list (paths as returned here).
 */
export function moduleClosure(modulesDir: string, wanted: string[] = WANTED_MODULES, opts: { optional?: boolean; exclude?: readonly string[] } = {}): string[] {
  const modName = (p: string) => p.replace(/^.*\//, '').replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
  const byName = new Map<string, ModuleDep>();
  for (const line of readFileSync(join(modulesDir, 'modules.dep'), 'utf8').split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line);
    if (!m) continue;
    byName.set(modName(m[1]!), { path: m[1]!, deps: m[2]!.split(/\s+/).filter(Boolean) });
  }
  const builtin = new Set(
    (existsSync(join(modulesDir, 'modules.builtin')) ? readFileSync(join(modulesDir, 'modules.builtin'), 'utf8') : '').split('\n').filter(Boolean).map(modName),
  );
  const order: string[] = [];
  const seen = new Set<string>((opts.exclude ?? []).map(modName));
  const visit = (name: string) => {
    if (seen.has(name)) return;
    seen.add(name);
    const dep = byName.get(name);
    if (!dep) {
      if (builtin.has(name)) return;
      throw new Error(`kernel module ${name} is neither in ${modulesDir}/modules.dep nor built in`);
    }
    for (const d of dep.deps) visit(modName(d));
    order.push(dep.path);
  };
  for (const w of wanted) {
    if (!opts.optional) {
      visit(w.replace(/-/g, '_'));
      continue;
    }
    // Optional: all or nothing per wanted module (a dependency missing drops it, not the build).
    const mark = order.length;
    const seenBefore = new Set(seen);
    try {
      visit(w.replace(/-/g, '_'));
    } catch {
      order.length = mark;
      seen.clear();
      for (const x of seenBefore) seen.add(x);
    }
  }
  return order;
}

/** A module file's bytes, decompressed (busybox insmod wants a plain .ko). */
function moduleBytes(path: string): Buffer {
  if (path.endsWith('.ko')) return readFileSync(path);
  const tool = path.endsWith('.xz') ? ['xz', '-dc'] : path.endsWith('.zst') ? ['zstd', '-dc'] : path.endsWith('.gz') ? ['gzip', '-dc'] : null;
  if (!tool) throw new Error(`unknown module compression: ${path}`);
  return execFileSync(tool[0]!, [...tool.slice(1), path], { maxBuffer: 64 << 20 });
}

export interface Guest {
  kernel: string;
  initrd: string;
  kernelVersion: string;
  /** Module files in the initramfs, in load order. */
  modules: string[];
  /** Further module files loaded in `acpi` mode only (the power button as an input device); empty when the kernel has them built in. */
  acpiModules: string[];
  buildMs: number;
}

const built = new Map<string, Guest>();
let processDir: string | null = null;

/**
 * Builds the guest's initramfs into `dir` (default: a temp folder owned by this process, removed
 * at exit). Built once per folder per process.
 */
export function buildGuest(dir?: string): Guest {
  if (dir === undefined) {
    if (processDir === null) {
      const d = mkdtempSync(join(tmpdir(), 'shieldlab-guest-'));
      process.once('exit', () => rmSync(d, { recursive: true, force: true }));
      processDir = d;
    }
    dir = processDir;
  }
  const cached = built.get(dir);
  if (cached && existsSync(cached.initrd)) return cached;
  const t0 = Date.now();
  const k = hostKernel();
  const busybox = busyboxPath();
  if (!k || !busybox) throw new Error(`cannot build the test guest: ${guestMissing() ?? 'kernel or busybox missing'}`);
  const modules = moduleClosure(k.modulesDir);
  const entries: CpioEntry[] = [
    { kind: 'dir', path: 'bin' },
    { kind: 'dir', path: 'dev' },
    { kind: 'dir', path: 'proc' },
    { kind: 'dir', path: 'sys' },
    { kind: 'dir', path: 'tmp', mode: 0o1777 },
    { kind: 'dir', path: 'lib' },
    { kind: 'dir', path: 'lib/modules' },
    { kind: 'chardev', path: 'dev/console', major: 5, minor: 1 },
    { kind: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 },
    { kind: 'file', path: 'bin/busybox', data: readFileSync(busybox), mode: 0o755 },
    { kind: 'symlink', path: 'bin/sh', target: 'busybox' },
    { kind: 'file', path: 'init', data: Buffer.from(INIT_SCRIPT), mode: 0o755 },
  ];
  const acpiModules = moduleClosure(k.modulesDir, ACPI_MODULES, { optional: true, exclude: modules });
  const add = (list: string[]) =>
    list.map((m) => {
      const name = m.replace(/^.*\//, '').replace(/\.ko(\.(xz|zst|gz))?$/, '.ko');
      entries.push({ kind: 'file', path: `lib/modules/${name}`, data: moduleBytes(join(k.modulesDir, m)) });
      return name;
    });
  const names = add(modules);
  const acpiNames = add(acpiModules);
  entries.push({ kind: 'file', path: 'modules.order', data: Buffer.from(names.join('\n') + '\n') });
  entries.push({ kind: 'file', path: 'modules.acpi', data: Buffer.from(acpiNames.map((n) => n + '\n').join('')) });
  mkdirSync(dir, { recursive: true });
  const initrd = join(dir, 'initramfs.cpio');
  writeFileSync(initrd, newcCpio(entries));
  const guest: Guest = { kernel: k.kernel, initrd, kernelVersion: k.version, modules: names, acpiModules: acpiNames, buildMs: Date.now() - t0 };
  built.set(dir, guest);
  return guest;
}

// ---------------------------------------------------------------------------------------------
// swtpm for the guest: QEMU's tpm-emulator backend needs a Unix control socket (it passes the data
// channel's fd over it), so this is not test/helpers/swtpm.ts's TCP swtpm.

export interface GuestSwtpm {
  ctrlSocket: string;
  dir: string;
  process: ChildProcess;
  log: () => string;
  stop(): Promise<void>;
}

function canConnectUnix(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function stopChild(child: ChildProcess, graceMs = 3000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([gone, new Promise((r) => (timer = setTimeout(r, graceMs)))]);
  clearTimeout(timer);
  if (child.exitCode === null && child.signalCode === null) {
    child.kill('SIGKILL');
    await gone;
  }
}

/**
 * `swtpm socket --tpm2` with a Unix control socket in `dir` (state in dir/state). QEMU initialises
 * it (CMD_INIT) and the firmware sends TPM2_Startup. Probing the control socket is harmless: swtpm
 * takes the next control client once the probe disconnects.
 */
export async function startGuestSwtpm(dir: string): Promise<GuestSwtpm> {
  const state = join(dir, 'state');
  mkdirSync(state, { recursive: true });
  const ctrlSocket = join(dir, 'swtpm-ctrl.sock');
  const logFile = join(dir, 'swtpm.log');
  const child = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${state}`, '--ctrl', `type=unixio,path=${ctrlSocket}`, '--log', `file=${logFile},level=1`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const deadline = Date.now() + 10_000;
  while (child.exitCode === null && Date.now() < deadline && !(existsSync(ctrlSocket) && (await canConnectUnix(ctrlSocket)))) await new Promise((r) => setTimeout(r, 20));
  if (child.exitCode !== null || Date.now() >= deadline) {
    child.kill('SIGKILL');
    throw new Error(`swtpm did not start: ${stderr}`);
  }
  const log = () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '') + stderr;
  return { ctrlSocket, dir, process: child, log, stop: () => stopChild(child) };
}

// ---------------------------------------------------------------------------------------------
// Booting.

export interface GuestReport {
  /** The first sector's text (NULs and anything outside [A-Za-z0-9_.:-] dropped). */
  marker: string;
  disk: { sha256: string; sectors: number };
  tpm: {
    /** /dev/tpm0 exists. */
    present: boolean;
    versionMajor: number | null;
    /** PCR index → hex value, per bank the kernel exposes (empty when the bank is absent). */
    pcrs: { sha256: Record<string, string>; sha1: Record<string, string> };
  };
  kernel: string;
  /** Guest seconds since its kernel started when it wrote the report. */
  uptime: number;
  /** Space-separated problems the guest met (failed insmod, no /dev/vda). */
  errors: string;
}

/** What a `bench-seq` guest reports: its whole disk read, then written, sequentially. */
export interface GuestBenchReport {
  mode: 'bench-seq';
  /** Bytes read, and then written (the disk's size rounded down to whole MiB). */
  bytes: number;
  /** Guest wall-clock ms ($EPOCHREALTIME, µs resolution) for the read and for the write (its closing fsync included). */
  readMs: number;
  writeMs: number;
  /** dd's block size (1 MiB). */
  blockBytes: number;
  /** O_DIRECT on both sides (no guest page cache). */
  direct: boolean;
  kernel: string;
  uptime: number;
  /** Space-separated problems (failed insmod, no /dev/vda, read-failed, write-failed, short-read, short-write). */
  errors: string;
}

/** MiB/s of a bench report's read and write. */
export function benchMiBps(r: GuestBenchReport): { readMiBps: number; writeMiBps: number } {
  const mib = r.bytes / (1024 * 1024);
  return { readMiBps: mib / (r.readMs / 1000), writeMiBps: mib / (r.writeMs / 1000) };
}

/** A `report`/`acpi` line, parsed; null when it is not JSON or is a bench report. */
export function parseGuestReport(line: string): GuestReport | null {
  try {
    const v = JSON.parse(line) as Partial<GuestReport> & { mode?: string };
    return v !== null && typeof v === 'object' && v.mode === undefined ? (v as GuestReport) : null;
  } catch {
    return null;
  }
}

/** A `bench-seq` line, parsed and checked; null otherwise. */
export function parseGuestBenchReport(line: string): GuestBenchReport | null {
  try {
    const v = JSON.parse(line) as Partial<GuestBenchReport>;
    if (v === null || typeof v !== 'object' || v.mode !== 'bench-seq') return null;
    if (![v.bytes, v.readMs, v.writeMs].every((x) => typeof x === 'number' && Number.isFinite(x))) return null;
    return v as GuestBenchReport;
  } catch {
    return null;
  }
}

export interface BootOptions {
  kernel: string;
  initrd: string;
  /** An NBD URI (nbd+unix:///?socket=…) or a raw image file. */
  disk: string;
  /** swtpm's Unix control socket; no TPM without it. */
  tpmCtrlSocket?: string;
  /** 'direct-kernel': SeaBIOS + -kernel; 'ovmf': OVMF (pflash, a vars copy in workDir) + -kernel. */
  firmware?: 'direct-kernel' | 'ovmf';
  /** Sockets, the vars copy and the console log go here. */
  workDir: string;
  timeoutMs?: number;
  memoryMiB?: number;
  /** Extra kernel command line (a mode: guestAppend('acpi')). */
  append?: string;
  /** A QMP socket QEMU listens on (`-qmp unix:…,server=on,wait=off`), e.g. for system_powerdown (qmpExecute). */
  qmpSocket?: string;
  /** The disk read-write (bench-seq writes it); default read-only. */
  writable?: boolean;
  /** Called once the report line is in and acked (e.g. to send system_powerdown to an `acpi` guest); bootGuest still waits for QEMU to exit. */
  onReport?: (line: string) => void | Promise<void>;
}

export interface BootResult {
  report: GuestReport | null;
  /** The report of a `bench-seq` guest (then `report` is null). */
  benchReport: GuestBenchReport | null;
  /** The raw line received on the channel. */
  line: string | null;
  /** Where the report came from. */
  via: 'virtio-serial' | 'console' | null;
  exit: { code: number | null; signal: NodeJS.Signals | null };
  timedOut: boolean;
  /** ms from spawning QEMU to the report, and to QEMU's exit. */
  reportMs: number | null;
  exitMs: number;
  console: string;
  args: string[];
}

/** QEMU -drive/-chardev option values: a comma is written as two. */
function optValue(v: string): string {
  return v.replace(/,/g, ',,');
}

export function qemuArgs(opts: BootOptions, reportSocket: string, varsCopy: string | null): string[] {
  const args = ['-machine', 'q35', '-accel', 'tcg', '-cpu', 'max', '-smp', '1', '-m', String(opts.memoryMiB ?? 256), '-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio', '-no-reboot'];
  if ((opts.firmware ?? 'direct-kernel') === 'ovmf') {
    args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${optValue(OVMF_CODE)}`, '-drive', `if=pflash,format=raw,unit=1,file=${optValue(varsCopy!)}`);
  }
  args.push('-kernel', opts.kernel, '-initrd', opts.initrd, '-append', `console=ttyS0 quiet panic=-1 ${opts.append ?? ''}`.trim());
  args.push('-drive', `file=${optValue(opts.disk)},format=raw,if=virtio${opts.writable ? '' : ',readonly=on'}`);
  if (opts.tpmCtrlSocket) {
    args.push('-chardev', `socket,id=chrtpm,path=${optValue(opts.tpmCtrlSocket)}`, '-tpmdev', 'emulator,id=tpm0,chardev=chrtpm', '-device', 'tpm-crb,tpmdev=tpm0');
  }
  if (opts.qmpSocket) args.push('-qmp', `unix:${optValue(opts.qmpSocket)},server=on,wait=off`);
  // QEMU connects to the test's socket (client mode): listening first means no race and no retry.
  args.push('-device', 'virtio-serial-pci', '-chardev', `socket,id=report,path=${optValue(reportSocket)}`, '-device', `virtserialport,chardev=report,name=${GUEST_CHANNEL}`);
  return args;
}

/**
 * Boots the guest and waits for QEMU to exit (the guest powers off after reporting), killing it
 * after timeoutMs. The report comes on the virtio-serial port; the console copy is the fallback.
 */
export async function bootGuest(opts: BootOptions): Promise<BootResult> {
  const timeoutMs = opts.timeoutMs ?? 90_000;
  mkdirSync(opts.workDir, { recursive: true });
  const reportSocket = join(opts.workDir, 'report.sock');
  let varsCopy: string | null = null;
  if ((opts.firmware ?? 'direct-kernel') === 'ovmf') {
    varsCopy = join(opts.workDir, 'OVMF_VARS.fd');
    writeFileSync(varsCopy, readFileSync(OVMF_VARS));
  }
  let line: string | null = null;
  let reportAt: number | null = null;
  let onReportError: unknown = null;
  const t0 = performance.now();
  const listener = await listenForReport(reportSocket);
  void listener.report.then((got) => {
    line = got.line;
    reportAt = got.at;
    if (opts.onReport) void (async () => opts.onReport!(got.line))().catch((err: unknown) => (onReportError = err));
  });
  const args = qemuArgs(opts, reportSocket, varsCopy);
  const child = spawn(QEMU_SYSTEM, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let consoleOut = '';
  const keep = (d: Buffer) => {
    consoleOut += d.toString('utf8');
    if (consoleOut.length > 1 << 20) consoleOut = consoleOut.slice(-(1 << 19));
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  let timedOut = false;
  const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      consoleOut += `\nspawn error: ${err.message}`;
      resolve({ code: null, signal: null });
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal });
    });
  });
  const exitMs = performance.now() - t0;
  await listener.close();
  let via: BootResult['via'] = line === null ? null : 'virtio-serial';
  if (line === null) {
    const i = consoleOut.lastIndexOf(CONSOLE_PREFIX);
    if (i >= 0) {
      line = consoleOut.slice(i + CONSOLE_PREFIX.length).split(/\r?\n/)[0]!.trim();
      via = 'console';
    }
  }
  if (onReportError !== null) consoleOut += `\nonReport failed: ${onReportError instanceof Error ? onReportError.message : String(onReportError)}`;
  const report = line === null ? null : parseGuestReport(line);
  const benchReport = line === null ? null : parseGuestBenchReport(line);
  return { report, benchReport, line, via, exit, timedOut, reportMs: reportAt === null ? null : reportAt - t0, exitMs, console: consoleOut, args };
}

// ---------------------------------------------------------------------------------------------
// The report channel on its own, for a guest QEMU that someone else starts (`shieldlab vm start
// --test-channel SOCK`): listen first, QEMU connects as a client.

export interface ReportListener {
  socketPath: string;
  /**
   * The first report line, parsed (the guest is acked so it goes on): `report` for a report/acpi
   * guest, `bench` for a bench-seq guest; `at` is performance.now() when the line arrived.
   */
  report: Promise<{ line: string; report: GuestReport | null; bench: GuestBenchReport | null; at: number }>;
  close(): Promise<void>;
}

export async function listenForReport(socketPath: string, opts: { ack?: boolean } = {}): Promise<ReportListener> {
  rmSync(socketPath, { force: true });
  const sockets: Socket[] = [];
  type Got = Awaited<ReportListener['report']>;
  let deliver: (v: Got) => void = () => undefined;
  const report = new Promise<Got>((r) => (deliver = r));
  let got = false;
  const server: Server = createServer((s) => {
    sockets.push(s);
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl >= 0 && !got) {
        got = true;
        const at = performance.now();
        const line = buf.slice(0, nl).trim();
        if (opts.ack ?? true) s.write('ack\n');
        deliver({ line, report: parseGuestReport(line), bench: parseGuestBenchReport(line), at });
      }
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve());
  });
  return {
    socketPath,
    report,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      rmSync(socketPath, { force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// QMP, just enough to press the power button: one connection per command.

/** Connects to a QMP socket, negotiates, runs one command and returns its "return" (rejects on "error"). */
export function qmpExecute<T = unknown>(socketPath: string, command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const s = connect(socketPath);
    let buf = '';
    let stage: 'greeting' | 'capabilities' | 'command' = 'greeting';
    const timer = setTimeout(() => finish(new Error(`QMP ${command} at ${socketPath}: no answer within ${timeoutMs} ms`)), timeoutMs);
    const finish = (err: Error | null, value?: T) => {
      clearTimeout(timer);
      s.destroy();
      if (err) reject(err);
      else resolve(value as T);
    };
    s.on('error', (err) => finish(err));
    s.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const text = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!text) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(text) as Record<string, unknown>;
        } catch {
          continue;
        }
        if ('event' in msg) continue;
        if (stage === 'greeting' && 'QMP' in msg) {
          stage = 'capabilities';
          s.write('{"execute":"qmp_capabilities"}\n');
        } else if ('error' in msg) {
          finish(new Error(`QMP ${stage === 'command' ? command : 'qmp_capabilities'}: ${JSON.stringify(msg.error)}`));
        } else if (stage === 'capabilities' && 'return' in msg) {
          stage = 'command';
          s.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
        } else if (stage === 'command' && 'return' in msg) {
          finish(null, msg.return as T);
        }
      }
    });
  });
}
