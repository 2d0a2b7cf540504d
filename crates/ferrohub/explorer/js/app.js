// The explorer's shell: sign-in (one-time token in the fragment, or a connection string), the
// layout (header, left navigation) and the hash router (#/overview, #/devices, #/devices/<id>,
// #/models, ...). Each page module exports render(ctx); ctx.signal aborts when the page is left.

import * as api from './api.js';
import { h, setChildren, errorBox, toast } from './util.js';

const app = document.getElementById('app');

const routes = [
  { re: /^\/?$/, go: '/overview' },
  { re: /^\/overview$/, page: 'overview', nav: 'overview' },
  { re: /^\/devices$/, page: 'devices', nav: 'devices' },
  { re: /^\/devices\/([^/]+)(?:\/([a-z0-9]+))?$/, page: 'device', nav: 'devices', params: ['deviceId', 'tab'] },
  { re: /^\/devices\/([^/]+)\/modules\/([^/]+)(?:\/([a-z0-9]+))?$/, page: 'device', nav: 'devices', params: ['deviceId', 'moduleId', 'tab'] },
  { re: /^\/models$/, page: 'models', nav: 'models' },
  { re: /^\/models\/(.+)$/, page: 'models', nav: 'models', params: ['modelId'] },
];

const NAV = [
  { id: 'overview', label: 'Overview', href: '#/overview', icon: 'M3 13h8V3H3v10zm0 8h8v-6H3v6zm10 0h8V11h-8v10zm0-18v6h8V3h-8z' },
  { id: 'devices', label: 'Devices', href: '#/devices', icon: 'M7 2h10a2 2 0 0 1 2 2v16a2 2 0 0 1-2 2H7a2 2 0 0 1-2-2V4a2 2 0 0 1 2-2zm0 3v13h10V5H7zm5 14.5a1 1 0 1 0 0 2 1 1 0 0 0 0-2z' },
  { id: 'models', label: 'Models', href: '#/models', icon: 'M12 2 2 7l10 5 10-5-10-5zm-10 10 10 5 10-5M2 17l10 5 10-5' },
];

let current = null; // {controller}
let shell = null; // {main, navLinks}

function icon(path) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.classList.add('nav-icon');
  const p = document.createElementNS(ns, 'path');
  p.setAttribute('d', path);
  svg.append(p);
  return svg;
}

function logoMark() {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 32 32');
  svg.classList.add('logo');
  const bg = document.createElementNS(ns, 'rect');
  for (const [k, v] of Object.entries({ x: 1, y: 1, width: 30, height: 30, rx: 8 })) bg.setAttribute(k, v);
  bg.classList.add('logo-bg');
  const p = document.createElementNS(ns, 'path');
  p.setAttribute('d', 'M10 23V9h12M10 16h9');
  p.classList.add('logo-fg');
  svg.append(bg, p);
  return svg;
}

function buildShell(session) {
  const navLinks = {};
  const nav = h('nav.sidenav', { 'aria-label': 'Main' },
    NAV.map((n) => {
      const a = h('a.nav-link', { href: n.href, testid: `nav-${n.id}` }, icon(n.icon), h('span', { text: n.label }));
      navLinks[n.id] = a;
      return a;
    }),
    h('div.nav-foot', { testid: 'nav-foot', text: 'Azure IoT Hub compatible' }));
  const rights = (session.rights || []).join(', ') || 'no rights';
  const header = h('header.topbar',
    h('a.brand', { href: '#/overview' }, logoMark(), h('span.brand-name', { text: 'Ferrohub' }), h('span.brand-sub', { text: 'explorer' })),
    h('div.hubname', { testid: 'hub-name', title: session.hostName || '' },
      h('span.hub-label', { text: 'Hub' }), h('strong', { text: session.hubName || session.hostName || '–' }),
      session.hostName && session.hostName !== session.hubName ? h('span.hub-host', { text: session.hostName }) : null),
    h('div.spacer'),
    h('div.policy', { testid: 'policy', title: `Rights: ${rights}` },
      h('span.policy-label', { text: 'Policy' }), h('strong', { text: session.policy || '–' }),
      h('span.policy-rights', { text: rights })),
    h('button.btn.btn-ghost', { type: 'button', testid: 'logout', text: 'Sign out', onclick: doLogout }));
  const main = h('main.content', { id: 'main', tabindex: '-1' });
  setChildren(app, header, h('div.layout', nav, main));
  app.className = 'shell';
  shell = { main, navLinks };
}

async function doLogout() {
  stopPage();
  try {
    await api.logout();
  } catch (e) {
    toast(`Sign-out: ${e.message}`, 'error');
  }
  shell = null;
  history.replaceState(null, '', location.pathname);
  showLogin();
}

function stopPage() {
  if (current) {
    current.controller.abort();
    current = null;
  }
}

const pageModules = {};
async function loadPage(name) {
  if (!pageModules[name]) pageModules[name] = await import(`./pages/${name}.js`);
  return pageModules[name];
}

async function route() {
  if (!api.currentSession()) return;
  const path = location.hash.replace(/^#/, '').replace(/\?.*$/, '') || '/';
  let match = null;
  for (const r of routes) {
    const m = r.re.exec(path);
    if (m) {
      match = { r, m };
      break;
    }
  }
  if (match && match.r.go) {
    location.replace(`#${match.r.go}`);
    return;
  }
  if (!shell) buildShell(api.currentSession());
  stopPage();
  const controller = new AbortController();
  current = { controller };
  for (const [id, a] of Object.entries(shell.navLinks)) a.classList.toggle('active', !!match && match.r.nav === id);
  const main = shell.main;
  if (!match) {
    setChildren(main, h('h1', { text: 'Not found' }), h('p', {}, 'No page at ', h('code', { text: path }), '. ', h('a', { href: '#/overview', text: 'Back to the overview' })));
    return;
  }
  const params = {};
  (match.r.params || []).forEach((p, i) => {
    if (match.m[i + 1] !== undefined) params[p] = decodeURIComponent(match.m[i + 1]);
  });
  setChildren(main, h('div.loading', { text: 'Loading…' }));
  try {
    const mod = await loadPage(match.r.page);
    if (controller.signal.aborted) return;
    main.replaceChildren();
    main.scrollTop = 0;
    await mod.render({ main, params, signal: controller.signal, path });
  } catch (e) {
    if (controller.signal.aborted) return;
    console.error(e);
    setChildren(main, errorBox(e, 'page-error'));
  }
}

function showLogin(error) {
  stopPage();
  shell = null;
  app.className = 'login-page';
  const input = h('input#login-cs', {
    type: 'password', autocomplete: 'off', spellcheck: 'false', required: true, testid: 'login-connection-string',
    placeholder: 'HostName=…;SharedAccessKeyName=…;SharedAccessKey=…',
  });
  const msg = h('div.login-msg');
  if (error) msg.append(errorBox(error, 'login-error'));
  const button = h('button.btn.btn-primary.btn-block', { type: 'submit', text: 'Sign in', testid: 'login-submit' });
  const form = h('form.login-form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      button.disabled = true;
      msg.replaceChildren();
      try {
        await api.signInWithConnectionString(input.value.trim());
        input.value = '';
        start();
      } catch (e) {
        msg.append(errorBox(e, 'login-error'));
      } finally {
        button.disabled = false;
      }
    },
  },
  h('label.field', { for: 'login-cs' }, h('span.field-label', { text: 'Service connection string' }), input,
    h('span.field-hint', { text: 'A shared access policy of the hub, e.g. iothubowner or registryRead. The key stays on the server: the browser gets a session cookie.' })),
  button);
  setChildren(app,
    h('div.login-card', { testid: 'login-page' },
      h('div.login-brand', logoMark(), h('div', h('div.brand-name', { text: 'Ferrohub' }), h('div.brand-sub', { text: 'IoT Hub explorer' }))),
      h('h1', { text: 'Sign in' }),
      msg,
      form,
      h('p.login-note', {}, 'Or open the one-time link that the server prints at start-up or that ', h('code', { text: 'ferrohub explorer' }), ' prints.')));
  setTimeout(() => input.focus(), 0);
}

async function start() {
  if (!location.hash || location.hash === '#' || location.hash.startsWith('#token=')) {
    history.replaceState(null, '', `${location.pathname}#/overview`);
  }
  await route();
}

function init() {
  api.setUnauthorizedHandler(() => showLogin(new Error('Your session has ended: sign in again.')));
  window.addEventListener('hashchange', () => {
    if (/(?:^#|&)token=/.test(location.hash)) boot();
    else route();
  });
  boot();
}

async function boot() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    const token = decodeURIComponent(m[1]);
    // The token is single use: drop it from the address bar and history at once.
    history.replaceState(null, '', location.pathname);
    try {
      await api.signInWithToken(token);
      await start();
    } catch (e) {
      showLogin(e);
    }
    return;
  }
  try {
    const s = await api.loadSession();
    if (s) await start();
    else showLogin();
  } catch (e) {
    showLogin(e);
  }
}

init();
