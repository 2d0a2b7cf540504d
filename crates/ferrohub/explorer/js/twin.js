// The twin editor: tags and desired properties as JSON, saved as a PATCH of what changed with
// If-Match on the twin's etag. On 412 (someone changed the twin meanwhile) the current twin is
// fetched and shown beside the user's change, to re-apply it on the new etag or discard it;
// the user's edit is never dropped without asking.

import * as api from './api.js';
import { h, setChildren, errorBox, toast, pretty, deepEqual, isPlainObject, fmtTime } from './util.js';

/** What the user edits: tags and desired properties, without the hub's $metadata/$version. */
export function editable(twin) {
  const desired = { ...((twin.properties && twin.properties.desired) || {}) };
  delete desired.$metadata;
  delete desired.$version;
  return { tags: twin.tags || {}, properties: { desired } };
}

/** A JSON merge patch that turns `from` into `to` (removed keys -> null). */
export function diff(from, to) {
  const out = {};
  for (const [k, v] of Object.entries(to)) {
    if (!(k in from)) out[k] = v;
    else if (isPlainObject(v) && isPlainObject(from[k])) {
      const d = diff(from[k], v);
      if (Object.keys(d).length) out[k] = d;
    } else if (!deepEqual(v, from[k])) out[k] = v;
  }
  for (const k of Object.keys(from)) if (!(k in to)) out[k] = null;
  return out;
}

export async function twinEditor(ctx) {
  const { body, deviceId, moduleId, signal } = ctx;
  let twin = null;
  let base = null; // the editable part of the twin the edit started from
  const editor = h('textarea.code.twin-editor', { rows: 22, spellcheck: 'false', testid: 'twin-editor' });
  const meta = h('div.twin-meta', { testid: 'twin-meta' });
  const reported = h('pre.code.twin-reported', { testid: 'twin-reported' });
  const msg = h('div', { testid: 'twin-msg' });
  const merge = h('div', { testid: 'twin-merge-box' });
  const save = h('button.btn.btn-primary', { type: 'button', text: 'Save', testid: 'twin-save' });
  const reload = h('button.btn', { type: 'button', text: 'Reload', testid: 'twin-reload' });
  const dirty = () => {
    try {
      return !deepEqual(JSON.parse(editor.value), base);
    } catch (_) {
      return true;
    }
  };

  function show(t, keepEdit = false) {
    twin = t;
    base = editable(t);
    if (!keepEdit) editor.value = pretty(base);
    const desiredVersion = t.properties && t.properties.desired && t.properties.desired.$version;
    const reportedVersion = t.properties && t.properties.reported && t.properties.reported.$version;
    setChildren(meta,
      h('span', {}, 'ETag ', h('code', { testid: 'twin-etag', text: t.etag || '–' })),
      h('span', {}, 'Version ', h('code', { testid: 'twin-version', text: String(t.version ?? '–') })),
      h('span', {}, 'Desired ', h('code', { text: `$version ${desiredVersion ?? '–'}` })),
      h('span', {}, 'Reported ', h('code', { text: `$version ${reportedVersion ?? '–'}` })),
      t.modelId ? h('span', {}, 'Model ', h('code', { text: t.modelId })) : null);
    const rep = { ...((t.properties && t.properties.reported) || {}) };
    delete rep.$metadata;
    reported.textContent = pretty(rep);
  }

  async function load(keepEdit = false) {
    const t = await api.getTwin(deviceId, moduleId);
    if (!signal.aborted) show(t, keepEdit);
    return t;
  }

  async function saveEdit() {
    msg.replaceChildren();
    let edited;
    try {
      edited = JSON.parse(editor.value);
    } catch (e) {
      setChildren(msg, errorBox(new Error(`Not valid JSON: ${e.message}`), 'twin-error'));
      return;
    }
    if (!isPlainObject(edited)) {
      setChildren(msg, errorBox(new Error('The twin document is a JSON object with "tags" and "properties.desired".'), 'twin-error'));
      return;
    }
    const patch = diff(base, edited);
    if (!Object.keys(patch).length) {
      setChildren(msg, h('div.alert.alert-info', { text: 'Nothing changed.' }));
      return;
    }
    await apply(patch, twin.etag);
  }

  async function apply(patch, etag) {
    save.disabled = true;
    try {
      const t = await api.patchTwin(deviceId, patch, etag, moduleId);
      merge.replaceChildren();
      show(t && t.etag ? t : await api.getTwin(deviceId, moduleId));
      setChildren(msg, h('div.alert.alert-ok', { testid: 'twin-saved', text: `Saved. The twin's etag is now ${twin.etag}.` }));
      toast('Twin saved');
    } catch (e) {
      if (e.status === 412) {
        await conflict(patch);
      } else {
        setChildren(msg, errorBox(e, 'twin-error'));
      }
    } finally {
      save.disabled = false;
    }
  }

  /** 412: show the user's patch beside the twin as it is now on the hub. */
  async function conflict(patch) {
    let current;
    try {
      current = await api.getTwin(deviceId, moduleId);
    } catch (e) {
      setChildren(msg, errorBox(e, 'twin-error'));
      return;
    }
    const mine = editor.value;
    setChildren(msg, h('div.alert.alert-warn', { text: 'The twin changed on the hub since you loaded it (412 Precondition Failed). Your edit is kept below.' }));
    setChildren(merge, h('section.card.merge', { testid: 'twin-merge' },
      h('div.card-head', h('h2', { text: 'Resolve the conflict' }),
        h('span.muted', {}, 'your etag ', h('code', { text: twin.etag }), ' · hub now ', h('code', { testid: 'merge-current-etag', text: current.etag }))),
      h('div.grid-2',
        h('div', h('h3', { text: 'Your change (as a patch)' }), h('pre.code.merge-pane', { testid: 'merge-mine', text: pretty(patch) })),
        h('div', h('h3', {}, 'Current on the hub ', h('span.muted', { text: `version ${current.version ?? '–'}, updated ${fmtTime(new Date().toISOString(), false)}` })),
          h('pre.code.merge-pane', { testid: 'merge-theirs', text: pretty(editable(current)) }))),
      h('div.actions.actions-left',
        h('button.btn.btn-primary', { type: 'button', testid: 'merge-reapply', text: 'Re-apply my change on the current version', onclick: async () => {
          show(current, true);
          await apply(patch, current.etag);
        } }),
        h('button.btn', { type: 'button', testid: 'merge-edit', text: 'Edit again on the current version', onclick: () => {
          // The current twin with the user's patch merged in, to edit before saving.
          show(current);
          editor.value = pretty(mergePatch(editable(current), patch));
          merge.replaceChildren();
          msg.replaceChildren();
        } }),
        h('button.btn.btn-danger', { type: 'button', testid: 'merge-discard', text: 'Discard my edit', onclick: () => {
          show(current);
          merge.replaceChildren();
          setChildren(msg, h('div.alert.alert-info', { text: 'Your edit was discarded; showing the current twin.' }));
          void mine;
        } }))));
    merge.scrollIntoView({ block: 'nearest' });
  }

  save.addEventListener('click', saveEdit);
  reload.addEventListener('click', async () => {
    if (dirty() && !window.confirm('Drop your unsaved edit and reload the twin?')) return;
    msg.replaceChildren();
    merge.replaceChildren();
    try { await load(); } catch (e) { setChildren(msg, errorBox(e, 'twin-error')); }
  });

  setChildren(body,
    merge,
    h('div.grid-2.grid-top',
      h('section.card',
        h('div.card-head', h('h2', { text: 'Tags and desired properties' }), h('span.muted', { text: 'saved as a patch of what you changed; a removed key is deleted' })),
        editor, msg,
        h('div.actions.actions-left', save, reload)),
      h('div.stack',
        h('section.card', h('div.card-head', h('h2', { text: 'Twin' })), meta),
        h('section.card', h('div.card-head', h('h2', { text: 'Reported properties' }), h('span.muted', { text: 'read-only, set by the device' })), reported))));

  try {
    await load();
  } catch (e) {
    setChildren(msg, errorBox(e, 'twin-error'));
  }
  // Keep the reported side and metadata fresh without touching the user's edit.
  const timer = setInterval(async () => {
    if (document.hidden || merge.childElementCount) return;
    try {
      const t = await api.getTwin(deviceId, moduleId);
      if (signal.aborted) return;
      const rep = { ...((t.properties && t.properties.reported) || {}) };
      delete rep.$metadata;
      reported.textContent = pretty(rep);
    } catch (_) { /* next time */ }
  }, 5000);
  signal.addEventListener('abort', () => clearInterval(timer));
}

/** RFC 7396 merge patch applied to a copy of `target`. */
export function mergePatch(target, patch) {
  if (!isPlainObject(patch)) return patch;
  const out = isPlainObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}
