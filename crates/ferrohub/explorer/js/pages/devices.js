// Devices: a twin query built from the search form (or typed raw), paged with continuation
// tokens, refreshed every 5 s; create devices (SAS, self-signed X.509, CA X.509).

import * as api from '../api.js';
import { generateKey } from '../sas.js';
import { h, setChildren, fmtAgo, fmtTime, DASH, errorBox, toast, modal, field, connectionBadge, statusBadge, rightsNote } from '../util.js';

const POLL_MS = 5000;
const quote = (s) => `'${String(s).replace(/'/g, "''")}'`;

/** The WHERE clause of the search form (empty string for none). */
export function whereClause({ prefix, status, connection, tag, model }) {
  const c = [];
  if (prefix) c.push(`STARTSWITH(deviceId, ${quote(prefix)})`);
  if (status) c.push(`status = ${quote(status)}`);
  if (connection) c.push(`connectionState = ${quote(connection)}`);
  if (tag) {
    const m = /^\s*([\w.$-]+)\s*(=|!=|<>|<=|>=|<|>)\s*(.+?)\s*$/.exec(tag);
    if (m) {
      let v = m[3];
      if (!/^(-?\d+(\.\d+)?|true|false|null|'.*')$/.test(v)) v = quote(v.replace(/^"|"$/g, ''));
      c.push(`tags.${m[1]} ${m[2]} ${v}`);
    } else {
      c.push(`IS_DEFINED(tags.${tag.trim()})`);
    }
  }
  if (model) c.push(`modelId = ${quote(model)}`);
  return c.join(' AND ');
}

export async function render({ main, signal }) {
  const canWrite = api.can('RegistryWrite');
  const state = { pageSize: 20, pages: [null], index: 0, next: null, query: 'SELECT * FROM devices', busy: false };

  const inputs = {
    prefix: h('input', { type: 'search', placeholder: 'Device ID starts with…', testid: 'search-prefix' }),
    status: h('select', { testid: 'search-status' }, h('option', { value: '', text: 'Any status' }), h('option', { value: 'enabled', text: 'Enabled' }), h('option', { value: 'disabled', text: 'Disabled' })),
    connection: h('select', { testid: 'search-connection' }, h('option', { value: '', text: 'Any connection' }), h('option', { value: 'Connected', text: 'Connected' }), h('option', { value: 'Disconnected', text: 'Disconnected' })),
    tag: h('input', { type: 'search', placeholder: "Tag, e.g. location = 'lab'", testid: 'search-tag' }),
    model: h('input', { type: 'search', placeholder: 'Model ID (dtmi:…)', testid: 'search-model' }),
  };
  const raw = h('textarea.code', { rows: 2, spellcheck: 'false', testid: 'raw-query', value: state.query });
  const pageSize = h('select', { testid: 'page-size' }, [10, 20, 50, 100].map((n) => h('option', { value: String(n), text: `${n} per page`, selected: n === state.pageSize })));
  const tableBox = h('div.table-wrap');
  const info = h('span.muted', { testid: 'devices-info' });
  const errBox = h('div');
  const prevBtn = h('button.btn', { type: 'button', text: '‹ Previous', testid: 'page-prev', onclick: () => { if (state.index > 0) { state.index--; load(); } } });
  const nextBtn = h('button.btn', { type: 'button', text: 'Next ›', testid: 'page-next', onclick: () => { if (state.next) { state.pages[state.index + 1] = state.next; state.index++; load(); } } });

  function applyForm() {
    const where = whereClause(Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()])));
    state.query = `SELECT * FROM devices${where ? ` WHERE ${where}` : ''}`;
    raw.value = state.query;
    restart();
  }
  function restart() {
    state.pages = [null];
    state.index = 0;
    load();
  }

  const form = h('form.searchbar', {
    onsubmit: (ev) => { ev.preventDefault(); applyForm(); },
  }, inputs.prefix, inputs.status, inputs.connection, inputs.tag, inputs.model,
  h('button.btn.btn-primary', { type: 'submit', text: 'Search', testid: 'search-submit' }));
  for (const el of [inputs.status, inputs.connection]) el.addEventListener('change', applyForm);

  const rawForm = h('details.raw-query',
    h('summary', { text: 'Query' }),
    h('form', { onsubmit: (ev) => { ev.preventDefault(); state.query = raw.value.trim() || 'SELECT * FROM devices'; restart(); } },
      raw,
      h('div.row', h('button.btn', { type: 'submit', text: 'Run query', testid: 'raw-query-run' }),
        h('span.field-hint', { text: "IoT Hub query language over twins, e.g. SELECT * FROM devices WHERE tags.floor = 3 AND properties.reported.temperature > 20" }))));
  pageSize.addEventListener('change', () => { state.pageSize = Number(pageSize.value); restart(); });

  setChildren(main,
    h('div.page-head',
      h('div', h('h1', { text: 'Devices' }), h('p.page-sub', { text: 'Device identities and their twins, refreshed every 5 s.' })),
      canWrite ? h('button.btn.btn-primary', { type: 'button', text: '+ New device', testid: 'new-device', onclick: () => createDevice(restart) }) : null),
    canWrite ? null : rightsNote(`The policy ${api.currentSession().policy} has no RegistryWrite right: devices cannot be created, changed or deleted.`),
    h('section.card', form, rawForm),
    errBox,
    h('section.card.card-flush', tableBox,
      h('div.pager', info, h('div.spacer'), pageSize, prevBtn, nextBtn)));

  async function load(quiet = false) {
    if (state.busy) return;
    state.busy = true;
    try {
      const page = await api.queryDevices(state.query, state.pageSize, state.pages[state.index], signal);
      if (signal.aborted) return;
      errBox.replaceChildren();
      state.next = page.continuation;
      renderTable(page.items);
      prevBtn.disabled = state.index === 0;
      nextBtn.disabled = !state.next;
      const first = state.index * state.pageSize;
      info.textContent = page.items.length
        ? `Page ${state.index + 1} · devices ${first + 1}–${first + page.items.length}${state.next ? '' : ' (last page)'}`
        : 'No devices match.';
    } catch (e) {
      if (signal.aborted) return;
      if (!quiet) setChildren(errBox, errorBox(e, 'devices-error'));
    } finally {
      state.busy = false;
    }
  }

  function renderTable(items) {
    const isTwin = items.every((t) => t && typeof t === 'object' && 'deviceId' in t);
    if (!isTwin) {
      // A projection (SELECT deviceId, ... or COUNT()): show the rows as they are.
      const cols = [...new Set(items.flatMap((r) => (r && typeof r === 'object' ? Object.keys(r) : ['value'])))];
      setChildren(tableBox, h('table.table', { testid: 'devices-table' },
        h('thead', h('tr', cols.map((c) => h('th', { text: c })))),
        h('tbody', items.map((r) => h('tr', cols.map((c) => h('td', { text: r && typeof r === 'object' ? JSON.stringify(r[c] ?? null) : JSON.stringify(r) })))))));
      return;
    }
    setChildren(tableBox, h('table.table', { testid: 'devices-table' },
      h('thead', h('tr',
        h('th', { text: 'Device ID' }), h('th', { text: 'Status' }), h('th', { text: 'Connection' }),
        h('th', { text: 'Last activity' }), h('th', { text: 'Authentication' }), h('th', { text: 'Model' }),
        h('th.num', { text: 'C2D queued' }))),
      h('tbody', items.length ? items.map((t) => h('tr', { dataset: { deviceId: t.deviceId }, testid: 'device-row' },
        h('td', h('a.id-link', { href: `#/devices/${encodeURIComponent(t.deviceId)}`, text: t.deviceId })),
        h('td', statusBadge(t.status)),
        h('td', connectionBadge(t.connectionState)),
        h('td', { title: fmtTime(t.lastActivityTime), text: fmtAgo(t.lastActivityTime) }),
        h('td', { text: authLabel(t.authenticationType) }),
        h('td', t.modelId ? h('code.small', { text: t.modelId }) : DASH),
        h('td.num', { text: t.cloudToDeviceMessageCount ?? DASH })))
        : h('tr', h('td.empty', { colspan: 7, text: 'No devices match this query.' })))));
  }

  await load();
  const timer = setInterval(() => { if (!document.hidden) load(true); }, POLL_MS);
  signal.addEventListener('abort', () => clearInterval(timer));
}

export function authLabel(t) {
  return { sas: 'Symmetric key', selfSigned: 'X.509 self-signed', certificateAuthority: 'X.509 CA', none: 'None' }[t] || t || DASH;
}

/** The create dialog for a device (or a module of `deviceId`); done() after success. */
export function createDevice(done, deviceId) {
  const isModule = !!deviceId;
  const idInput = h('input', { required: true, maxlength: 128, testid: 'create-id', placeholder: isModule ? 'module-1' : 'my-device', autocomplete: 'off' });
  const authSel = h('div.radios', [
    ['sas', 'Symmetric key'], ['selfSigned', 'X.509 self-signed'], ['certificateAuthority', 'X.509 CA signed'],
  ].map(([v, l], i) => h('label.radio', h('input', { type: 'radio', name: 'auth', value: v, checked: i === 0, testid: `create-auth-${v}` }), h('span', { text: l }))));
  const auto = h('input', { type: 'checkbox', checked: true, testid: 'create-autokeys' });
  const pk = h('input.code', { testid: 'create-primary-key', value: generateKey(), readOnly: true });
  const sk = h('input.code', { testid: 'create-secondary-key', value: generateKey(), readOnly: true });
  auto.addEventListener('change', () => {
    pk.readOnly = sk.readOnly = auto.checked;
    if (auto.checked) { pk.value = generateKey(); sk.value = generateKey(); }
  });
  const pt = h('input.code', { testid: 'create-primary-thumbprint', placeholder: 'SHA-1 or SHA-256 hex', pattern: '[0-9A-Fa-f:]{40,95}' });
  const st = h('input.code', { testid: 'create-secondary-thumbprint', placeholder: 'SHA-1 or SHA-256 hex', pattern: '[0-9A-Fa-f:]{40,95}' });
  const enabled = h('input', { type: 'checkbox', checked: true, testid: 'create-enabled' });
  const sasBox = h('div.fieldset', h('label.check', auto, h('span', { text: 'Generate keys (32 random bytes each, in this browser)' })), field('Primary key', pk), field('Secondary key', sk));
  const x509Box = h('div.fieldset', field('Primary thumbprint', pt), field('Secondary thumbprint', st));
  const caBox = h('div.fieldset', h('p.muted', { text: 'The device authenticates with a certificate chained to a CA certificate verified on the hub; nothing to enter here.' }));
  const msg = h('div');
  const authValue = () => authSel.querySelector('input:checked').value;
  const sync = () => {
    const a = authValue();
    sasBox.hidden = a !== 'sas';
    x509Box.hidden = a !== 'selfSigned';
    caBox.hidden = a !== 'certificateAuthority';
    pt.required = a === 'selfSigned';
  };
  authSel.addEventListener('change', sync);
  const submit = h('button.btn.btn-primary', { type: 'submit', text: isModule ? 'Create module' : 'Create device', testid: 'create-submit' });
  const form = h('form.form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      msg.replaceChildren();
      const a = authValue();
      const id = idInput.value.trim();
      const authentication = { type: a };
      if (a === 'sas') authentication.symmetricKey = { primaryKey: pk.value.trim(), secondaryKey: sk.value.trim() };
      if (a === 'selfSigned') authentication.x509Thumbprint = { primaryThumbprint: pt.value.replace(/:/g, '').trim(), secondaryThumbprint: st.value.replace(/:/g, '').trim() || null };
      const body = isModule
        ? { deviceId, moduleId: id, authentication }
        : { deviceId: id, status: enabled.checked ? 'enabled' : 'disabled', authentication };
      submit.disabled = true;
      try {
        await api.putIdentity(body);
        toast(`${isModule ? 'Module' : 'Device'} ${id} created`);
        close();
        done(id);
      } catch (e) {
        msg.append(errorBox(e, 'create-error'));
      } finally {
        submit.disabled = false;
      }
    },
  },
  field(isModule ? 'Module ID' : 'Device ID', idInput, 'Up to 128 characters: letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ \''),
  field('Authentication', authSel),
  sasBox, x509Box, caBox,
  isModule ? null : h('label.check', enabled, h('span', { text: 'Enabled: the device may connect' })),
  msg,
  h('div.actions', h('button.btn', { type: 'button', text: 'Cancel', onclick: () => close() }), submit));
  sync();
  const { close } = modal(isModule ? `New module of ${deviceId}` : 'New device', form);
  setTimeout(() => idInput.focus(), 0);
}
