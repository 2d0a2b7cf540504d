// DOM building and formatting helpers (no framework). Styles only through classes or
// element.style, so the page keeps to a strict CSP.

/**
 * h('div.card#id', {attrs}, ...children). attrs: class, text, on<event> functions, dataset
 * object, any other key set as an attribute (or property for value/checked/disabled).
 */
export function h(spec, attrs, ...children) {
  if (attrs === null || typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs)) {
    if (attrs !== undefined && attrs !== null) children.unshift(attrs);
    attrs = {};
  }
  const m = /^([a-z0-9-]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const tag = (m && m[1]) || 'div';
  const el = document.createElement(tag);
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') {
      for (const c of String(v).split(/\s+/).filter(Boolean)) el.classList.add(c);
    } else if (k === 'text') {
      el.textContent = String(v);
    } else if (k.startsWith('on') && typeof v === 'function') {
      el.addEventListener(k.slice(2).toLowerCase(), v);
    } else if (k === 'dataset') {
      Object.assign(el.dataset, v);
    } else if (k === 'value' || k === 'checked' || k === 'disabled' || k === 'selected' || k === 'readOnly') {
      el[k] = v;
    } else if (k === 'testid') {
      el.setAttribute('data-testid', v);
    } else {
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace the children of `el`. */
export function setChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const DASH = '–';

export function fmtNum(n, digits = 0) {
  if (n === undefined || n === null || Number.isNaN(Number(n))) return DASH;
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

export function fmtBytes(n) {
  if (n === undefined || n === null || Number.isNaN(Number(n))) return DASH;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toLocaleString(undefined, { maximumFractionDigits: i ? 1 : 0 })} ${units[i]}`;
}

export function fmtDuration(seconds) {
  if (seconds === undefined || seconds === null || Number.isNaN(Number(seconds))) return DASH;
  let s = Math.floor(Number(seconds));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const hh = Math.floor(s / 3600);
  s -= hh * 3600;
  const mm = Math.floor(s / 60);
  s -= mm * 60;
  if (d) return `${d} d ${hh} h`;
  if (hh) return `${hh} h ${mm} min`;
  if (mm) return `${mm} min ${s} s`;
  return `${s} s`;
}

/** A hub time (ISO 8601) for a table; '–' for none or IoT Hub's 0001-01-01 placeholder. */
export function fmtTime(iso, withDate = true) {
  if (!iso || iso.startsWith('0001-01-01')) return DASH;
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return withDate ? d.toLocaleString() : d.toLocaleTimeString(undefined, { hour12: false });
}

/** "3 s ago", "5 min ago", ... */
export function fmtAgo(iso) {
  if (!iso || iso.startsWith('0001-01-01')) return DASH;
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return iso;
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function pretty(v) {
  return JSON.stringify(v, null, 2);
}

/** Stable JSON equality (key order ignored). */
export function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== 'object') return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

export const isPlainObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

let toastBox = null;
/** A short message at the bottom right; kind: ok | error | info. */
export function toast(message, kind = 'ok') {
  if (!toastBox || !toastBox.isConnected) {
    toastBox = h('div.toasts', { role: 'status', 'aria-live': 'polite' });
    document.body.append(toastBox);
  }
  const t = h('div.toast', { class: `toast-${kind}`, text: message });
  toastBox.append(t);
  setTimeout(() => t.classList.add('toast-out'), kind === 'error' ? 6000 : 3000);
  setTimeout(() => t.remove(), kind === 'error' ? 6600 : 3600);
}

/** A modal dialog; resolves true when confirmed. */
export function confirmDialog(title, message, confirmLabel = 'Confirm', danger = true) {
  return new Promise((resolve) => {
    const dlg = h('dialog.modal', { testid: 'confirm-dialog' },
      h('h3', { text: title }),
      h('p', { text: message }),
      h('div.actions',
        h('button.btn', { type: 'button', text: 'Cancel', testid: 'confirm-cancel', onclick: () => dlg.close('cancel') }),
        h('button.btn', { type: 'button', class: danger ? 'btn-danger' : 'btn-primary', text: confirmLabel, testid: 'confirm-ok', onclick: () => dlg.close('ok') })));
    dlg.addEventListener('close', () => {
      resolve(dlg.returnValue === 'ok');
      dlg.remove();
    });
    document.body.append(dlg);
    dlg.showModal();
  });
}

/** A modal dialog with `content` (a form); returns {dialog, close}. */
export function modal(title, content, { wide = false } = {}) {
  const dlg = h('dialog.modal', { class: wide ? 'modal-wide' : '' },
    h('div.modal-head', h('h3', { text: title }),
      h('button.icon-btn', { type: 'button', 'aria-label': 'Close', text: '×', onclick: () => dlg.close() })),
    content);
  dlg.addEventListener('close', () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
  return { dialog: dlg, close: () => dlg.close() };
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const ta = h('textarea.offscreen', { value: text });
    document.body.append(ta);
    ta.select();
    try {
      document.execCommand('copy');
    } finally {
      ta.remove();
    }
  }
  toast('Copied to the clipboard');
}

/** A copy button for the text returned by get(). */
export function copyButton(get, label = 'Copy', testid) {
  return h('button.btn.btn-small', { type: 'button', text: label, testid, onclick: () => copyText(typeof get === 'function' ? get() : get) });
}

/** An error box (message of an ApiError or any Error). */
export function errorBox(err, testid = 'error') {
  const status = err && err.status ? `${err.status}: ` : '';
  return h('div.alert.alert-error', { role: 'alert', testid, text: `${status}${err && err.message ? err.message : err}` });
}

/** A note that explains why a control is missing (the policy's rights). */
export function rightsNote(text) {
  return h('div.alert.alert-info.rights-note', { testid: 'rights-note', text });
}

export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A labelled form field. */
export function field(label, input, hint) {
  return h('label.field', h('span.field-label', { text: label }), input, hint ? h('span.field-hint', { text: hint }) : null);
}

export function badge(text, kind) {
  return h('span.badge', { class: `badge-${kind}`, text });
}

export function connectionBadge(state) {
  const on = state === 'Connected';
  return h('span.conn', { class: on ? 'conn-on' : 'conn-off', testid: 'connection-state' }, h('span.dot'), state || DASH);
}

export function statusBadge(status) {
  return badge(status || DASH, status === 'enabled' ? 'ok' : status === 'disabled' ? 'muted' : 'muted');
}
