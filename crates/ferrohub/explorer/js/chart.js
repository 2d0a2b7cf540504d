// A live time-series chart over uPlot (vendor/uplot): push(t, {name: value}) and it keeps the
// last `windowSeconds`, redrawn at most once a frame.

import uPlot from '../vendor/uplot/uPlot.esm.js';
import { h } from './util.js';

const PALETTE = ['#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2', '#ca8a04', '#db2777', '#4b5563', '#65a30d'];

function cssVar(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

export class LiveChart {
  /**
   * container: element to draw in. opts: windowSeconds, height, labels {name: label},
   * yLabel, testid.
   */
  constructor(container, opts = {}) {
    this.container = container;
    this.windowSeconds = opts.windowSeconds || 300;
    this.height = opts.height || 260;
    this.labels = opts.labels || {};
    // {name: unit}: series of different units get their own y axis (left, right, ...).
    this.units = opts.units || {};
    this.yLabel = opts.yLabel || '';
    this.names = [];
    this.points = []; // [{t, values: {name: number}}]
    this.paused = false;
    this.plot = null;
    this.frame = 0;
    this.el = h('div.chart', { testid: opts.testid || 'chart' });
    this.empty = h('div.chart-empty', { text: opts.emptyText || 'Waiting for numeric values…' });
    container.append(this.el, this.empty);
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(container);
  }

  /** Which series to draw (in this order). */
  setSeries(names) {
    if (names.length === this.names.length && names.every((n, i) => n === this.names[i])) return;
    this.names = [...names];
    this.rebuild();
  }

  setWindow(seconds) {
    this.windowSeconds = seconds;
    this.trim();
    this.schedule();
  }

  setPaused(p) {
    this.paused = p;
    if (!p) this.schedule();
  }

  clear() {
    this.points = [];
    this.schedule();
  }

  /** t: Date or ms since the epoch; values: {name: number}. */
  push(t, values) {
    const ms = t instanceof Date ? t.getTime() : t;
    this.points.push({ t: ms / 1000, values });
    if (this.points.length > 20000) this.points.splice(0, this.points.length - 20000);
    this.trim();
    this.el.dataset.points = String(this.points.length);
    if (!this.paused) this.schedule();
  }

  trim() {
    const cutoff = Date.now() / 1000 - this.windowSeconds;
    let i = 0;
    while (i < this.points.length && this.points[i].t < cutoff) i++;
    if (i) this.points.splice(0, i);
  }

  data() {
    const pts = [...this.points].sort((a, b) => a.t - b.t);
    const xs = pts.map((p) => p.t);
    const ys = this.names.map((n) => pts.map((p) => (typeof p.values[n] === 'number' ? p.values[n] : null)));
    return [xs, ...ys];
  }

  rebuild() {
    if (this.plot) {
      this.plot.destroy();
      this.plot = null;
    }
    this.el.replaceChildren();
    if (!this.names.length) {
      this.empty.hidden = false;
      return;
    }
    this.empty.hidden = true;
    const axis = cssVar('--muted', '#6b7280');
    const grid = cssVar('--grid', 'rgba(0,0,0,0.08)');
    const scaleOf = (n) => (this.units[n] ? `unit:${this.units[n]}` : 'y');
    const scaleKeys = [...new Set(this.names.map(scaleOf))];
    const scales = { x: { time: true } };
    for (const k of scaleKeys) scales[k] = { auto: true };
    const yAxes = scaleKeys.map((k, i) => ({
      scale: k,
      side: i % 2 ? 1 : 3,
      stroke: axis,
      grid: { stroke: grid, show: i === 0 },
      ticks: { stroke: grid },
      label: k === 'y' ? this.yLabel || undefined : k.slice(5),
      size: 60,
    }));
    const opts = {
      width: Math.max(200, this.container.clientWidth - 2),
      height: this.height,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      scales,
      axes: [
        { stroke: axis, grid: { stroke: grid }, ticks: { stroke: grid } },
        ...yAxes,
      ],
      series: [
        { label: 'time' },
        ...this.names.map((n, i) => ({
          label: this.labels[n] || n,
          scale: scaleOf(n),
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          spanGaps: true,
          points: { size: 5 },
        })),
      ],
    };
    this.plot = new uPlot(opts, this.data(), this.el);
  }

  schedule() {
    if (this.frame || this.paused) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      if (!this.plot) return;
      const d = this.data();
      const now = Date.now() / 1000;
      // Until the data spans the window, the x axis spans the data (at least 5 s), so a
      // fresh chart is not a sliver at its right edge.
      const first = d[0].length ? d[0][0] : now;
      const span = Math.min(this.windowSeconds, Math.max(5, now - first + 0.5));
      this.plot.setData(d, false);
      this.plot.setScale('x', { min: now - span, max: now });
    });
  }

  resize() {
    if (!this.plot) return;
    const w = Math.max(200, this.container.clientWidth - 2);
    if (Math.abs(w - this.plot.width) > 4) this.plot.setSize({ width: w, height: this.height });
  }

  destroy() {
    this.resizeObserver.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}
