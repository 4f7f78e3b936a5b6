// The agent registry: the agents of the last sync (how each would launch
// here), a sync from the configured source or a given path or URL
// (admin), and a way to start a session with one.

import { h, field, when, table, announce } from '../dom.js';
import { get, post } from '../api.js';

export const title = 'Registry';

export function render(main, ctx) {
  const source = h('input', { type: 'text', name: 'source', autocomplete: 'off', placeholder: '/srv/registry.json or https://…' });
  const status = h('p.status', { role: 'status' });
  const list = h('div');
  const button = h('button.primary', { type: 'submit' }, 'Sync now');
  const form = h('form.card.filters', {
    'aria-labelledby': 'sync-title',
    onsubmit: async (e) => {
      e.preventDefault();
      button.disabled = true;
      status.textContent = 'Syncing the registry…';
      try {
        const body = source.value.trim() ? { source: source.value.trim() } : undefined;
        const report = await post('/v1/registry:sync', body);
        status.textContent = `Synced: ${summary(report)}.`;
        announce(status.textContent);
        await load();
      } catch (err) {
        status.textContent = `The sync failed: ${err.describe ? err.describe() : err.message}`;
      } finally {
        button.disabled = false;
      }
    },
  }, h('h2', { id: 'sync-title' }, 'Sync'), field('Source', source, 'Empty: the configured registry. Needs an admin token.'), h('div.actions', button));
  main.append(h('h1', 'Registry'), form, status, h('h2', 'Agents'), list);

  const load = async () => {
    try {
      const r = await get('/v1/registry/agents');
      if (!ctx.alive()) return;
      list.replaceChildren(h('p.muted', `Platform: ${r.platform}`), table('Agents of the last sync',
        ['Agent', 'Version', 'Launch', 'Description', 'Synced', ''],
        r.agents.map((a) => [
          h('span', h('strong', a.name || a.id), ' ', h('code', a.id)),
          a.version,
          a.launch || h('span.muted', 'not for this platform'),
          a.description || '–',
          when(a.synced_at),
          a.launch ? h('a', { href: `#/sessions?agent=${encodeURIComponent(a.id)}` }, `Start a session with ${a.name || a.id}`) : '',
        ]),
        'The registry is empty: sync one.'));
    } catch (e) {
      if (ctx.alive()) status.textContent = `Could not read the registry: ${e.describe ? e.describe() : e.message}`;
    }
  };
  load();
  return null;
}

function summary(report) {
  if (!report || typeof report !== 'object') return 'done';
  return Object.entries(report)
    .filter(([, v]) => typeof v !== 'object' || Array.isArray(v))
    .map(([k, v]) => `${k.replace(/_/g, ' ')} ${Array.isArray(v) ? v.length : v}`)
    .join(', ') || 'done';
}
