// REST client: tokens in sessionStorage (this tab only), bearer auth, one shared refresh
// with /auth/refresh when a call answers 401, errors in the API's one shape.

const KEY = 'apex.session';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function loadSession() {
  try {
    const session = JSON.parse(sessionStorage.getItem(KEY) || 'null');
    return session && session.access_token && session.refresh_token ? session : null;
  } catch {
    return null;
  }
}

function saveSession(pair) {
  const session = {
    access_token: pair.access_token,
    refresh_token: pair.refresh_token,
    user: pair.user,
  };
  sessionStorage.setItem(KEY, JSON.stringify(session));
  return session;
}

export function clearSession() {
  sessionStorage.removeItem(KEY);
}

async function errorFrom(response) {
  let code = 'http_' + response.status;
  let message = response.statusText || 'request failed';
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code || code);
      message = String(body.error.message || message);
    }
  } catch {
    // not the API's JSON shape (e.g. a proxy page): keep the status line
  }
  return new ApiError(response.status, code, message);
}

/** POST /auth/login or /auth/register; stores and returns the session. */
export async function authenticate(kind, fields) {
  const response = await fetch(kind === 'register' ? '/auth/register' : '/auth/login', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(fields),
  });
  if (!response.ok) throw await errorFrom(response);
  return saveSession(await response.json());
}

// The refresh in flight, shared: a refresh token works once, so concurrent 401s must not
// each try their own.
let refreshing = null;

function refreshTokens() {
  if (!refreshing) {
    refreshing = (async () => {
      const session = loadSession();
      if (!session) throw new ApiError(401, 'unauthorized', 'not logged in');
      const response = await fetch('/auth/refresh', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ refresh_token: session.refresh_token }),
      });
      if (!response.ok) throw await errorFrom(response);
      return saveSession(await response.json());
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

/**
 * Calls the API with the session's access token. `json` sends a JSON body, `body` +
 * `contentType` a raw one. On 401 the tokens are refreshed once and the call repeated; if
 * that fails the session is cleared and an `apex:logout` event fires on window.
 */
export async function api(path, { method = 'GET', json, body, contentType } = {}) {
  const send = (session) => {
    const headers = { Authorization: `Bearer ${session ? session.access_token : ''}` };
    let payload = body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(json);
    } else if (contentType) {
      headers['Content-Type'] = contentType;
    }
    return fetch(path, { method, headers, body: payload });
  };
  let response = await send(loadSession());
  if (response.status === 401) {
    let session;
    try {
      session = await refreshTokens();
    } catch (err) {
      if (err instanceof ApiError) {
        clearSession();
        window.dispatchEvent(new CustomEvent('apex:logout', { detail: err.message }));
      }
      throw err;
    }
    response = await send(session);
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

/** POST /auth/logout (best effort) and forget the tokens. */
export async function logout() {
  const session = loadSession();
  clearSession();
  if (session) {
    try {
      await fetch('/auth/logout', {
        method: 'POST',
        headers: { Authorization: `Bearer ${session.access_token}` },
      });
    } catch {
      // offline: the tokens are forgotten anyway and expire on their own
    }
  }
}
