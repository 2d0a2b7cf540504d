// IoT Plug and Play view of a device whose twin has a modelId: the model's components, each
// property (reported, desired, ack code/version/description, in sync or not), commands as forms
// built from their request schema, telemetry charted by the model's names and units, and the
// hub's live conformance findings.

import * as api from './api.js';
import { telemetryView } from './telemetry.js';
import { h, setChildren, errorBox, toast, pretty, deepEqual, isPlainObject, fmtTime, DASH, badge, rightsNote } from './util.js';

const UNITS = {
  degreeCelsius: '°C', degreeFahrenheit: '°F', kelvin: 'K', percent: '%', kilobyte: 'kB', megabyte: 'MB', gigabyte: 'GB',
  byte: 'B', kibibyte: 'KiB', mebibyte: 'MiB', gibibyte: 'GiB', bit: 'bit', kilobit: 'kbit', megabit: 'Mbit',
  bytePerSecond: 'B/s', kilobytePerSecond: 'kB/s', megabytePerSecond: 'MB/s', degreeOfArc: '°', radian: 'rad', second: 's', millisecond: 'ms', minute: 'min', hour: 'h', metre: 'm', kilometre: 'km', volt: 'V', ampere: 'A',
  watt: 'W', kilowatt: 'kW', hertz: 'Hz', pascal: 'Pa', kilopascal: 'kPa', bar: 'bar', lux: 'lx', metrePerSecond: 'm/s',
  kilometrePerHour: 'km/h', litre: 'L', gram: 'g', kilogram: 'kg', decibel: 'dB', revolutionPerMinute: 'rpm',
};
export const unitSymbol = (u) => (u ? UNITS[u] || u : '');

const types = (c) => (Array.isArray(c['@type']) ? c['@type'] : [c['@type']]);
const isA = (c, t) => types(c).includes(t);
const label = (c) => {
  const d = c.displayName;
  if (typeof d === 'string') return d;
  if (isPlainObject(d)) return d.en || Object.values(d)[0] || c.name;
  return c.name;
};
const text = (v) => (typeof v === 'string' ? v : isPlainObject(v) ? v.en || Object.values(v)[0] : '');

export function schemaText(s) {
  if (typeof s === 'string') return s.replace(/^dtmi:dtdl:instance:Schema:/, '');
  if (!isPlainObject(s)) return DASH;
  const t = s['@type'];
  if (t === 'Object') return `Object{${(s.fields || []).map((f) => `${f.name}: ${schemaText(f.schema)}`).join(', ')}}`;
  if (t === 'Enum') return `Enum(${(s.enumValues || []).map((e) => e.name).join(' | ')})`;
  if (t === 'Map') return `Map<${schemaText(s.mapKey && s.mapKey.schema)}, ${schemaText(s.mapValue && s.mapValue.schema)}>`;
  if (t === 'Array') return `Array<${schemaText(s.elementSchema)}>`;
  return String(t || 'schema');
}

/** The interfaces of a model document (one interface, or an array as the expanded form). */
function interfacesOf(doc) {
  const list = Array.isArray(doc) ? doc : [doc];
  const byId = new Map();
  for (const i of list) if (i && i['@id']) byId.set(i['@id'], i);
  return byId;
}

/** All contents of an interface, including those of the interfaces it extends. */
function contentsOf(iface, byId, seen = new Set()) {
  if (!iface || seen.has(iface['@id'])) return [];
  seen.add(iface['@id']);
  const ext = iface.extends ? (Array.isArray(iface.extends) ? iface.extends : [iface.extends]) : [];
  const inherited = ext.flatMap((e) => contentsOf(typeof e === 'string' ? byId.get(e) : e, byId, seen));
  return [...inherited, ...(iface.contents || [])];
}

/** Components: [{name (null = default component), label, iface, contents}]. */
export function componentsOf(modelId, doc) {
  const byId = interfacesOf(doc);
  const root = byId.get(modelId) || (Array.isArray(doc) ? doc[0] : doc);
  const all = contentsOf(root, byId);
  const comps = [{ name: null, label: 'Default component', iface: root, contents: all.filter((c) => !isA(c, 'Component')) }];
  for (const c of all.filter((x) => isA(x, 'Component'))) {
    const iface = typeof c.schema === 'string' ? byId.get(c.schema) : c.schema;
    comps.push({ name: c.name, label: label(c), iface: iface || { '@id': c.schema }, schemaId: typeof c.schema === 'string' ? c.schema : iface && iface['@id'], contents: iface ? contentsOf(iface, byId) : [], missing: !iface });
  }
  return { root, comps };
}

/** An input for a primitive schema; returns {el, read()}. */
function inputFor(schema, name) {
  const s = typeof schema === 'string' ? schema : isPlainObject(schema) ? schema['@type'] : '';
  if (['double', 'float', 'integer', 'long'].includes(s)) {
    const el = h('input', { type: 'number', step: s === 'integer' || s === 'long' ? 1 : 'any', testid: `cmd-input-${name}` });
    return { el, read: () => (el.value === '' ? undefined : Number(el.value)) };
  }
  if (s === 'boolean') {
    const el = h('input', { type: 'checkbox', testid: `cmd-input-${name}` });
    return { el, read: () => el.checked };
  }
  if (s === 'dateTime') {
    const el = h('input', { type: 'datetime-local', step: 1, testid: `cmd-input-${name}` });
    const d = new Date(Date.now() - 3600e3);
    el.value = new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
    return { el, read: () => (el.value ? new Date(el.value).toISOString() : undefined) };
  }
  if (s === 'Enum' && isPlainObject(schema)) {
    const el = h('select', { testid: `cmd-input-${name}` }, (schema.enumValues || []).map((e) => h('option', { value: JSON.stringify(e.enumValue), text: label(e) })));
    return { el, read: () => JSON.parse(el.value) };
  }
  if (['string', 'date', 'time', 'duration'].includes(s)) {
    const el = h('input', { type: 'text', testid: `cmd-input-${name}`, placeholder: s });
    return { el, read: () => (el.value === '' ? undefined : el.value) };
  }
  const el = h('textarea.code', { rows: 4, testid: `cmd-input-${name}`, placeholder: `JSON (${schemaText(schema)})` });
  return { el, read: () => (el.value.trim() ? JSON.parse(el.value) : undefined) };
}

/** The form for a command's request: fields of an Object, or one input. read() -> payload. */
function requestForm(req) {
  if (!req) return { el: h('p.muted', { text: 'No request payload.' }), read: () => undefined };
  const sch = req.schema;
  if (isPlainObject(sch) && sch['@type'] === 'Object') {
    const inputs = (sch.fields || []).map((f) => ({ f, ...inputFor(f.schema, f.name) }));
    return {
      el: h('div.fieldset', inputs.map(({ f, el }) => h('label.field', h('span.field-label', { text: `${label(f)} (${f.name}: ${schemaText(f.schema)})` }), el))),
      read: () => Object.fromEntries(inputs.map(({ f, read }) => [f.name, read()]).filter(([, v]) => v !== undefined)),
    };
  }
  const inp = inputFor(sch, req.name);
  return { el: h('label.field', h('span.field-label', { text: `${label(req)} (${req.name}: ${schemaText(sch)})` }), inp.el, text(req.description) ? h('span.field-hint', { text: text(req.description) }) : null), read: inp.read };
}

function syncState(desired, rep) {
  if (desired === undefined) return { text: DASH, kind: 'muted' };
  if (!isPlainObject(rep) || !('ac' in rep)) return { text: 'pending', kind: 'warn' };
  if (rep.ac >= 400) return { text: `rejected (${rep.ac})`, kind: 'error' };
  if (deepEqual(rep.value, desired) && rep.ac >= 200 && rep.ac < 300) return { text: 'in sync', kind: 'ok' };
  return { text: 'out of sync', kind: 'warn' };
}

const show = (v) => (v === undefined ? DASH : typeof v === 'string' ? v : JSON.stringify(v));

export async function pnpView(ctx) {
  const { body, deviceId, modelId, signal } = ctx;
  const canService = api.can('ServiceConnect');
  let doc;
  try {
    doc = await api.getModel(modelId, true);
  } catch (e) {
    setChildren(body, h('section.card', h('h2', { text: 'Model' }), h('p', {}, 'The device announces ', h('code', { text: modelId }), '.'),
      errorBox(e, 'pnp-model-error'),
      h('p.muted', {}, 'Add the model on the ', h('a', { href: '#/models', text: 'Models' }), ' page to see its components here.')));
    return;
  }
  if (signal.aborted) return;
  const { root, comps } = componentsOf(modelId, doc);
  const compsBox = h('div.stack');
  const confBox = h('div');
  const telBox = h('div');

  let twin = null;
  async function loadTwin() {
    if (!canService) return;
    try {
      twin = await api.getTwin(deviceId);
    } catch (e) {
      twin = null;
      toast(e.message, 'error');
    }
  }

  const propBoxes = new Map();
  function build() {
    setChildren(compsBox, comps.map((comp) => {
      const props = comp.contents.filter((c) => isA(c, 'Property'));
      const cmds = comp.contents.filter((c) => isA(c, 'Command'));
      const tel = comp.contents.filter((c) => isA(c, 'Telemetry'));
      const propBox = h('div.table-wrap');
      propBoxes.set(comp, { box: propBox, props });
      return h('section.card.pnp-component', { testid: 'pnp-component', dataset: { component: comp.name || '' } },
        h('div.card-head',
          h('h2', {}, comp.name ? h('span', {}, comp.label, ' ', h('code.small', { text: comp.name })) : comp.label),
          h('code.small.muted', { text: comp.schemaId || (comp.iface && comp.iface['@id']) || '' })),
        comp.missing ? h('div.alert.alert-warn', { text: `The interface ${comp.schemaId} is not in the model repository.` }) : null,
        h('h3', { text: `Properties (${props.length})` }),
        props.length ? propBox : h('p.muted', { text: 'None.' }),
        h('h3', { text: `Commands (${cmds.length})` }),
        cmds.length ? h('div.grid-2.grid-top', cmds.map((c) => commandCard(deviceId, comp.name, c, canService))) : h('p.muted', { text: 'None.' }),
        h('h3', { text: `Telemetry (${tel.length})` }),
        tel.length ? h('div.chips', tel.map((t) => h('span.chip.chip-static', {}, h('strong', { text: label(t) }), ' ', h('code.small', { text: `${t.name}: ${schemaText(t.schema)}${t.unit ? ` ${unitSymbol(t.unit)}` : ''}` })))) : h('p.muted', { text: 'None.' }));
    }));
  }

  function paint() {
    const desired = (twin && twin.properties && twin.properties.desired) || {};
    const reported = (twin && twin.properties && twin.properties.reported) || {};
    for (const [comp, { box, props }] of propBoxes) {
      if (!props.length || box.querySelector('input:focus')) continue;
      const d = comp.name ? desired[comp.name] || {} : desired;
      const r = comp.name ? reported[comp.name] || {} : reported;
      setChildren(box, h('table.table.table-compact', { testid: 'pnp-properties' },
        h('thead', h('tr', ['Property', 'Schema', 'Writable', 'Reported', 'Desired', 'Ack (ac / av / ad)', 'State', ''].map((t) => h('th', { text: t })))),
        h('tbody', props.map((p) => {
          const rv = r[p.name];
          const dv = d[p.name];
          const writable = !!p.writable;
          const repValue = writable && isPlainObject(rv) && 'value' in rv ? rv.value : rv;
          const st = writable ? syncState(dv, rv) : { text: DASH, kind: 'muted' };
          const input = h('input.small-input', { placeholder: 'new value', testid: `pnp-desired-input-${p.name}` });
          const unit = unitSymbol(p.unit);
          return h('tr', { testid: 'pnp-property', dataset: { name: p.name } },
            h('td', h('div', { text: label(p) }), h('code.small.muted', { text: p.name })),
            h('td', h('code.small', { text: schemaText(p.schema) + (unit ? ` (${unit})` : '') })),
            h('td', { text: writable ? 'yes' : 'no' }),
            h('td', { testid: 'pnp-reported', text: show(repValue) }),
            h('td', { testid: 'pnp-desired', text: writable ? show(dv) : DASH }),
            h('td', { testid: 'pnp-ack', text: writable && isPlainObject(rv) && 'ac' in rv ? `${rv.ac} / ${rv.av ?? DASH} / ${rv.ad ?? DASH}` : DASH }),
            h('td', badge(st.text, st.kind)),
            h('td.row-actions', writable && canService ? h('form.inline-form', {
              onsubmit: async (ev) => {
                ev.preventDefault();
                let v = input.value.trim();
                try { v = JSON.parse(v); } catch (_) { /* a string */ }
                const patch = comp.name ? { properties: { desired: { [comp.name]: { __t: 'c', [p.name]: v } } } } : { properties: { desired: { [p.name]: v } } };
                try {
                  await api.patchTwin(deviceId, patch, '*');
                  toast(`Desired ${p.name} set`);
                  input.blur();
                  await loadTwin();
                  paint();
                } catch (e) { toast(e.message, 'error'); }
              },
            }, input, h('button.btn.btn-small', { type: 'submit', text: 'Set' })) : null));
        }))));
    }
  }

  async function loadConformance() {
    try {
      const rep = await api.conformance(deviceId);
      if (signal.aborted) return;
      const findings = Object.entries(rep.findings || {});
      setChildren(confBox, h('section.card', { testid: 'pnp-conformance' },
        h('div.card-head', h('h2', { text: 'Conformance' }), h('span.muted', { text: `${rep.checked ?? 0} messages, patches and commands checked against ${rep.modelId || modelId}` })),
        findings.length
          ? h('div.grid-2.grid-top',
            h('table.table.table-compact', h('thead', h('tr', h('th', { text: 'Finding' }), h('th.num', { text: 'Count' }))),
              h('tbody', findings.map(([k, n]) => h('tr', h('td', h('code', { text: k })), h('td.num', { text: String(n) }))))),
            h('div.table-wrap', h('table.table.table-compact', h('thead', h('tr', ['Time', 'Kind', 'Where', 'Detail'].map((t) => h('th', { text: t })))),
              h('tbody', (rep.examples || []).slice(-20).reverse().map((x) => h('tr',
                h('td.nowrap', { text: fmtTime(x.time, false) }), h('td', h('code.small', { text: x.kind })),
                h('td', { text: [x.source, x.component, x.name].filter(Boolean).join(' · ') }),
                h('td', {}, x.detail, x.excerpt ? h('div', h('code.small.muted', { text: x.excerpt })) : null)))))))
          : h('div.alert.alert-ok', { testid: 'pnp-conformant', text: rep.checked ? 'No findings: everything checked follows the model.' : 'Nothing checked yet.' })));
    } catch (e) {
      setChildren(confBox, errorBox(e, 'pnp-conformance-error'));
    }
  }

  // Telemetry by the model's names and units (component telemetry: "component/name").
  const labels = {};
  const units = {};
  const fields = [];
  for (const comp of comps) {
    for (const t of comp.contents.filter((c) => isA(c, 'Telemetry'))) {
      const key = comp.name ? `${comp.name}/${t.name}` : t.name;
      fields.push(key);
      const u = unitSymbol(t.unit);
      if (u) units[key] = u;
      labels[key] = `${comp.name ? `${comp.name}: ` : ''}${label(t)}${u ? ` (${u})` : ''}`;
    }
  }

  setChildren(body,
    h('section.card', { testid: 'pnp-model' },
      h('div.card-head', h('h2', { text: label(root) || 'Model' }), h('code', { testid: 'pnp-model-id', text: modelId })),
      text(root.description) ? h('p', { text: text(root.description) }) : null,
      h('div.chips', comps.map((c) => h('span.chip.chip-static', { testid: 'pnp-component-chip' }, c.name ? `${c.label} (${c.name})` : c.label)))),
    canService ? null : rightsNote('No ServiceConnect right: the twin, commands and telemetry of the device need it; only the model is shown.'),
    compsBox, confBox, telBox);

  build();
  await loadTwin();
  paint();
  loadConformance();
  if (canService && fields.length) {
    telBox.append(h('h2.section-title', { text: 'Telemetry by the model' }));
    telemetryView(telBox, {
      deviceId, signal, labels, units, fields, title: 'Model telemetry', minutesBack: 5, windowSeconds: 300,
      fieldOf: (ev, json, nums) => {
        const comp = ev.systemProperties && ev.systemProperties['dt-subject'];
        if (!comp) return nums;
        return Object.fromEntries(Object.entries(nums).map(([k, v]) => [`${comp}/${k}`, v]));
      },
    });
  }
  const timer = setInterval(async () => {
    if (document.hidden) return;
    await loadTwin();
    if (!signal.aborted) paint();
    loadConformance();
  }, 3000);
  signal.addEventListener('abort', () => clearInterval(timer));
}

function commandCard(deviceId, component, c, canService) {
  const form = requestForm(c.request);
  const result = h('div', { testid: 'cmd-result' });
  const respTimeout = h('input.small-input', { type: 'number', min: 5, max: 300, value: 30 });
  const btn = h('button.btn.btn-primary', { type: 'submit', text: 'Invoke', disabled: !canService, testid: `cmd-invoke-${c.name}` });
  return h('form.card.card-inner', {
    testid: 'pnp-command', dataset: { name: c.name },
    onsubmit: async (ev) => {
      ev.preventDefault();
      let payload;
      try {
        payload = form.read();
      } catch (e) {
        setChildren(result, errorBox(new Error(`Not valid JSON: ${e.message}`)));
        return;
      }
      btn.disabled = true;
      setChildren(result, h('div.muted', { text: 'Waiting for the device…' }));
      try {
        const r = await api.digitalTwinCommand(deviceId, component, c.name, payload, { responseTimeout: Number(respTimeout.value) || undefined });
        setChildren(result, h('div.result',
          h('div.result-head', h('span', {}, 'Status ', h('strong', { testid: 'cmd-status', text: String(r.status) })), h('span.muted', { text: `${Math.round(r.elapsedMs)} ms` })),
          h('pre.code', { testid: 'cmd-payload', text: pretty(r.payload) })));
      } catch (e) {
        setChildren(result, errorBox(e, 'cmd-error'));
      } finally {
        btn.disabled = !canService;
      }
    },
  },
  h('div.card-head', h('h4', {}, label(c), ' ', h('code.small.muted', { text: c.name }))),
  text(c.description) ? h('p.muted.small', { text: text(c.description) }) : null,
  form.el,
  c.response ? h('p.field-hint', { text: `Answers ${c.response.name}: ${schemaText(c.response.schema)}` }) : null,
  h('div.row', h('label.inline', h('span', { text: 'Timeout (s)' }), respTimeout), h('div.spacer'), btn),
  result);
}
