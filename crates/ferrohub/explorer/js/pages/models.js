// Models: the hub's IoT Plug and Play model repository. Add (paste or upload DTDL JSON), view
// (#/models/<dtmi>) and remove.

import * as api from '../api.js';
import { componentsOf, schemaText, unitSymbol } from '../pnp.js';
import { h, setChildren, fmtTime, errorBox, toast, confirmDialog, pretty, rightsNote, DASH, isPlainObject } from '../util.js';

const text = (v) => (typeof v === 'string' ? v : isPlainObject(v) ? v.en || Object.values(v)[0] : '');

export async function render({ main, params, signal }) {
  const canWrite = api.can('RegistryWrite');
  const listBox = h('div.table-wrap');
  const viewBox = h('div');
  const addBox = h('div');

  async function load() {
    try {
      const models = await api.listModels();
      if (signal.aborted) return;
      models.sort((a, b) => a.id.localeCompare(b.id));
      setChildren(listBox, h('table.table', { testid: 'models-table' },
        h('thead', h('tr', ['Model ID', 'Display name', 'Added', ''].map((t) => h('th', { text: t })))),
        h('tbody', models.length ? models.map((m) => h('tr', { testid: 'model-row', dataset: { modelId: m.id }, class: params.modelId === m.id ? 'selected' : '' },
          h('td', h('a.id-link', { href: `#/models/${encodeURIComponent(m.id)}`, text: m.id })),
          h('td', { text: text(m.displayName) || DASH }),
          h('td.nowrap', { text: fmtTime(m.createdDateTimeUtc) }),
          h('td.row-actions', canWrite ? h('button.btn.btn-small.btn-danger', { type: 'button', text: 'Remove', testid: 'model-remove', onclick: () => remove(m.id) }) : null)))
          : h('tr', h('td.empty', { colspan: 4, text: 'No models yet. Add a DTDL interface to describe your devices.' })))));
    } catch (e) {
      setChildren(listBox, errorBox(e, 'models-error'));
    }
  }

  async function remove(id) {
    if (!(await confirmDialog('Remove model', `Remove ${id} from the repository? Devices that announce it keep working; they are no longer checked against it.`, 'Remove'))) return;
    try {
      await api.removeModel(id);
      toast(`Removed ${id}`);
      if (params.modelId === id) location.hash = '#/models';
      else load();
    } catch (e) {
      toast(`${e.status ? `${e.status}: ` : ''}${e.message}`, 'error');
    }
  }

  if (canWrite) {
    const ta = h('textarea.code', { rows: 10, spellcheck: 'false', testid: 'model-json', placeholder: '{\n  "@context": "dtmi:dtdl:context;2",\n  "@id": "dtmi:com:example:Thermostat;1",\n  "@type": "Interface",\n  "contents": [ ... ]\n}' });
    const file = h('input', { type: 'file', accept: '.json,application/json', testid: 'model-file' });
    file.addEventListener('change', async () => {
      if (file.files && file.files[0]) ta.value = await file.files[0].text();
    });
    const msg = h('div', { testid: 'model-add-msg' });
    setChildren(addBox, h('section.card',
      h('div.card-head', h('h2', { text: 'Add a model' }), h('span.muted', { text: 'one DTDL interface or an array of them' })),
      h('form.form', {
        onsubmit: async (ev) => {
          ev.preventDefault();
          msg.replaceChildren();
          try {
            JSON.parse(ta.value);
          } catch (e) {
            setChildren(msg, errorBox(new Error(`Not valid JSON: ${e.message}`), 'model-add-error'));
            return;
          }
          try {
            const r = await api.addModels(ta.value);
            setChildren(msg, h('div.alert.alert-ok', { testid: 'model-added' },
              `Added ${(r.ids || []).join(', ') || 'nothing'}`, (r.new && r.new.length) ? ` (new: ${r.new.join(', ')})` : '',
              (r.missing && r.missing.length) ? h('div', { text: `Still missing (referenced, not in the repository): ${r.missing.join(', ')}` }) : null));
            ta.value = '';
            file.value = '';
            load();
          } catch (e) {
            setChildren(msg, errorBox(e, 'model-add-error'));
          }
        },
      }, ta, h('div.row', file, h('div.spacer'), h('button.btn.btn-primary', { type: 'submit', text: 'Add model', testid: 'model-add' })), msg)));
  }

  if (params.modelId) {
    try {
      const doc = await api.getModel(params.modelId, true);
      const { comps } = componentsOf(params.modelId, doc);
      setChildren(viewBox, h('section.card', { testid: 'model-view' },
        h('div.card-head', h('h2', {}, h('code', { text: params.modelId })), h('a.btn.btn-small', { href: '#/models', text: 'Close' })),
        h('div.grid-2.grid-top',
          h('div', comps.map((c) => h('div.model-comp',
            h('h3', { text: c.name ? `${c.label} (${c.name})` : c.label }),
            h('table.table.table-compact', h('thead', h('tr', ['Kind', 'Name', 'Schema', 'Unit'].map((t) => h('th', { text: t })))),
              h('tbody', c.contents.map((x) => h('tr',
                h('td', { text: [].concat(x['@type']).filter((t) => ['Property', 'Telemetry', 'Command', 'Relationship'].includes(t)).join(', ') || [].concat(x['@type'])[0] }),
                h('td', h('code.small', { text: x.name })),
                h('td', h('code.small', { text: x.request ? `(${schemaText(x.request.schema)}) → ${x.response ? schemaText(x.response.schema) : 'nothing'}` : schemaText(x.schema) })),
                h('td', { text: unitSymbol(x.unit) || (x.writable ? 'writable' : '') })))))))),
          h('pre.code.model-json', { text: pretty(doc) }))));
    } catch (e) {
      setChildren(viewBox, errorBox(e, 'model-view-error'));
    }
  }

  setChildren(main,
    h('div.page-head', h('div', h('h1', { text: 'Models' }), h('p.page-sub', { text: 'IoT Plug and Play models (DTDL) that devices announce with their model ID; the hub checks their traffic against them.' }))),
    canWrite ? null : rightsNote(`The policy ${api.currentSession().policy} has no RegistryWrite right: models cannot be added or removed.`),
    viewBox,
    h('div.grid-models', h('section.card.card-flush', h('div.card-head', h('h2', { text: 'Repository' })), listBox), addBox));
  await load();
}
