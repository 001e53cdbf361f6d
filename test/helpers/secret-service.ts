// A real Secret Service for tests: a private dbus-daemon plus gnome-keyring-daemon in a temp dir.
// Skips only when the components are absent and CI is not set; under CI=true they must exist.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './home.ts';

export interface SecretService {
  env: NodeJS.ProcessEnv;
  address: string;
  /** secret-tool (libsecret-tools) against this bus: an independent view of the store. */
  secretTool(args: string[]): { code: number | null; stdout: string };
  stop(): void;
}

function has(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** null → the caller should skip (component missing outside CI). */
export function secretServiceMissing(): string | null {
  const missing = ['dbus-daemon', 'gnome-keyring-daemon', 'secret-tool'].filter((c) => !has(c));
  if (missing.length === 0) return null;
  if (process.env.CI) throw new Error(`CI=true but ${missing.join(', ')} missing: .ci/run must install them`);
  return `needs ${missing.join(', ')} (Debian: dbus gnome-keyring libsecret-tools)`;
}

export async function startSecretService(): Promise<SecretService> {
  const { dir, cleanup } = tempDir('shieldlab-dbus-');
  const bus = join(dir, 'bus');
  writeFileSync(
    join(dir, 'session.conf'),
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path=${bus}</listen>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>`,
  );
  const out = execFileSync('dbus-daemon', [`--config-file=${join(dir, 'session.conf')}`, '--fork', '--print-pid=1'], { encoding: 'utf8' });
  const dbusPid = Number(out.trim().split('\n')[0]);
  const home = join(dir, 'home');
  mkdirSync(join(home, '.local/share'), { recursive: true });
  const address = `unix:path=${bus}`;
  const env = { ...process.env, DBUS_SESSION_BUS_ADDRESS: address, HOME: home, XDG_DATA_HOME: join(home, '.local/share'), XDG_RUNTIME_DIR: dir };
  const gk = spawn('gnome-keyring-daemon', ['--unlock', '--components=secrets', '--foreground'], { env, stdio: ['pipe', 'pipe', 'pipe'] });
  gk.stdin.end('test-login-password');
  // Ready once the daemon owns org.freedesktop.secrets on our bus.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const r = spawnSync('dbus-send', ['--session', '--print-reply', '--dest=org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus.NameHasOwner', 'string:org.freedesktop.secrets'], { env, encoding: 'utf8' });
    if (r.stdout.includes('boolean true')) break;
    if (Date.now() > deadline) throw new Error(`gnome-keyring did not start: ${r.stderr}`);
    await new Promise((res) => setTimeout(res, 50));
  }
  return {
    env: { DBUS_SESSION_BUS_ADDRESS: address },
    address,
    secretTool(args) {
      // secret-tool prints item attributes on stderr and secrets on stdout: keep both.
      const r = spawnSync('secret-tool', args, { env, encoding: 'utf8' });
      return { code: r.status, stdout: r.stdout + r.stderr };
    },
    stop() {
      gk.kill('SIGTERM');
      try {
        process.kill(dbusPid, 'SIGTERM');
      } catch {
        /* already gone */
      }
      if (existsSync(dir)) cleanup();
    },
  };
}
