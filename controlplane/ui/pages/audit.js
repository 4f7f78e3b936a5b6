// The audit log (admin): every state-changing call, newest first, with
// who (token id, claimed actor, peer), what, and how it ended. Filtered by
// entity; new records are read every 5 s while the page is shown (no
// stream carries them).

import { h, field, table, every, keepFocus } from '../dom.js';
import { get, query } from '../api.js';

export const title = 'Audit log';

const REFRESH_MS = 5000;
const KEEP = 500;

export function render(main, ctx) {
  const p = ctx.params;
  const kind = h('select', { name: 'entity_kind' }, ['', 'session', 'container', 'registry'].map((k) => h('option', { value: k, selected: k === (p.get('entity_kind') || '') }, k || 'any')));
  const entity = h('input', { type: 'text', name: 'entity_id', value: p.get('entity_id') || '', autocomplete: 'off', placeholder: 'ses_… or ctr_…' });
  const form = h('form.filters', {
    'aria-label': 'Filter the audit log',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      if (kind.value && entity.value.trim()) {
        q.set('entity_kind', kind.value);
        q.set('entity_id', entity.value.trim());
      }
      ctx.navigate(`#/audit${q.toString() ? `?${q}` : ''}`);
    },
  }, field('Entity kind', kind), field('Entity id', entity, 'Both, or neither'), h('div.actions', h('button', { type: 'submit' }, 'Apply filters')));
  const status = h('p.status', { role: 'status' });
  const list = h('div');
  main.append(h('h1', 'Audit log'), form, status, list);

  const filter = p.get('entity_kind') && p.get('entity_id') ? { entity_kind: p.get('entity_kind'), entity_id: p.get('entity_id') } : {};
  let records = [];
  let after = null;
  const load = async () => {
    try {
      const page = await get(`/v1/audit${query({ ...filter, after, limit: 200 })}`);
      if (!ctx.alive()) return;
      if (page.records.length || after === null) {
        records = [...page.records.reverse(), ...records].slice(0, KEEP);
        keepFocus(list, () => list.replaceChildren(table('State-changing calls, newest first',
          ['When', 'Call', 'Answer', 'Token', 'Actor', 'Peer', 'Took'],
          records.map((r) => [
            h('time', { datetime: new Date(r.at).toISOString() }, new Date(r.at).toLocaleString()),
            h('code', `${r.method} ${r.path}`),
            h('span', { class: r.status >= 400 ? 'error' : '' }, `${r.status}${r.code ? ` ${r.code}` : ''}`),
            r.token_id ? h('code', r.token_id) : '–',
            r.actor || '–',
            r.peer || '–',
            `${(r.duration_us / 1000).toFixed(1)} ms`,
          ]),
          'No record yet.')));
      }
      after = page.next_after ?? after;
      status.textContent = '';
    } catch (e) {
      if (ctx.alive()) status.textContent = `Could not read the audit log: ${e.describe ? e.describe() : e.message}`;
    }
  };
  return every(REFRESH_MS, load, ctx.alive);
}
