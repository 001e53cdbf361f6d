// Public face of the NBD server: serve any NbdDisk on a private Unix socket.
export { startNbdServer, nbdErrno, type NbdServer, type NbdServerOptions, type NbdStats, type NbdEvent } from './server.ts';
export { RawFileDisk, type RawFileDiskOptions } from './raw-disk.ts';
export type { NbdDisk, NbdExtent } from './disk.ts';
