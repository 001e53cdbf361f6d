// Serves the built renderer (dist/renderer) on app://shieldlab/ with a strict CSP header
// (checklist item 7). A plain (Request) => Response function: Electron's protocol.handle takes it
// as is, and a unit test can call it without Electron.
import { readFile, stat } from 'node:fs/promises';
import { extname, join, resolve, sep } from 'node:path';
import { APP_ORIGIN, originOf } from './origin.ts';
import { contentSecurityPolicy, MIME, securityHeaders } from '../core/server/web-policy.ts';

/**
 * The renderer talks to the main process through the preload only, so it needs no network at
 * all: connect-src 'none' also makes a renderer that lost its preload fail closed instead of
 * falling back to web-mode fetches.
 */
export const RENDERER_CSP = contentSecurityPolicy("'none'");

const SECURITY_HEADERS = securityHeaders(RENDERER_CSP);


/** The file under `root` that an app:// URL names, or null (other origin, traversal, bad escape). */
export function rendererFile(root: string, url: string): string | null {
  if (originOf(url) !== APP_ORIGIN) return null;
  let path: string;
  try {
    path = decodeURIComponent(new URL(url).pathname);
  } catch {
    return null;
  }
  if (path.includes('\0')) return null;
  if (path.endsWith('/')) path += 'index.html';
  const base = resolve(root);
  const file = join(base, path);
  return file.startsWith(base + sep) ? file : null;
}

function respond(status: number, body: Uint8Array | string | null, contentType: string): Response {
  const headers = new Headers(SECURITY_HEADERS);
  headers.set('Content-Type', contentType);
  return new Response(body === null ? null : typeof body === 'string' ? body : new Uint8Array(body), { status, headers });
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** The handler for protocol.handle(APP_SCHEME, …). Never throws: failures are HTTP statuses. */
export function createRendererHandler(opts: { root: string }): (request: Request) => Promise<Response> {
  const index = join(resolve(opts.root), 'index.html');
  return async (request) => {
    if (request.method !== 'GET' && request.method !== 'HEAD') return respond(405, 'Method not allowed.', 'text/plain; charset=utf-8');
    let file = rendererFile(opts.root, request.url);
    if (file === null) return respond(404, 'Not found.', 'text/plain; charset=utf-8');
    // A single-page app: an unknown route (no file extension) gets the shell; a missing asset is a 404.
    if (!(await isFile(file)) && extname(file) === '') file = index;
    try {
      const body = await readFile(file);
      return respond(200, request.method === 'HEAD' ? null : body, MIME[extname(file)] ?? 'application/octet-stream');
    } catch {
      const missing = file === index ? 'The renderer is not built: run `npm run build`.' : 'Not found.';
      return respond(404, missing, 'text/plain; charset=utf-8');
    }
  };
}
