// The app's own origin and the one test for "is this URL ours?", used for IPC senders, navigation
// and the renderer protocol alike.
//
// Node's URL gives every non-special scheme (app:, data:, about:, file:) the opaque origin "null",
// so comparing `new URL(url).origin` strings would let data: and about:blank pass for
// app://shieldlab. The origin is therefore rebuilt from scheme and host, and a URL without a host
// (or with credentials in it) has no origin at all.

export const APP_SCHEME = 'app';
export const APP_HOST = 'shieldlab';
export const APP_ORIGIN = `${APP_SCHEME}://${APP_HOST}`;
export const APP_ENTRY_URL = `${APP_ORIGIN}/index.html`;

/** `scheme://host[:port]` of a URL, or null when it has no host-based origin. */
export function originOf(url: string): string | null {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return null;
  }
  if (u.host === '' || u.username !== '' || u.password !== '') return null;
  return `${u.protocol}//${u.host.toLowerCase()}`;
}

export function isAppUrl(url: string): boolean {
  return originOf(url) === APP_ORIGIN;
}

/** The part of Electron's WebFrameMain that the checks read. */
export interface FrameLike {
  readonly url: string;
}

/** Checklist item 17: only frames showing our own renderer may talk to the main process. */
export function isTrustedFrame(frame: FrameLike | null | undefined): boolean {
  return frame != null && typeof frame.url === 'string' && isAppUrl(frame.url);
}
