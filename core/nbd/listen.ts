// Where the NBD socket lives, and who may reach it. Unix sockets only: whoever can connect can
// read and write the plaintext disk, so the socket is 0600 in a folder nobody else can write to.
//
// * No path given: a fresh private folder (mkdtemp, 0700) in os.tmpdir() (or `dir`), the socket
//   `disk.sock` inside, chmod 0600. The folder goes away on close.
// * A path given: its folder must be ours and not group/world-writable. We never follow or replace
//   an existing file there; a stale socket (nobody listening) is removed, a live one refused. The
//   socket is bound in a private folder next to it, made 0600, then hard-linked into place (link
//   fails when the name exists: nothing is ever replaced) so it is never reachable with a looser
//   mode, whatever the umask.
import { connect, type Server } from 'node:net';
import { chmod, link, lstat, mkdtemp, rm, stat, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { ShieldError } from '../errors.ts';

/** sun_path is 108 bytes on Linux, NUL included. */
const MAX_SOCKET_PATH = 107;

export interface BoundSocket {
  socketPath: string;
  /** Removes what we created (our socket only, checked by inode), after the server has closed. */
  cleanup(): Promise<void>;
}

function uid(): number {
  return typeof process.getuid === 'function' ? process.getuid() : -1;
}

/** A folder we may put a socket (or a private folder) in: ours and not writable by others, or sticky (like /tmp). */
async function checkFolder(dir: string, allowSticky: boolean): Promise<void> {
  let st;
  try {
    st = await stat(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ShieldError('not_found', `The socket folder ${dir} does not exist.`, { cause: err });
    throw new ShieldError('io_error', `Cannot inspect the socket folder ${dir} (${code}).`, { cause: err });
  }
  if (!st.isDirectory()) throw new ShieldError('invalid_argument', `${dir} is not a folder.`);
  const sticky = (st.mode & 0o1000) !== 0;
  if (allowSticky && sticky) return;
  if (st.uid !== uid()) throw new ShieldError('forbidden', `The socket folder ${dir} belongs to another user (uid ${st.uid}); refusing to put the disk socket there.`);
  if ((st.mode & 0o022) !== 0) {
    throw new ShieldError('forbidden', `The socket folder ${dir} is writable by group or others (mode ${(st.mode & 0o7777).toString(8)}); refusing to put the disk socket there.`);
  }
}

/** Is someone listening on this socket file? */
function probe(path: string): Promise<'live' | 'stale'> {
  return new Promise((resolvePromise, reject) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolvePromise('live');
    });
    s.once('error', (err: NodeJS.ErrnoException) => {
      s.destroy();
      if (err.code === 'ECONNREFUSED') resolvePromise('stale');
      else reject(new ShieldError('already_exists', `${path} exists and cannot be probed (${err.code}); refusing to replace it.`, { cause: err }));
    });
  });
}

function listenOn(server: Server, path: string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      server.off('listening', onListening);
      reject(
        err.code === 'EADDRINUSE'
          ? new ShieldError('already_exists', `${path} already exists.`, { cause: err })
          : new ShieldError('io_error', `Cannot listen on ${path} (${err.code}).`, { cause: err }),
      );
    };
    const onListening = () => {
      server.off('error', onError);
      resolvePromise();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ path, exclusive: true });
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((r) => (server.listening ? server.close(() => r()) : r()));
}

function checkLength(path: string): void {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    throw new ShieldError('invalid_argument', `The socket path ${path} is longer than ${MAX_SOCKET_PATH} bytes (the Unix socket limit).`);
  }
}

export async function bindSocket(server: Server, opts: { socketPath?: string; dir?: string }): Promise<BoundSocket> {
  if (opts.socketPath === undefined) {
    const parent = resolve(opts.dir ?? tmpdir());
    await checkFolder(parent, true);
    const folder = await mkdtemp(join(parent, 'shieldlab-nbd-'));
    try {
      await chmod(folder, 0o700);
      const socketPath = join(folder, 'disk.sock');
      checkLength(socketPath);
      await listenOn(server, socketPath);
      await chmod(socketPath, 0o600);
      return { socketPath, cleanup: () => rm(folder, { recursive: true, force: true }) };
    } catch (err) {
      await closeServer(server);
      await rm(folder, { recursive: true, force: true });
      throw err;
    }
  }

  const socketPath = resolve(opts.socketPath);
  checkLength(socketPath);
  const parent = dirname(socketPath);
  await checkFolder(parent, false);
  const existing = await lstat(socketPath).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw new ShieldError('io_error', `Cannot inspect ${socketPath} (${err.code}).`, { cause: err });
  });
  if (existing) {
    if (!existing.isSocket()) throw new ShieldError('already_exists', `${socketPath} exists and is not a socket; refusing to replace it.`);
    if (existing.uid !== uid()) throw new ShieldError('already_exists', `${socketPath} is another user's socket; refusing to replace it.`);
    if ((await probe(socketPath)) === 'live') throw new ShieldError('already_exists', `Another server is listening on ${socketPath}.`);
    await unlink(socketPath).catch(() => undefined);
  }
  // Bound privately first, so the name only ever appears with mode 0600.
  const folder = await mkdtemp(join(parent, `.${basename(socketPath)}.`));
  const tmp = join(folder, 's');
  try {
    await chmod(folder, 0o700);
    checkLength(tmp);
    await listenOn(server, tmp);
    await chmod(tmp, 0o600);
    try {
      await link(tmp, socketPath);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw code === 'EEXIST'
        ? new ShieldError('already_exists', `${socketPath} appeared while the server was starting; refusing to replace it.`, { cause: err })
        : new ShieldError('io_error', `Cannot create ${socketPath} (${code}).`, { cause: err });
    }
  } catch (err) {
    await closeServer(server);
    await rm(folder, { recursive: true, force: true });
    throw err;
  }
  const ours = await lstat(socketPath);
  await rm(folder, { recursive: true, force: true });
  return {
    socketPath,
    cleanup: async () => {
      const now = await lstat(socketPath).catch(() => null);
      if (now && now.dev === ours.dev && now.ino === ours.ino) await unlink(socketPath).catch(() => undefined);
    },
  };
}
