// QEMU for shielded VMs: the command line per security level (a pure function, so a test can assert
// what never appears in it), the accelerator and SMM probes, and the firmware choice.
//
// Levels, as in HGS:
//   shielded              no display, no VGA, no serial, no parallel, no HMP monitor, no gdb stub,
//                         no -snapshot: the only way in is our own QMP socket (0600 in a 0700
//                         folder). q35 with SMM + OVMF Secure Boot (Debian's OVMF_CODE_4M.secboot.fd
//                         and a per-VM copy of OVMF_VARS_4M.ms.fd, Microsoft keys enrolled), the
//                         pflash marked secure so only SMM code writes the variable store.
//   encryption-supported  the same encryption (disk over our NBD server, encrypted vTPM) but the
//                         admin keeps a console: the serial console written to a 0600 log in the
//                         VM's run folder, or VNC on 127.0.0.1. UEFI without Secure Boot enforcement
//                         (OVMF_CODE_4M.fd), so lab kernels booted with --kernel run.
//
// Test-only: a virtio-serial port named org.shieldlab.test wired to a Unix socket the test owns
// (`testChannel`). qemuArgs refuses it in the shielded level: it is a channel out of the guest.
import { spawn } from 'node:child_process';
import { accessSync, constants, existsSync } from 'node:fs';
import { ShieldError } from '../errors.ts';

export const QEMU_BINARY = 'qemu-system-x86_64';
export const SECURITY_LEVELS = ['shielded', 'encryption-supported'] as const;
export type SecurityLevel = (typeof SECURITY_LEVELS)[number];
export type Accel = 'kvm' | 'tcg';
export type ConsoleKind = 'serial-log' | 'vnc';
/** The virtio-serial port name of the test channel. */
export const TEST_CHANNEL_NAME = 'org.shieldlab.test';

/** Debian's OVMF (package ovmf), 4 MiB flash layout. */
export const OVMF = {
  secureBootCode: '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd',
  /** Variable store template with the Microsoft keys enrolled: Secure Boot on from the first boot. */
  secureBootVars: '/usr/share/OVMF/OVMF_VARS_4M.ms.fd',
  code: '/usr/share/OVMF/OVMF_CODE_4M.fd',
  vars: '/usr/share/OVMF/OVMF_VARS_4M.fd',
} as const;

/** What qemuArgs needs to know of the VM (its record). */
export interface VmShape {
  name: string;
  memoryMiB: number;
  cpus: number;
  /** Direct kernel boot, for lab and test guests (documented as such); null: boot from the disk. */
  kernel?: string | null;
  initrd?: string | null;
  append?: string | null;
}

export interface Firmware {
  /** The firmware code (read-only pflash). */
  code: string;
  /** This VM's own copy of the variable store (writable pflash). */
  vars: string;
  /** Secure Boot enforced: needs SMM (q35,smm=on) and the secure pflash. */
  secureBoot: boolean;
}

export interface LaunchOptions {
  level: SecurityLevel;
  accel: Accel;
  /** nbd+unix:///?socket=… of our NBD server. */
  nbdUri: string;
  /** swtpm's control socket (QEMU hands it the data channel). */
  tpmCtrlSocket: string;
  /** Our QMP socket: QEMU listens, only we connect. */
  qmpSocket: string;
  firmware: Firmware;
  /** encryption-supported only: where the admin's console goes. */
  console?: { kind: 'serial-log'; file: string } | { kind: 'vnc' };
  /** TEST ONLY: a virtio-serial port named org.shieldlab.test connected to this Unix socket. Refused in the shielded level. */
  testChannel?: string;
}

/** QEMU option values: a comma is written as two. */
function optValue(v: string): string {
  return v.replace(/,/g, ',,');
}

function noControl(v: string, what: string): void {
  if (/[\u0000-\u001f]/.test(v)) throw new ShieldError('invalid_argument', `The ${what} may not contain control characters.`);
}

/** The whole QEMU command line (without the binary) for one start of the VM. */
export function qemuArgs(vm: VmShape, o: LaunchOptions): string[] {
  const shielded = o.level === 'shielded';
  if (shielded && !o.firmware.secureBoot) {
    throw new ShieldError('invalid_argument', 'A shielded VM boots with Secure Boot: this firmware choice has none.', { details: { reason: 'secure_boot_required' } });
  }
  if (shielded && o.console) throw new ShieldError('invalid_argument', 'A shielded VM has no console.', { details: { reason: 'console_in_shielded' } });
  if (shielded && o.testChannel !== undefined) {
    throw new ShieldError('invalid_argument', 'The test channel is a way out of the guest: it is refused for shielded VMs (use the encryption-supported level).', { details: { reason: 'test_channel_in_shielded' } });
  }
  for (const [v, what] of [[o.nbdUri, 'NBD URI'], [o.tpmCtrlSocket, 'vTPM socket'], [o.qmpSocket, 'QMP socket'], [o.firmware.code, 'firmware'], [o.firmware.vars, 'variable store']] as const) noControl(v, what);

  const machine = ['q35', `accel=${o.accel}`];
  if (o.firmware.secureBoot) machine.push('smm=on');
  const args = [
    '-name', optValue(`shieldlab-${vm.name}`),
    '-machine', machine.join(','),
    '-cpu', o.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(vm.cpus),
    '-m', String(vm.memoryMiB),
    // Nothing by default: no NIC, no serial, no parallel, no monitor, no VGA, no CD-ROM.
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-qmp', `unix:${optValue(o.qmpSocket)},server=on,wait=off`,
    // QEMU may not start programs, raise its privileges or use obsolete system calls.
    '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
  ];
  if (shielded) args.push('-vga', 'none', '-serial', 'none', '-parallel', 'none', '-monitor', 'none');
  else {
    args.push('-parallel', 'none', '-monitor', 'none');
    const c = o.console ?? { kind: 'vnc' as const };
    if (c.kind === 'serial-log') args.push('-vga', 'none', '-serial', `file:${optValue(c.file)}`);
    else args.push('-vga', 'std', '-serial', 'none', '-vnc', '127.0.0.1:0,to=99');
  }
  if (o.firmware.secureBoot) args.push('-global', 'driver=cfi.pflash01,property=secure,value=on');
  args.push(
    '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${optValue(o.firmware.code)}`,
    '-drive', `if=pflash,format=raw,unit=1,file=${optValue(o.firmware.vars)}`,
  );
  if (vm.kernel) {
    args.push('-kernel', vm.kernel);
    if (vm.initrd) args.push('-initrd', vm.initrd);
    if (vm.append) args.push('-append', vm.append);
  }
  args.push(
    '-chardev', `socket,id=chrtpm,path=${optValue(o.tpmCtrlSocket)}`,
    '-tpmdev', 'emulator,id=tpm0,chardev=chrtpm',
    '-device', 'tpm-crb,tpmdev=tpm0',
    '-drive', `file=${optValue(o.nbdUri)},format=raw,if=virtio,cache=writeback`,
  );
  if (o.testChannel !== undefined) {
    args.push('-device', 'virtio-serial-pci', '-chardev', `socket,id=shieldlabtest,path=${optValue(o.testChannel)}`, '-device', `virtserialport,chardev=shieldlabtest,name=${TEST_CHANNEL_NAME}`);
  }
  const bad = forbiddenInShielded(args);
  if (shielded && bad.length) throw new ShieldError('internal', `A shielded VM's command line holds ${bad.join(', ')}.`);
  return args;
}

/**
 * Everything in a command line that would let an admin reach inside a shielded VM: a display,
 * a console, a monitor, a debugger, a snapshot overlay, a channel out. Empty = clean.
 */
export function forbiddenInShielded(args: readonly string[]): string[] {
  const found: string[] = [];
  const value = (i: number) => args[i + 1] ?? '';
  const none = new Set(['none']);
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!.replace(/^--/, '-');
    switch (a) {
      case '-vnc':
      case '-spice':
      case '-gdb':
      case '-s':
      case '-S':
      case '-snapshot':
      case '-nographic':
      case '-curses':
      case '-sdl':
      case '-loadvm':
      case '-incoming':
      case '-virtfs':
      case '-mon':
      case '-debugcon':
      case '-semihosting':
      case '-plugin':
      case '-d':
      case '-D':
        found.push(a);
        break;
      case '-serial':
      case '-parallel':
      case '-monitor':
      case '-vga':
      case '-display':
        if (!none.has(value(i))) found.push(`${a} ${value(i)}`);
        i++;
        break;
      case '-qmp':
        // Only one: ours, on a Unix socket.
        if (!/^unix:/.test(value(i)) || args.filter((x) => x === '-qmp').length !== 1) found.push(`${a} ${value(i)}`);
        i++;
        break;
      case '-chardev': {
        const v = value(i);
        if (!/^socket,id=chrtpm,/.test(v)) found.push(`${a} ${v}`);
        i++;
        break;
      }
      case '-device': {
        const v = value(i);
        if (/^(virtio-serial|virtserialport|virtconsole|isa-serial|pci-serial|usb-serial|VGA|virtio-gpu|virtio-vga|qxl|bochs-display|ramfb|isa-debugcon|vhost-vsock|usb-|ivshmem|e1000|virtio-net)/.test(v)) found.push(`${a} ${v}`);
        i++;
        break;
      }
      case '-drive': {
        const v = value(i);
        if (/(^|,)snapshot=on/.test(v)) found.push(`${a} ${v}`);
        i++;
        break;
      }
      default:
        break;
    }
  }
  return found;
}

export interface AccelChoice {
  accel: Accel;
  /** Why: "/dev/kvm is usable" or why it is not. */
  reason: string;
}

/** KVM when /dev/kvm can be opened read-write; TCG (emulation, slow) otherwise. */
export function chooseAccel(dev = '/dev/kvm'): AccelChoice {
  if (!existsSync(dev)) return { accel: 'tcg', reason: `${dev} does not exist (no KVM here): TCG emulation` };
  try {
    accessSync(dev, constants.R_OK | constants.W_OK);
    return { accel: 'kvm', reason: `${dev} is usable` };
  } catch {
    return { accel: 'tcg', reason: `${dev} is not readable and writable by this user: TCG emulation` };
  }
}

export interface SmmProbe {
  smm: boolean;
  /** QEMU's own words when it refused. */
  detail: string;
}

/**
 * Whether QEMU can give a q35 machine SMM with this accelerator (needed for Secure Boot). Under
 * TCG it always can; under KVM (nested KVM especially) the host kernel may lack it, and QEMU then
 * refuses smm=on — which is what this asks it, with a machine that never runs (-S, quit at once).
 */
export function probeSmm(accel: Accel, qemu = QEMU_BINARY, timeoutMs = 15_000): Promise<SmmProbe> {
  return new Promise((resolve) => {
    const child = spawn(qemu, ['-machine', `q35,smm=on,accel=${accel}`, '-nodefaults', '-no-user-config', '-display', 'none', '-S', '-qmp', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let sent = false;
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString('utf8');
      if (!sent && out.includes('"QMP"')) {
        sent = true;
        child.stdin!.end('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
      }
    });
    child.stderr!.on('data', (d: Buffer) => (out += d.toString('utf8')));
    child.stdin!.on('error', () => undefined);
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ smm: false, detail: `${qemu} did not start: ${err.message}` });
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      const said = out.split('\n').filter((l) => l.trim() && !l.startsWith('{')).join(' ').trim();
      resolve(code === 0 && sent ? { smm: true, detail: `SMM available under ${accel}` } : { smm: false, detail: said || `QEMU exited ${code} asked for SMM under ${accel}` });
    });
  });
}

/** The firmware for a level: shielded needs Secure Boot, hence SMM; it is never dropped silently. */
export function firmwareFor(level: SecurityLevel, smm: SmmProbe, varsCopy: string): Firmware {
  if (level === 'shielded') {
    if (!smm.smm) {
      throw new ShieldError('secure_boot_unavailable', `This host cannot run a shielded VM: Secure Boot needs SMM, and QEMU says: ${smm.detail}. (Nested KVM often lacks SMM; the encryption-supported level runs without Secure Boot.)`, {
        details: { reason: 'secure_boot_unavailable' },
      });
    }
    for (const f of [OVMF.secureBootCode, OVMF.secureBootVars]) {
      if (!existsSync(f)) throw new ShieldError('secure_boot_unavailable', `Secure Boot firmware ${f} is missing (Debian: ovmf).`, { details: { reason: 'secure_boot_unavailable' } });
    }
    return { code: OVMF.secureBootCode, vars: varsCopy, secureBoot: true };
  }
  for (const f of [OVMF.code, OVMF.vars]) if (!existsSync(f)) throw new ShieldError('invalid_argument', `UEFI firmware ${f} is missing (Debian: ovmf).`);
  return { code: OVMF.code, vars: varsCopy, secureBoot: false };
}

/** The variable store template a VM's own copy starts from. */
export function varsTemplate(level: SecurityLevel): string {
  return level === 'shielded' ? OVMF.secureBootVars : OVMF.vars;
}
