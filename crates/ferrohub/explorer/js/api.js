// Every call the explorer makes to the hub: the session endpoints, the overview counters and the
// IoT Hub REST API through the session's proxy (/explorer/api/hub/<path>).

const BASE = '/explorer/api';

let session = null;

/** The signed-in session (SessionInfo) or null. */
export function currentSession() {
  return session;
}

/** Whether the session's policy grants `right` (RegistryRead, RegistryWrite, ServiceConnect, ...). */
export function can(right) {
  return !!session && Array.isArray(session.rights) && session.rights.includes(right);
}

/** An error answer of the hub: HTTP status and the message of its IoT Hub error body. */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.body = body;
  }
}

/** The message of an IoT Hub error body (JSON with Message and/or ExceptionMessage). */
function errorMessage(status, text) {
  let msg = '';
  try {
    const j = JSON.parse(text);
    if (j && typeof j === 'object') {
      msg = j.Message || j.message || j.ExceptionMessage || j.exceptionMessage || '';
      if (typeof msg !== 'string') msg = JSON.stringify(msg);
      // IoT Hub often puts a JSON document inside Message: show its readable part.
      try {
        const inner = JSON.parse(msg);
        if (inner && typeof inner === 'object' && (inner.Message || inner.message)) {
          msg = inner.Message || inner.message;
        }
      } catch (_) { /* plain text */ }
      if (j.ExceptionMessage && msg !== j.ExceptionMessage && !msg.includes(j.ExceptionMessage)) {
        msg = msg ? `${msg} (${j.ExceptionMessage})` : j.ExceptionMessage;
      }
    }
  } catch (_) {
    msg = (text || '').trim();
  }
  if (!msg) msg = `HTTP ${status}`;
  return msg;
}

let onUnauthorized = null;
/** Called when a request answers 401 because the session is gone (not for a missing right). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/**
 * One request. opts: body (object -> JSON, string -> as is), headers, signal, raw (return the
 * Response, for streams and headers), contentType.
 */
async function request(method, url, opts = {}) {
  const headers = new Headers(opts.headers || {});
  let body;
  if (opts.body !== undefined) {
    if (typeof opts.body === 'string') {
      body = opts.body;
      if (!headers.has('Content-Type')) headers.set('Content-Type', opts.contentType || 'application/json');
    } else {
      body = JSON.stringify(opts.body);
      headers.set('Content-Type', 'application/json');
    }
  }
  if (method !== 'GET' && method !== 'HEAD' && session && session.csrfToken) {
    headers.set('X-CSRF-Token', session.csrfToken);
  }
  const started = performance.now();
  const resp = await fetch(url, {
    method,
    headers,
    body,
    credentials: 'same-origin',
    cache: 'no-store',
    signal: opts.signal,
  });
  const elapsedMs = performance.now() - started;
  if (!resp.ok) {
    const text = await resp.text().catch(() => '');
    const err = new ApiError(resp.status, errorMessage(resp.status, text), text);
    if (resp.status === 401 && session && onUnauthorized && !opts.noAuthRedirect) {
      // A 401 on a hub call may only mean the policy lacks a right: ask the session endpoint.
      checkSessionGone();
    }
    throw err;
  }
  if (opts.raw) return resp;
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  return { data, headers: resp.headers, status: resp.status, elapsedMs };
}

let checking = false;
async function checkSessionGone() {
  if (checking) return;
  checking = true;
  try {
    const r = await fetch(`${BASE}/session`, { credentials: 'same-origin', cache: 'no-store' });
    if (r.status === 401) {
      session = null;
      if (onUnauthorized) onUnauthorized();
    }
  } catch (_) {
    /* offline: leave it */
  } finally {
    checking = false;
  }
}

async function json(method, url, opts) {
  return (await request(method, url, opts)).data;
}

/** A call to the IoT Hub REST API through the proxy; `path` without a leading slash. */
export function hub(method, path, opts = {}) {
  return request(method, `${BASE}/hub/${path}`, opts);
}

const enc = encodeURIComponent;
const quoteEtag = (etag) => (etag === '*' || /^".*"$/.test(etag) ? etag : `"${etag}"`);

// ---- session -------------------------------------------------------------------------------

export async function loadSession() {
  try {
    session = await json('GET', `${BASE}/session`, { noAuthRedirect: true });
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) session = null;
    else throw e;
  }
  return session;
}

export async function signInWithToken(token) {
  session = await json('POST', `${BASE}/session`, { body: { token }, noAuthRedirect: true });
  return session;
}

export async function signInWithConnectionString(connectionString) {
  session = await json('POST', `${BASE}/session`, { body: { connectionString }, noAuthRedirect: true });
  return session;
}

export async function logout() {
  try {
    await request('DELETE', `${BASE}/session`, { noAuthRedirect: true });
  } finally {
    session = null;
  }
}

export function overview(signal) {
  return json('GET', `${BASE}/overview`, { signal, noAuthRedirect: false });
}

// ---- devices and modules -------------------------------------------------------------------

/** One page of a twin query: {items, continuation}. */
export async function queryDevices(query, pageSize, continuation, signal) {
  const headers = { 'x-ms-max-item-count': String(pageSize) };
  if (continuation) headers['x-ms-continuation'] = continuation;
  const r = await hub('POST', 'devices/query', { body: { query }, headers, signal });
  return { items: r.data || [], continuation: r.headers.get('x-ms-continuation') || null };
}

const identityPath = (id, mid) => (mid ? `devices/${enc(id)}/modules/${enc(mid)}` : `devices/${enc(id)}`);

export async function getDevice(id, mid) {
  return json('GET', `${BASE}/hub/${identityPath(id, mid)}`);
}

/** Create (no etag) or update (etag or '*') a device or module identity. */
export async function putIdentity(identity, etag) {
  const headers = {};
  if (etag) headers['If-Match'] = quoteEtag(etag);
  return (await hub('PUT', identityPath(identity.deviceId, identity.moduleId), { body: identity, headers })).data;
}

export async function deleteIdentity(id, mid, etag = '*') {
  await hub('DELETE', identityPath(id, mid), { headers: { 'If-Match': quoteEtag(etag) } });
}

export async function listModules(id) {
  return json('GET', `${BASE}/hub/devices/${enc(id)}/modules`);
}

// ---- twins, methods, messages --------------------------------------------------------------

const twinPath = (id, mid) => (mid ? `twins/${enc(id)}/modules/${enc(mid)}` : `twins/${enc(id)}`);

export async function getTwin(id, mid) {
  return json('GET', `${BASE}/hub/${twinPath(id, mid)}`);
}

/** PATCH the twin with If-Match; a stale etag throws ApiError with status 412. */
export async function patchTwin(id, patch, etag, mid) {
  return (await hub('PATCH', twinPath(id, mid), { body: patch, headers: { 'If-Match': quoteEtag(etag || '*') } })).data;
}

/** Invoke a direct method: {status, payload, elapsedMs}. */
export async function invokeMethod(id, mid, body) {
  const path = mid ? `twins/${enc(id)}/modules/${enc(mid)}/methods` : `twins/${enc(id)}/methods`;
  const r = await hub('POST', path, { body });
  return { ...(r.data || {}), elapsedMs: r.elapsedMs };
}

export async function sendC2d(id, body, mid) {
  const path = mid ? `devices/${enc(id)}/modules/${enc(mid)}/messages/deviceBound` : `devices/${enc(id)}/messages/deviceBound`;
  return (await hub('POST', path, { body })).data;
}

/** Feedback records waiting on the hub, locked under lockToken: {records, lockToken}, or null. */
export async function receiveFeedback() {
  const r = await hub('GET', 'messages/serviceBound/feedback');
  if (r.status === 204 || !r.data) return null;
  const etag = r.headers.get('iothub-locktoken') || (r.headers.get('ETag') || '').replace(/"/g, '');
  return { records: r.data, lockToken: etag };
}

export async function completeFeedback(lockToken) {
  await hub('DELETE', `messages/serviceBound/feedback/${enc(lockToken)}`);
}

/**
 * Reads the telemetry stream (NDJSON, one event a line) until `signal` aborts it or the hub ends
 * it. onEvent(event) for each line. Resolves when the stream ends.
 */
export async function streamEvents({ deviceId, moduleId, from, consumerGroup, signal, onEvent, onOpen }) {
  const q = new URLSearchParams();
  if (deviceId) q.set('deviceId', deviceId);
  if (moduleId) q.set('moduleId', moduleId);
  if (from) q.set('from', from);
  if (consumerGroup) q.set('consumerGroup', consumerGroup);
  const resp = await hub('GET', `events?${q}`, { raw: true, signal });
  if (onOpen) onOpen();
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let ev;
        try {
          ev = JSON.parse(line);
        } catch (_) {
          continue;
        }
        if (ev && typeof ev === 'object' && !Array.isArray(ev)) onEvent(ev);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// ---- statistics, models, digital twins -----------------------------------------------------

export const deviceStatistics = () => json('GET', `${BASE}/hub/statistics/devices`);
export const serviceStatistics = () => json('GET', `${BASE}/hub/statistics/service`);

export const listModels = () => json('GET', `${BASE}/hub/models`);
export const getModel = (id, expanded = false) =>
  json('GET', `${BASE}/hub/models/${enc(id)}${expanded ? '?expanded=true' : ''}`);
/** Add a DTDL document (one interface or an array): {ids, missing, new}. */
export const addModels = (text) => json('POST', `${BASE}/hub/models`, { body: text, contentType: 'application/json' });
export const removeModel = (id) => hub('DELETE', `models/${enc(id)}`);

export const getDigitalTwin = (id) => json('GET', `${BASE}/hub/digitaltwins/${enc(id)}`);
export const conformance = (id) => json('GET', `${BASE}/hub/digitaltwins/${enc(id)}/conformance`);

/** A Plug and Play command: {status, payload, elapsedMs}. */
export async function digitalTwinCommand(id, component, name, payload, { connectTimeout, responseTimeout } = {}) {
  const q = new URLSearchParams();
  if (connectTimeout) q.set('connectTimeoutInSeconds', String(connectTimeout));
  if (responseTimeout) q.set('responseTimeoutInSeconds', String(responseTimeout));
  const base = component
    ? `digitaltwins/${enc(id)}/components/${enc(component)}/commands/${enc(name)}`
    : `digitaltwins/${enc(id)}/commands/${enc(name)}`;
  const qs = q.toString();
  const r = await hub('POST', qs ? `${base}?${qs}` : base, { body: payload === undefined ? 'null' : JSON.stringify(payload) });
  const status = Number(r.headers.get('x-ms-command-statuscode'));
  return { status: Number.isFinite(status) && status ? status : r.status, payload: r.data, elapsedMs: r.elapsedMs };
}
