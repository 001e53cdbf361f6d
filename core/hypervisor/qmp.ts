// A minimal QMP client over a Unix socket: the greeting, qmp_capabilities, then commands one at a
// time (each answered by "return" or "error") and asynchronous events. Enough for a power-down,
// a quit and a status query; nothing here ever sends human-monitor commands.
import { connect, type Socket } from 'node:net';
import { ShieldError } from '../errors.ts';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

export class Qmp {
  private buf = '';
  private pending: { resolve: (v: unknown) => void; reject: (e: Error) => void }[] = [];
  private readonly listeners = new Set<(e: QmpEvent) => void>();
  private closedErr: Error | null = null;

  private readonly socket: Socket;

  private constructor(socket: Socket) {
    this.socket = socket;
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 5000): Promise<Qmp> {
    const socket = connect({ path });
    const q = new Qmp(socket);
    const greeting = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new ShieldError('io_error', `QMP at ${path}: no greeting within ${timeoutMs} ms.`)), timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(new ShieldError('io_error', `QMP at ${path}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, { details: { socket: path } }));
      });
      let greeted = false;
      socket.on('data', (d: Buffer) => {
        q.buf += d.toString('utf8');
        let nl: number;
        while ((nl = q.buf.indexOf('\n')) >= 0) {
          const line = q.buf.slice(0, nl).trim();
          q.buf = q.buf.slice(nl + 1);
          if (!line) continue;
          let msg: Record<string, unknown>;
          try {
            msg = JSON.parse(line) as Record<string, unknown>;
          } catch {
            continue;
          }
          if (!greeted && 'QMP' in msg) {
            greeted = true;
            clearTimeout(timer);
            resolve();
            continue;
          }
          q.dispatch(msg);
        }
      });
      socket.on('close', () => {
        q.closedErr = new ShieldError('io_error', 'QMP connection closed.');
        for (const p of q.pending.splice(0)) p.reject(q.closedErr);
      });
    });
    await greeting;
    await q.execute('qmp_capabilities');
    return q;
  }

  private dispatch(msg: Record<string, unknown>): void {
    if (typeof msg.event === 'string') {
      for (const l of this.listeners) l(msg as unknown as QmpEvent);
      return;
    }
    const p = this.pending.shift();
    if (!p) return;
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new ShieldError('io_error', `QMP: ${e.class ?? 'error'}: ${e.desc ?? ''}`));
    } else p.resolve(msg.return);
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    });
  }

  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    this.socket.destroy();
  }
}
