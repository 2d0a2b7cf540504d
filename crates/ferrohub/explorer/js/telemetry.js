// Live telemetry of one device: the hub's NDJSON event stream read with fetch + a reader, shown
// as a table (time, properties, body) and a chart of the numeric fields of JSON bodies.

import * as api from './api.js';
import { LiveChart } from './chart.js';
import { h, setChildren, fmtTime, errorBox, isPlainObject } from './util.js';

const MAX_ROWS = 200;

/** The numeric fields of a JSON body, flattened: {"a.b": 1.5}. */
export function numericFields(value, prefix = '', out = {}) {
  if (typeof value === 'number' && Number.isFinite(value)) out[prefix || 'value'] = value;
  else if (isPlainObject(value)) {
    for (const [k, v] of Object.entries(value)) numericFields(v, prefix ? `${prefix}.${k}` : k, out);
  }
  return out;
}

export function parseBody(ev) {
  if (ev.bodyEncoding === 'base64') return { text: `(binary, base64) ${ev.body}`, json: undefined };
  const text = typeof ev.body === 'string' ? ev.body : JSON.stringify(ev.body);
  try {
    return { text, json: JSON.parse(text) };
  } catch (_) {
    return { text, json: undefined };
  }
}

/**
 * Renders into `container`. opts: deviceId, moduleId, signal (page), labels {field: label},
 * fields (only these, e.g. a model's telemetry names), title, component-aware fieldOf(ev, name).
 */
export function telemetryView(container, opts) {
  const { deviceId, moduleId, signal } = opts;
  const consumerGroup = h('input', { value: opts.consumerGroup || 'explorer', testid: 'tel-consumer-group', class: 'w-sm' });
  const from = h('select', { testid: 'tel-from' },
    h('option', { value: 'end', text: 'New events (from now)' }),
    h('option', { value: 'start', text: 'From the start of retention' }),
    h('option', { value: 'time', text: 'From a time…' }));
  const fromTime = h('input', { type: 'datetime-local', testid: 'tel-from-time', hidden: true, step: 1 });
  const windowSel = h('select', { testid: 'tel-window' }, [[60, '1 min'], [300, '5 min'], [900, '15 min'], [3600, '1 h']].map(([v, l]) => h('option', { value: String(v), text: l, selected: v === (opts.windowSeconds || 60) })));
  const pauseBtn = h('button.btn', { type: 'button', text: 'Pause', testid: 'tel-pause' });
  const clearBtn = h('button.btn', { type: 'button', text: 'Clear', testid: 'tel-clear' });
  const state = h('span.stream-state', { testid: 'tel-state' });
  const fieldsBox = h('div.field-chips', { testid: 'tel-fields' });
  const chartBox = h('div.chart-box');
  const rowsBody = h('tbody', { testid: 'tel-rows' });
  const count = h('span.muted', { testid: 'tel-count', text: '0 events' });
  const errBox = h('div');

  const chart = new LiveChart(chartBox, { windowSeconds: opts.windowSeconds || 60, labels: opts.labels || {}, units: opts.units || {}, testid: 'tel-chart', emptyText: 'No numeric fields yet: the chart shows every number in JSON bodies.' });
  const known = new Map(); // field -> checkbox
  let paused = false;
  let total = 0;
  let buffered = [];
  let streamCtl = null;
  const onlyFields = opts.fields ? new Set(opts.fields) : null;

  function chosen() {
    return [...known.entries()].filter(([, cb]) => cb.checked).map(([n]) => n);
  }
  function addField(name) {
    if (known.has(name) || (onlyFields && !onlyFields.has(name))) return;
    const cb = h('input', { type: 'checkbox', checked: true, dataset: { field: name } });
    cb.addEventListener('change', () => chart.setSeries(chosen()));
    known.set(name, cb);
    fieldsBox.append(h('label.chip', { testid: 'tel-field' }, cb, h('span', { text: (opts.labels && opts.labels[name]) || name })));
    chart.setSeries(chosen());
  }

  function show(ev) {
    total++;
    count.textContent = `${total} event${total === 1 ? '' : 's'}`;
    const body = parseBody(ev);
    const t = new Date(ev.enqueuedTime || Date.now());
    let nums = body.json === undefined ? {} : numericFields(body.json);
    if (opts.fieldOf) nums = opts.fieldOf(ev, body.json, nums);
    for (const n of Object.keys(nums)) addField(n);
    if (Object.keys(nums).length) chart.push(Number.isNaN(t.getTime()) ? Date.now() : t, nums);
    const props = { ...(ev.properties || {}) };
    const sys = ev.systemProperties || {};
    for (const k of ['dt-dataschema', 'dt-subject', 'iothub-connection-module-id', 'content-type']) if (sys[k]) props[`$${k}`] = sys[k];
    const row = h('tr', { testid: 'tel-row' },
      h('td.nowrap', { text: fmtTime(ev.enqueuedTime, false), title: ev.enqueuedTime }),
      h('td', h('code.small.props-cell', { text: Object.keys(props).length ? JSON.stringify(props) : '–' })),
      h('td', h('pre.code.body-cell', { text: body.json !== undefined ? JSON.stringify(body.json, null, 1) : body.text })));
    rowsBody.prepend(row);
    while (rowsBody.childElementCount > MAX_ROWS) rowsBody.lastElementChild.remove();
  }

  function onEvent(ev) {
    if (paused) buffered.push(ev);
    else show(ev);
  }

  function fromValue() {
    if (from.value !== 'time') return from.value;
    const d = fromTime.value ? new Date(fromTime.value) : new Date(Date.now() - 3600e3);
    return d.toISOString();
  }

  async function run(ctl) {
    let backoff = 1000;
    let fromArg = fromValue();
    while (!ctl.signal.aborted) {
      state.className = 'stream-state connecting';
      state.textContent = 'connecting…';
      try {
        await api.streamEvents({
          deviceId, moduleId, from: fromArg, consumerGroup: consumerGroup.value.trim() || undefined, signal: ctl.signal, onEvent,
          onOpen: () => { state.className = 'stream-state live'; state.textContent = 'live'; errBox.replaceChildren(); backoff = 1000; },
        });
      } catch (e) {
        if (ctl.signal.aborted) return;
        setChildren(errBox, errorBox(e, 'tel-error'));
        if (e.status === 401 || e.status === 400 || e.status === 404) {
          state.className = 'stream-state stopped';
          state.textContent = 'stopped';
          return;
        }
      }
      if (ctl.signal.aborted) return;
      // Reconnect where the group stopped reading.
      fromArg = 'checkpoint';
      state.className = 'stream-state connecting';
      state.textContent = 'reconnecting…';
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  function restart() {
    if (streamCtl) streamCtl.abort();
    streamCtl = new AbortController();
    run(streamCtl);
  }

  if (opts.minutesBack) {
    // Start a little in the past, so the chart has the recent history at once.
    const d = new Date(Date.now() - opts.minutesBack * 60e3);
    from.value = 'time';
    fromTime.hidden = false;
    fromTime.value = new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  }
  from.addEventListener('change', () => { fromTime.hidden = from.value !== 'time'; restart(); });
  fromTime.addEventListener('change', restart);
  consumerGroup.addEventListener('change', restart);
  windowSel.addEventListener('change', () => chart.setWindow(Number(windowSel.value)));
  pauseBtn.addEventListener('click', () => {
    paused = !paused;
    pauseBtn.textContent = paused ? 'Resume' : 'Pause';
    pauseBtn.classList.toggle('btn-primary', paused);
    chart.setPaused(paused);
    if (!paused) {
      const b = buffered;
      buffered = [];
      b.forEach(show);
    }
  });
  clearBtn.addEventListener('click', () => {
    rowsBody.replaceChildren();
    chart.clear();
    total = 0;
    count.textContent = '0 events';
  });

  signal.addEventListener('abort', () => {
    if (streamCtl) streamCtl.abort();
    chart.destroy();
  });

  container.append(
    h('section.card.tel-controls',
      h('div.row.wrap',
        h('label.inline', h('span', { text: 'Consumer group' }), consumerGroup),
        h('label.inline', h('span', { text: 'Start' }), from, fromTime),
        h('label.inline', h('span', { text: 'Window' }), windowSel),
        pauseBtn, clearBtn, h('div.spacer'), h('span.row', state, count))),
    errBox,
    h('section.card',
      h('div.card-head', h('h2', { text: opts.title || 'Numeric fields' }), fieldsBox),
      chartBox),
    h('section.card.card-flush',
      h('div.card-head', h('h2', { text: 'Events' }), h('span.muted', { text: `newest first, last ${MAX_ROWS} kept` })),
      h('div.table-wrap.tel-table-wrap', h('table.table.table-compact.tel-table', { testid: 'tel-table' },
        h('thead', h('tr', h('th', { text: 'Enqueued' }), h('th', { text: 'Properties' }), h('th', { text: 'Body' }))),
        rowsBody))));
  restart();
  return { restart };
}
