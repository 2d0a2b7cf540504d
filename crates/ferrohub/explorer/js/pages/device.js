// One device (or module): identity, twin, telemetry, cloud-to-device, direct methods, modules
// and IoT Plug and Play, one tab each (#/devices/<id>/<tab>, #/devices/<id>/modules/<mid>/<tab>).

import * as api from '../api.js';
import { generateKey, connectionString, sasToken } from '../sas.js';
import { h, setChildren, fmtTime, fmtAgo, DASH, errorBox, toast, confirmDialog, copyButton, field, connectionBadge, statusBadge, rightsNote, pretty, uuid, badge } from '../util.js';
import { authLabel, createDevice } from './devices.js';
import { twinEditor } from '../twin.js';
import { telemetryView } from '../telemetry.js';
import { pnpView } from '../pnp.js';

const enc = encodeURIComponent;

export async function render({ main, params, signal }) {
  const { deviceId, moduleId } = params;
  const base = moduleId ? `#/devices/${enc(deviceId)}/modules/${enc(moduleId)}` : `#/devices/${enc(deviceId)}`;
  let identity;
  try {
    identity = await api.getDevice(deviceId, moduleId);
  } catch (e) {
    setChildren(main, crumbs(deviceId, moduleId), errorBox(e, 'device-error'));
    return;
  }
  if (signal.aborted) return;
  // The model id is on the twin; a query needs only RegistryRead (GET twins needs ServiceConnect).
  let modelId = null;
  if (!moduleId) {
    try {
      const q = await api.queryDevices(`SELECT * FROM devices WHERE deviceId = '${deviceId.replace(/'/g, "''")}'`, 1, null, signal);
      modelId = (q.items[0] && q.items[0].modelId) || null;
    } catch (_) { /* no model shown */ }
  }
  const tabs = [
    ['identity', 'Identity'],
    ['twin', 'Twin'],
    ['telemetry', 'Telemetry'],
    ['c2d', 'Cloud-to-device'],
    ['methods', 'Direct method'],
    ...(moduleId ? [] : [['modules', 'Modules']]),
    ...(modelId ? [['pnp', 'Plug and Play']] : []),
  ];
  const tab = tabs.some(([t]) => t === params.tab) ? params.tab : 'identity';
  const statusEl = h('span.head-badges');
  const paintHead = () => setChildren(statusEl, statusBadge(identity.status), connectionBadge(identity.connectionState),
    modelId ? h('code.small.model-chip', { text: modelId }) : null);
  paintHead();
  const body = h('div.tab-body', { testid: `tab-${tab}` });
  setChildren(main,
    crumbs(deviceId, moduleId),
    h('div.page-head', h('div', h('h1.device-title', { testid: 'device-title' }, moduleId ? `${deviceId} / ${moduleId}` : deviceId), statusEl)),
    h('nav.tabs', { role: 'tablist' }, tabs.map(([t, label]) => h('a.tab', { href: `${base}/${t}`, class: t === tab ? 'active' : '', role: 'tab', testid: `tab-link-${t}`, text: label }))),
    body);

  const ctx = { deviceId, moduleId, identity, signal, body, modelId, base, refresh: async () => {
    identity = await api.getDevice(deviceId, moduleId);
    ctx.identity = identity;
    paintHead();
    return identity;
  } };
  const needService = (what) => rightsNote(`The policy ${api.currentSession().policy} has no ServiceConnect right: ${what} needs it.`);
  switch (tab) {
    case 'identity': return identityTab(ctx);
    case 'twin': return api.can('ServiceConnect') ? twinEditor(ctx) : body.append(needService('reading and editing the twin'));
    case 'telemetry': return api.can('ServiceConnect') ? telemetryView(body, { deviceId, moduleId, signal }) : body.append(needService('the telemetry stream'));
    case 'c2d': return api.can('ServiceConnect') ? c2dTab(ctx) : body.append(needService('sending cloud-to-device messages'));
    case 'methods': return api.can('ServiceConnect') ? methodTab(ctx) : body.append(needService('invoking direct methods'));
    case 'modules': return modulesTab(ctx);
    case 'pnp': return pnpView(ctx);
    default: return null;
  }
}

function crumbs(deviceId, moduleId) {
  return h('nav.crumbs', { 'aria-label': 'Breadcrumb' },
    h('a', { href: '#/devices', text: 'Devices' }), h('span.sep', { text: '›' }),
    moduleId ? [h('a', { href: `#/devices/${enc(deviceId)}/modules`, text: deviceId }), h('span.sep', { text: '›' }), h('span', { text: moduleId })] : h('span', { text: deviceId }));
}

const kv = (rows) => h('table.kv', h('tbody', rows.filter(Boolean).map(([k, v, testid]) => h('tr', h('th', { text: k }), h('td', { testid }, v instanceof Node ? v : String(v ?? DASH))))));

function secret(value, testid) {
  const input = h('input.code.secret', { type: 'password', value, readOnly: true, testid, autocomplete: 'off', spellcheck: 'false' });
  const toggle = h('button.btn.btn-small', { type: 'button', text: 'Show', onclick: () => {
    input.type = input.type === 'password' ? 'text' : 'password';
    toggle.textContent = input.type === 'password' ? 'Show' : 'Hide';
  } });
  return h('div.secret-row', input, toggle, copyButton(() => input.value, 'Copy', testid ? `${testid}-copy` : undefined));
}

function identityTab(ctx) {
  const { body, deviceId, moduleId } = ctx;
  const canWrite = api.can('RegistryWrite');
  const host = api.currentSession().hostName;
  const paint = () => {
    const d = ctx.identity;
    const auth = d.authentication || {};
    const sym = auth.symmetricKey || {};
    const x = auth.x509Thumbprint || {};
    const actions = h('div.actions.actions-left');
    if (canWrite) {
      if (!moduleId) {
        actions.append(h('button.btn', {
          type: 'button', testid: 'toggle-status', text: d.status === 'enabled' ? 'Disable device' : 'Enable device',
          onclick: () => update({ status: d.status === 'enabled' ? 'disabled' : 'enabled' }, d.status === 'enabled' ? 'Device disabled' : 'Device enabled'),
        }));
      }
      if (auth.type === 'sas') {
        actions.append(
          h('button.btn', { type: 'button', testid: 'regen-primary', text: 'Regenerate primary key', onclick: () => regen(['primaryKey']) }),
          h('button.btn', { type: 'button', testid: 'regen-secondary', text: 'Regenerate secondary key', onclick: () => regen(['secondaryKey']) }),
          h('button.btn', { type: 'button', testid: 'swap-keys', text: 'Swap keys', onclick: () => update({ authentication: { ...auth, symmetricKey: { primaryKey: sym.secondaryKey, secondaryKey: sym.primaryKey } } }, 'Keys swapped') }));
      }
      actions.append(h('button.btn.btn-danger', { type: 'button', testid: 'delete-identity', text: moduleId ? 'Delete module' : 'Delete device', onclick: remove }));
    }
    const sections = [
      h('section.card',
        h('div.card-head', h('h2', { text: 'Identity' })),
        kv([
          ['Device ID', h('code', { text: d.deviceId })],
          moduleId ? ['Module ID', h('code', { text: d.moduleId })] : null,
          moduleId ? null : ['Status', statusBadge(d.status), 'identity-status'],
          d.statusReason ? ['Status reason', d.statusReason] : null,
          ['Connection state', connectionBadge(d.connectionState)],
          ['Connection state changed', fmtTime(d.connectionStateUpdatedTime)],
          ['Last activity', `${fmtTime(d.lastActivityTime)} (${fmtAgo(d.lastActivityTime)})`],
          ['Authentication', authLabel(auth.type), 'identity-auth'],
          ['Cloud-to-device queued', d.cloudToDeviceMessageCount],
          d.capabilities ? ['IoT Edge', d.capabilities.iotEdge ? 'yes' : 'no'] : null,
          d.managedBy ? ['Managed by', d.managedBy] : null,
          ['Generation ID', h('code.small', { text: d.generationId || DASH })],
          ['ETag', h('code.small', { text: d.etag || DASH }), 'identity-etag'],
        ]),
        canWrite ? actions : rightsNote(`The policy ${api.currentSession().policy} has no RegistryWrite right: the identity cannot be changed or deleted.`)),
    ];
    const side = [];
    if (auth.type === 'sas') {
      side.push(h('section.card',
        h('div.card-head', h('h2', { text: 'Keys and connection strings' })),
        field('Primary key', secret(sym.primaryKey || '', 'key-primary')),
        field('Secondary key', secret(sym.secondaryKey || '', 'key-secondary')),
        field('Primary connection string', secret(connectionString(host, deviceId, sym.primaryKey, moduleId), 'cs-primary')),
        field('Secondary connection string', secret(connectionString(host, deviceId, sym.secondaryKey, moduleId), 'cs-secondary'))));
      side.push(sasGenerator(host, deviceId, moduleId, sym));
    } else if (auth.type === 'selfSigned') {
      side.push(h('section.card', h('div.card-head', h('h2', { text: 'X.509 thumbprints' })),
        kv([['Primary thumbprint', h('code', { text: x.primaryThumbprint || DASH })], ['Secondary thumbprint', h('code', { text: x.secondaryThumbprint || DASH })]])));
    }
    if (side.length) sections.push(h('div.stack', side));
    setChildren(body, h('div.grid-2.grid-top', sections));
  };

  async function update(changes, done) {
    try {
      const next = { ...ctx.identity, ...changes };
      await api.putIdentity(next, ctx.identity.etag);
      await ctx.refresh();
      paint();
      toast(done);
    } catch (e) {
      toast(`${e.status ? `${e.status}: ` : ''}${e.message}`, 'error');
      if (e.status === 412) { await ctx.refresh(); paint(); }
    }
  }
  async function regen(which) {
    if (!(await confirmDialog('Regenerate key', `The ${which.includes('primaryKey') ? 'primary' : 'secondary'} key is replaced: clients that use it can no longer connect with it.`, 'Regenerate'))) return;
    const sym = { ...(ctx.identity.authentication.symmetricKey || {}) };
    for (const k of which) sym[k] = generateKey();
    await update({ authentication: { ...ctx.identity.authentication, symmetricKey: sym } }, 'Key regenerated');
  }
  async function remove() {
    const what = moduleId ? `module ${moduleId} of ${deviceId}` : `device ${deviceId}`;
    if (!(await confirmDialog(`Delete ${moduleId ? 'module' : 'device'}`, `Delete ${what}? Its twin and queued messages go with it.`, 'Delete'))) return;
    try {
      await api.deleteIdentity(deviceId, moduleId, ctx.identity.etag || '*');
      toast(`Deleted ${what}`);
      location.hash = moduleId ? `#/devices/${enc(deviceId)}/modules` : '#/devices';
    } catch (e) {
      toast(`${e.status ? `${e.status}: ` : ''}${e.message}`, 'error');
    }
  }
  paint();
}

function sasGenerator(host, deviceId, moduleId, sym) {
  const which = h('select', { testid: 'sas-key' }, h('option', { value: 'primaryKey', text: 'Primary key' }), h('option', { value: 'secondaryKey', text: 'Secondary key' }));
  const ttl = h('input', { type: 'number', min: 1, value: 60, testid: 'sas-ttl' });
  const out = h('textarea.code', { rows: 3, readOnly: true, testid: 'sas-token', placeholder: 'The token appears here' });
  const expiry = h('span.field-hint');
  return h('section.card',
    h('div.card-head', h('h2', { text: 'SAS token' })),
    h('p.muted', { text: 'Signed in this browser with HMAC-SHA256 (WebCrypto); the key never leaves the page.' }),
    h('form.row', {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const r = await sasToken(host, deviceId, sym[which.value], Number(ttl.value) * 60, moduleId);
        out.value = r.token;
        expiry.textContent = `Expires ${r.expiry.toLocaleString()}`;
      },
    }, field('Key', which), field('Valid for (minutes)', ttl), h('button.btn.btn-primary.self-end', { type: 'submit', text: 'Generate', testid: 'sas-generate' })),
    out, h('div.row', expiry, h('div.spacer'), copyButton(() => out.value, 'Copy token')));
}

// ---- cloud-to-device -----------------------------------------------------------------------

function c2dTab(ctx) {
  const { body, deviceId, moduleId } = ctx;
  const payload = h('textarea.code', { rows: 6, spellcheck: 'false', testid: 'c2d-payload', value: '{\n  "hello": "device"\n}' });
  const msgId = h('input.code', { value: uuid(), testid: 'c2d-message-id' });
  const corr = h('input.code', { testid: 'c2d-correlation-id', placeholder: 'optional' });
  const ctype = h('input', { value: 'application/json', testid: 'c2d-content-type' });
  const cenc = h('input', { value: 'utf-8', testid: 'c2d-content-encoding' });
  const ack = h('select', { testid: 'c2d-ack' }, [['none', 'None'], ['positive', 'Positive (completed)'], ['negative', 'Negative (expired, rejected)'], ['full', 'Full (both)']].map(([v, l]) => h('option', { value: v, text: l })));
  const ttl = h('input', { type: 'number', min: 1, max: 172800, placeholder: 'hub default', testid: 'c2d-ttl' });
  const expiresAt = h('input', { type: 'datetime-local', step: 1, testid: 'c2d-expires-at' });
  ttl.addEventListener('input', () => { if (ttl.value) expiresAt.value = ''; });
  expiresAt.addEventListener('input', () => { if (expiresAt.value) ttl.value = ''; });
  const props = h('div.props', { testid: 'c2d-props' });
  const addProp = (k = '', v = '') => {
    const row = h('div.prop-row', h('input', { placeholder: 'name', value: k, testid: 'c2d-prop-name' }), h('input', { placeholder: 'value', value: v, testid: 'c2d-prop-value' }),
      h('button.icon-btn', { type: 'button', 'aria-label': 'Remove', text: '×', onclick: () => row.remove() }));
    props.append(row);
  };
  addProp();
  const msg = h('div');
  const sent = [];
  const sentBody = h('tbody');
  const feedbackBody = h('tbody');
  const paintSent = () => setChildren(sentBody, sent.length ? sent.map((s) => h('tr', { testid: 'c2d-sent-row', dataset: { messageId: s.messageId } },
    h('td', { text: fmtTime(s.enqueuedTimeUtc, false) }), h('td', h('code.small', { text: s.messageId })), h('td', { text: s.ack }),
    h('td', { text: s.sequenceNumber ?? DASH }), h('td', { testid: 'c2d-feedback' }, s.feedback ? badge(s.feedback, s.feedback === 'Success' ? 'ok' : 'warn') : (s.ack === 'none' ? DASH : h('span.muted', { text: 'waiting…' })))))
    : h('tr', h('td.empty', { colspan: 5, text: 'Nothing sent from this page yet.' })));
  paintSent();
  const send = h('button.btn.btn-primary', { type: 'submit', text: 'Send message', testid: 'c2d-send' });
  const form = h('form.form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      msg.replaceChildren();
      const b = { payload: payload.value, messageId: msgId.value.trim() || undefined, ack: ack.value, properties: {} };
      if (corr.value.trim()) b.correlationId = corr.value.trim();
      if (ctype.value.trim()) b.contentType = ctype.value.trim();
      if (cenc.value.trim()) b.contentEncoding = cenc.value.trim();
      if (ttl.value) b.ttlSeconds = Number(ttl.value);
      else if (expiresAt.value) b.expiryTimeUtc = new Date(expiresAt.value).toISOString();
      for (const row of props.querySelectorAll('.prop-row')) {
        const [k, v] = row.querySelectorAll('input');
        if (k.value.trim()) b.properties[k.value.trim()] = v.value;
      }
      send.disabled = true;
      try {
        const r = await api.sendC2d(deviceId, b, moduleId);
        sent.unshift({ ...r, ack: ack.value });
        paintSent();
        msg.append(h('div.alert.alert-ok', { testid: 'c2d-result', text: `Queued: message ${r.messageId}, sequence number ${r.sequenceNumber}, expires ${fmtTime(r.expiryTimeUtc)}` }));
        msgId.value = uuid();
      } catch (e) {
        msg.append(errorBox(e, 'c2d-error'));
      } finally {
        send.disabled = false;
      }
    },
  },
  field('Payload', payload, 'Sent as its UTF-8 text.'),
  h('div.grid-2', field('Message ID', msgId), field('Correlation ID', corr), field('Content type', ctype), field('Content encoding', cenc),
    field('Acknowledgement (feedback)', ack), field('Time to live (seconds)', ttl, 'Up to 2 days; empty: the hub default.'),
    h('div'), field('Or expires at', expiresAt, 'An absolute expiry (your local time).')),
  h('div.field', h('span.field-label', { text: 'Application properties' }), props,
    h('button.btn.btn-small', { type: 'button', text: '+ Property', testid: 'c2d-add-prop', onclick: () => addProp() })),
  msg,
  h('div.actions.actions-left', send));

  // Feedback: the hub's feedback queue is shared by every sender of the hub; records for
  // messages sent here are matched by message id, all are listed.
  async function pollFeedback() {
    try {
      const batch = await api.receiveFeedback();
      if (!batch) return;
      for (const r of batch.records) {
        const s = sent.find((x) => x.messageId === r.originalMessageId);
        if (s) s.feedback = r.statusCode;
        feedbackBody.prepend(h('tr', { testid: 'feedback-row' }, h('td', { text: fmtTime(r.enqueuedTimeUtc, false) }), h('td', h('code.small', { text: r.originalMessageId })),
          h('td', { text: r.deviceId }), h('td', { text: r.statusCode }), h('td', { text: r.description || '' })));
      }
      if (batch.lockToken) await api.completeFeedback(batch.lockToken);
      paintSent();
    } catch (_) { /* try again next time */ }
  }
  const timer = setInterval(() => {
    if (sent.some((s) => s.ack !== 'none' && !s.feedback)) pollFeedback();
  }, 3000);
  ctx.signal.addEventListener('abort', () => clearInterval(timer));

  setChildren(body, h('div.grid-2.grid-top',
    h('section.card', h('div.card-head', h('h2', { text: 'Send a message to the device' })), form),
    h('div.stack',
      h('section.card.card-flush', h('div.card-head', h('h2', { text: 'Sent from here' })),
        h('table.table.table-compact', h('thead', h('tr', ['Enqueued', 'Message ID', 'Ack', 'Seq', 'Feedback'].map((t) => h('th', { text: t })))), sentBody)),
      h('section.card.card-flush', h('div.card-head', h('h2', { text: 'Feedback received' }), h('button.btn.btn-small', { type: 'button', text: 'Check now', testid: 'feedback-check', onclick: pollFeedback })),
        h('table.table.table-compact', h('thead', h('tr', ['Time', 'Message ID', 'Device', 'Status', 'Description'].map((t) => h('th', { text: t })))), feedbackBody)))));
}

// ---- direct methods ------------------------------------------------------------------------

function methodTab(ctx) {
  const { body, deviceId, moduleId } = ctx;
  const name = h('input', { required: true, placeholder: 'reboot', testid: 'method-name' });
  const payload = h('textarea.code', { rows: 6, spellcheck: 'false', testid: 'method-payload', value: '{}' });
  const respTimeout = h('input', { type: 'number', min: 5, max: 300, value: 30, testid: 'method-response-timeout' });
  const connTimeout = h('input', { type: 'number', min: 0, max: 300, value: 0, testid: 'method-connect-timeout' });
  const result = h('div', { testid: 'method-result-box' });
  const invoke = h('button.btn.btn-primary', { type: 'submit', text: 'Invoke method', testid: 'method-invoke' });
  const history = h('tbody');
  const form = h('form.form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      let p;
      try {
        p = payload.value.trim() ? JSON.parse(payload.value) : null;
      } catch (e) {
        setChildren(result, errorBox(new Error(`The payload is not JSON: ${e.message}`), 'method-error'));
        return;
      }
      invoke.disabled = true;
      setChildren(result, h('div.muted', { text: `Waiting for ${deviceId} to answer ${name.value}…` }));
      const started = performance.now();
      try {
        const r = await api.invokeMethod(deviceId, moduleId, {
          methodName: name.value.trim(), payload: p,
          responseTimeoutInSeconds: Number(respTimeout.value) || undefined,
          connectTimeoutInSeconds: Number(connTimeout.value) || 0,
        });
        const ms = Math.round(r.elapsedMs ?? performance.now() - started);
        setChildren(result, h('div.result',
          h('div.result-head', h('span', {}, 'Status ', h('strong', { testid: 'method-status', text: String(r.status) })), h('span.muted', { testid: 'method-latency', text: `${ms} ms` })),
          h('pre.code', { testid: 'method-payload-out', text: pretty(r.payload) })));
        history.prepend(h('tr', h('td', { text: new Date().toLocaleTimeString() }), h('td', { text: name.value }), h('td', { text: String(r.status) }), h('td.num', { text: `${ms} ms` })));
      } catch (e) {
        const ms = Math.round(performance.now() - started);
        setChildren(result, errorBox(e, 'method-error'), h('div.muted', { text: `after ${ms} ms` }));
        history.prepend(h('tr', h('td', { text: new Date().toLocaleTimeString() }), h('td', { text: name.value }), h('td', { text: `error ${e.status || ''}` }), h('td.num', { text: `${ms} ms` })));
      } finally {
        invoke.disabled = false;
      }
    },
  },
  field('Method name', name),
  field('Payload (JSON)', payload),
  h('div.grid-2', field('Response timeout (s)', respTimeout, 'How long the hub waits for the answer.'), field('Connect timeout (s)', connTimeout, 'How long to wait for an offline device to connect.')),
  h('div.actions.actions-left', invoke));
  setChildren(body, h('div.grid-2.grid-top',
    h('section.card', h('div.card-head', h('h2', { text: 'Invoke a direct method' })), form),
    h('div.stack',
      h('section.card', h('div.card-head', h('h2', { text: 'Answer' })), result),
      h('section.card.card-flush', h('div.card-head', h('h2', { text: 'History' })),
        h('table.table.table-compact', h('thead', h('tr', ['Time', 'Method', 'Status', 'Latency'].map((t) => h('th', { text: t })))), history)))));
}

// ---- modules -------------------------------------------------------------------------------

async function modulesTab(ctx) {
  const { body, deviceId, signal } = ctx;
  const canWrite = api.can('RegistryWrite');
  const host = api.currentSession().hostName;
  const tableBox = h('div.table-wrap');
  const load = async () => {
    try {
      const mods = await api.listModules(deviceId);
      if (signal.aborted) return;
      setChildren(tableBox, h('table.table', { testid: 'modules-table' },
        h('thead', h('tr', ['Module ID', 'Connection', 'Last activity', 'Authentication', 'Managed by', ''].map((t) => h('th', { text: t })))),
        h('tbody', mods.length ? mods.map((m) => h('tr', { testid: 'module-row', dataset: { moduleId: m.moduleId } },
          h('td', h('a.id-link', { href: `#/devices/${enc(deviceId)}/modules/${enc(m.moduleId)}`, text: m.moduleId })),
          h('td', connectionBadge(m.connectionState)),
          h('td', { text: fmtAgo(m.lastActivityTime) }),
          h('td', { text: authLabel(m.authentication && m.authentication.type) }),
          h('td', { text: m.managedBy || DASH }),
          h('td.row-actions',
            m.authentication && m.authentication.type === 'sas' ? copyButton(() => connectionString(host, deviceId, m.authentication.symmetricKey.primaryKey, m.moduleId), 'Copy connection string') : null,
            canWrite ? h('button.btn.btn-small.btn-danger', { type: 'button', text: 'Delete', onclick: async () => {
              if (!(await confirmDialog('Delete module', `Delete module ${m.moduleId} of ${deviceId}?`, 'Delete'))) return;
              try { await api.deleteIdentity(deviceId, m.moduleId, m.etag || '*'); toast(`Deleted module ${m.moduleId}`); load(); } catch (e) { toast(e.message, 'error'); }
            } }) : null)))
          : h('tr', h('td.empty', { colspan: 6, text: 'This device has no modules.' })))));
    } catch (e) {
      setChildren(tableBox, errorBox(e, 'modules-error'));
    }
  };
  setChildren(body,
    h('section.card.card-flush',
      h('div.card-head', h('h2', { text: 'Module identities' }),
        canWrite ? h('button.btn.btn-primary.btn-small', { type: 'button', text: '+ New module', testid: 'new-module', onclick: () => createDevice(load, deviceId) }) : null),
      canWrite ? null : rightsNote('No RegistryWrite right: modules cannot be created or deleted.'),
      tableBox));
  await load();
}
