// Hub overview: /explorer/api/overview polled every 2 s, counters turned into rates here.

import * as api from '../api.js';
import { LiveChart } from '../chart.js';
import { h, setChildren, fmtNum, fmtBytes, fmtDuration, DASH, errorBox } from '../util.js';

const POLL_MS = 2000;

const get = (o, path) => path.split('.').reduce((v, k) => (v && typeof v === 'object' ? v[k] : undefined), o);

function stat(label, testid, sub) {
  const value = h('div.stat-value', { testid, text: DASH });
  const subEl = h('div.stat-sub', { text: sub || '' });
  return { el: h('div.card.stat', h('div.stat-label', { text: label }), value, subEl), value, sub: subEl };
}

export async function render({ main, signal }) {
  const cards = {
    devices: stat('Devices', 'ov-devices-total'),
    connected: stat('Connected', 'ov-devices-connected'),
    inRate: stat('Messages in / s', 'ov-rate-in'),
    outRate: stat('Events out / s', 'ov-rate-out'),
  };
  const errBox = h('div');
  const chartBox = h('div.chart-box');
  const details = h('div.grid-3');
  const refusals = h('div');
  const transports = h('div');
  const version = h('span.muted', { testid: 'ov-version' });
  setChildren(main,
    h('div.page-head', h('div', h('h1', { text: 'Overview' }), h('p.page-sub', {}, 'Live counters of the hub, every 2 s. ', version))),
    errBox,
    h('div.grid-4', Object.values(cards).map((c) => c.el)),
    h('section.card',
      h('div.card-head', h('h2', { text: 'Messages per second' }), h('span.muted', { text: 'last 5 minutes' })),
      chartBox),
    details,
    h('div.grid-2',
      h('section.card', h('div.card-head', h('h2', { text: 'Connections' })), transports),
      h('section.card', h('div.card-head', h('h2', { text: 'Refused connections and requests' }), h('span.muted', { text: 'by IoT Hub error code' })), refusals)));

  const chart = new LiveChart(chartBox, { windowSeconds: 300, height: 240, labels: { in: 'telemetry in', out: 'events read', c2d: 'C2D out' }, yLabel: 'msg/s', testid: 'ov-chart', emptyText: 'Collecting rates…' });
  let chartSeries = ['in', 'c2d'];
  chart.setSeries(chartSeries);
  signal.addEventListener('abort', () => chart.destroy());

  let prev = null;
  const rate = (cur, old, path, dt) => {
    const a = get(cur, path);
    const b = old ? get(old, path) : undefined;
    if (typeof a !== 'number' || typeof b !== 'number' || dt <= 0) return undefined;
    return Math.max(0, (a - b) / dt);
  };

  const kv = (rows) => h('table.kv', h('tbody', rows.map(([k, v, testid]) => h('tr', h('th', { text: k }), h('td', { text: v, testid })))));

  async function tick() {
    let o;
    try {
      o = await api.overview(signal);
      errBox.replaceChildren();
    } catch (e) {
      if (signal.aborted) return;
      setChildren(errBox, errorBox(e, 'overview-error'));
      return;
    }
    const now = Date.now();
    const dt = prev ? (now - prev.at) / 1000 : 0;
    const rIn = rate(o, prev && prev.o, 'telemetry.messagesIn', dt);
    const rOut = rate(o, prev && prev.o, 'eventsOut', dt);
    const rC2d = rate(o, prev && prev.o, 'c2d.sent', dt);
    const rBytes = rate(o, prev && prev.o, 'telemetry.bytesIn', dt);
    prev = { o, at: now };

    cards.devices.value.textContent = fmtNum(get(o, 'devices.total'));
    cards.devices.sub.textContent = `${fmtNum(get(o, 'devices.enabled'))} enabled · ${fmtNum(get(o, 'devices.disabled'))} disabled`;
    cards.connected.value.textContent = fmtNum(get(o, 'devices.connected'));
    cards.connected.sub.textContent = `${fmtNum(get(o, 'connections.current'))} connections open`;
    cards.inRate.value.textContent = rIn === undefined ? DASH : fmtNum(rIn, 1);
    cards.inRate.sub.textContent = `${fmtNum(get(o, 'telemetry.messagesIn'))} total · ${rBytes === undefined ? DASH : fmtBytes(rBytes)}/s`;
    cards.outRate.value.textContent = rOut === undefined ? DASH : fmtNum(rOut, 1);
    cards.outRate.sub.textContent = `to back-end readers · C2D ${rC2d === undefined ? DASH : fmtNum(rC2d, 1)}/s`;
    if (typeof o.eventsOut === 'number' && !chartSeries.includes('out')) {
      chartSeries = ['in', 'out', 'c2d'];
      chart.setSeries(chartSeries);
    }
    version.textContent = o.version ? `Ferrohub ${o.version} · up ${fmtDuration(o.uptimeSeconds)}` : '';
    if (rIn !== undefined || rOut !== undefined) chart.push(now, { in: rIn, out: rOut, c2d: rC2d });

    setChildren(details,
      h('section.card', h('div.card-head', h('h2', { text: 'Devices' })), kv([
        ['Registered', fmtNum(get(o, 'devices.total'))],
        ['Enabled', fmtNum(get(o, 'devices.enabled'))],
        ['Disabled', fmtNum(get(o, 'devices.disabled'))],
        ['Connected', fmtNum(get(o, 'devices.connected'))],
      ])),
      h('section.card', h('div.card-head', h('h2', { text: 'Cloud-to-device' })), kv([
        ['Sent', fmtNum(get(o, 'c2d.sent'))],
        ['Delivered', fmtNum(get(o, 'c2d.delivered'))],
        ['Completed', fmtNum(get(o, 'c2d.completed'))],
        ['Events read by back ends', fmtNum(get(o, 'eventsOut'))],
        ['Telemetry in', fmtNum(get(o, 'telemetry.messagesIn'))],
        ['Telemetry bytes in', fmtBytes(get(o, 'telemetry.bytesIn'))],
      ])),
      h('section.card', h('div.card-head', h('h2', { text: 'Storage and retention' })), kv([
        ['Data directory', fmtBytes(get(o, 'storage.dataDirBytes')), 'ov-storage'],
        ['Telemetry log', fmtBytes(get(o, 'storage.telemetryLogBytes'))],
        ['Telemetry kept', get(o, 'retention.telemetrySeconds') === undefined ? DASH : fmtDuration(get(o, 'retention.telemetrySeconds'))],
        ['Partitions', fmtNum(get(o, 'retention.partitions'))],
        ['Uptime', fmtDuration(o.uptimeSeconds)],
      ])));

    const by = get(o, 'connections.byTransport') || {};
    setChildren(transports, kv([
      ['Open now', fmtNum(get(o, 'connections.current'))],
      ...Object.entries(by).sort().map(([k, v]) => [`  ${k}`, fmtNum(v)]),
      ['Connects accepted', fmtNum(get(o, 'connects.accepted')), 'ov-connects'],
    ]));
    const ref = Object.entries(o.refusals || {}).sort((a, b) => b[1] - a[1]);
    setChildren(refusals, ref.length
      ? h('table.table.table-compact', { testid: 'ov-refusals' },
        h('thead', h('tr', h('th', { text: 'Error code' }), h('th.num', { text: 'Count' }))),
        h('tbody', ref.map(([code, n]) => h('tr', h('td', h('code', { text: code })), h('td.num', { text: fmtNum(n) })))))
      : h('p.muted', { testid: 'ov-refusals', text: o.refusals ? 'No refusals since the hub started.' : DASH }));
  }

  await tick();
  const timer = setInterval(tick, POLL_MS);
  signal.addEventListener('abort', () => clearInterval(timer));
}
