// The API client: the token from sessionStorage as a bearer header on
// every call (never in a URL), problems (application/problem+json) as
// ApiError with the server's stable `code`.

const TOKEN_KEY = 'agentd.token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

/** Why a call failed. `kind`: unreachable (no answer), unauthorized (401:
 *  no or a bad token), forbidden (403: too weak a scope), problem (any
 *  other refusal), protocol (an answer that is not what the API says). */
export class ApiError extends Error {
  constructor(kind, status, code, detail) {
    super(detail || code || kind);
    this.kind = kind;
    this.status = status;
    this.code = code;
    this.detail = detail;
  }

  /** One sentence for a person. */
  describe() {
    switch (this.kind) {
      case 'unreachable':
        return `Cannot reach the agentd server at ${location.origin}: is it running? (${this.detail})`;
      case 'unauthorized':
        return `The server refused the token (${this.code}): ${this.detail}. Log in again with a valid token.`;
      case 'forbidden':
        return `This token may not do that (${this.code}): ${this.detail}`;
      default:
        return this.code ? `${this.code}: ${this.detail}` : this.detail;
    }
  }
}

const listeners = new Set();
/** `fn(error)` for every unauthorized or unreachable answer, and
 *  `fn(null)` for every answer at all (the server is back). */
export function onConnectivity(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}
function tell(error) {
  for (const fn of listeners) fn(error);
}

function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Reads a problem from a response that is not ok. */
export async function problemOf(response) {
  let code = null;
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    code = body.code || null;
    detail = body.detail || detail;
  } catch (_) { /* not JSON: the status line says it */ }
  const kind = response.status === 401 ? 'unauthorized' : response.status === 403 ? 'forbidden' : 'problem';
  return new ApiError(kind, response.status, code, detail);
}

/** A JSON call. Options: body (JSON), signal, idempotent (send an
 *  Idempotency-Key, so a retried create or prompt never runs twice),
 *  headers. Resolves to the answer's JSON (null for 204). */
export async function api(method, path, options = {}) {
  const headers = { Accept: 'application/json', ...authHeaders(), ...(options.headers || {}) };
  if (method !== 'GET') headers['X-Agentd-Actor'] = 'dashboard';
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  if (options.idempotent) headers['Idempotency-Key'] = idempotencyKey();
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      signal: options.signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    const error = new ApiError('unreachable', 0, null, e.message);
    tell(error);
    throw error;
  }
  if (!response.ok) {
    const error = await problemOf(response);
    tell(error.kind === 'unauthorized' ? error : null);
    throw error;
  }
  tell(null);
  if (response.status === 204) return null;
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (_) {
    throw new ApiError('protocol', response.status, null, `${method} ${path} answered something that is not JSON`);
  }
}

export const get = (path, options) => api('GET', path, options);
export const post = (path, body, options = {}) => api('POST', path, { ...options, body });
export const del = (path, options) => api('DELETE', path, options);

/** `?a=1&label=k=v...` from an object (arrays repeat the key); empty
 *  values are left out. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of [].concat(value)) {
      if (v !== null && v !== undefined && v !== '') q.append(key, v);
    }
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}
