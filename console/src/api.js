// Talking to the console's server: JSON views, live views over server-sent events, and the
// login exchange. Every call is same-origin; the session is an HttpOnly cookie the script
// never sees.

export class Unauthorized extends Error {}

let onUnauthorized = () => {};
export function whenUnauthorized(f) { onUnauthorized = f; }

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  try { message = (await res.json()).error || message; } catch { /* not JSON */ }
  if (res.status === 401) { onUnauthorized(); return new Unauthorized(message); }
  return new Error(message);
}

export async function getJSON(path) {
  const res = await fetch(path, { credentials: 'same-origin', headers: { accept: 'application/json' } });
  if (!res.ok) throw await failure(res);
  return res.json();
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

export async function session() {
  const res = await fetch('/api/session', { credentials: 'same-origin' });
  if (res.status === 401) return null;
  if (!res.ok) throw await failure(res);
  return res.json();
}

export async function login(token) {
  const res = await fetch('/api/login', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ token }),
  });
  if (!res.ok) {
    let message = `${res.status}`;
    try { message = (await res.json()).error || message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return res.json();
}

export async function logout() {
  await fetch('/api/logout', { method: 'POST', credentials: 'same-origin', headers: { 'content-type': 'application/json' }, body: '{}' });
}

/**
 * Follows `/api/live/{view}`: `onView(json)` now and on every change, `onFailed(text)` when
 * the server cannot compute it. Returns a handle whose close() ends the stream.
 */
export function live(view, params, { onView, onFailed = () => {}, onEnded = () => onUnauthorized() }) {
  return stream(`/api/live/${view}${query(params)}`, {
    view: (data) => onView(JSON.parse(data)),
    failed: onFailed,
    ended: onEnded,
  });
}

/** Follows `/api/tap`: `hello` once, then `tap` batches. */
export function tap(params, handlers) {
  return stream(`/api/tap${query(params)}`, {
    hello: (data) => handlers.onHello(JSON.parse(data)),
    tap: (data) => handlers.onTap(JSON.parse(data)),
    ended: handlers.onEnded || (() => onUnauthorized()),
  });
}

function stream(url, listeners) {
  const source = new EventSource(url, { withCredentials: true });
  for (const [name, f] of Object.entries(listeners)) {
    source.addEventListener(name, (e) => f(e.data));
  }
  source.addEventListener('error', async () => {
    // The browser reconnects by itself after a network error; a refusal (401) closes the
    // stream for good, and the session says which it was.
    if (source.readyState === EventSource.CLOSED) {
      try { if (!(await session())) onUnauthorized(); } catch { /* offline; retried on next action */ }
    }
  });
  return { close: () => source.close() };
}
