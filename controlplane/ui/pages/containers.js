// Containers: filtered by state, node and labels (in the URL, so a view
// can be bookmarked), with live usage of the running ones (memory, CPU
// since the last look, pids), hibernate, resume and delete (confirmed).
// No stream lists containers: the page reads them again every 5 s while
// it is shown.

import { h, field, bytes, when, badge, labels, table, every, keepFocus, confirmDialog, announce } from '../dom.js';
import { get, post, del, query } from '../api.js';

export const title = 'Containers';

const STATES = ['', 'provisioning', 'ready', 'hibernated', 'stopping', 'failed', 'deleted'];
const REFRESH_MS = 5000;

/** "a=1 b=2" -> ["a=1", "b=2"]. */
export function parseLabels(text) {
  return (text || '').split(/[\s,]+/).filter(Boolean);
}

export function render(main, ctx) {
  const p = ctx.params;
  const filters = { state: p.get('state') || '', node: p.get('node') || '', label: p.getAll('label').join(' ') };
  const state = h('select', { name: 'state' }, STATES.map((s) => h('option', { value: s, selected: s === filters.state }, s || 'any')));
  const node = h('select', { name: 'node' }, h('option', { value: '' }, 'any'));
  const label = h('input', { type: 'text', name: 'label', value: filters.label, placeholder: 'team=a', autocomplete: 'off' });
  const form = h('form.filters', {
    'aria-label': 'Filter containers',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      if (state.value) q.set('state', state.value);
      if (node.value) q.set('node', node.value);
      for (const l of parseLabels(label.value)) q.append('label', l);
      ctx.navigate(`#/containers${q.toString() ? `?${q}` : ''}`);
    },
  }, field('State', state), field('Node', node), field('Labels', label, 'key=value, several separated by spaces'),
  h('div.actions', h('button', { type: 'submit' }, 'Apply filters')));

  const status = h('p.status', { role: 'status', 'aria-live': 'polite' });
  const list = h('div');
  const detail = h('div');
  main.append(h('h1', 'Containers'), form, status, list, detail);

  const previous = new Map();
  const cpuPercent = (id, usage) => {
    if (!usage || usage.cpu_usage_usec === undefined) return null;
    const now = performance.now();
    const last = previous.get(id);
    previous.set(id, { usec: usage.cpu_usage_usec, at: now });
    if (!last || now <= last.at) return null;
    return ((usage.cpu_usage_usec - last.usec) / 1000 / (now - last.at)) * 100;
  };

  const act = async (c, verb) => {
    if (verb === 'delete') {
      const ok = await confirmDialog(`Delete container ${c.id}?`,
        'Its sandbox is removed and every session in it is closed. This cannot be undone.', 'Delete container');
      if (!ok) return;
    }
    status.textContent = `${verb === 'delete' ? 'Deleting' : verb === 'hibernate' ? 'Hibernating' : 'Resuming'} ${c.id}…`;
    try {
      if (verb === 'delete') await del(`/v1/containers/${c.id}`);
      else await post(`/v1/containers/${c.id}:${verb}`);
      const done = { delete: 'deleted', hibernate: 'hibernated', resume: 'resumed' }[verb];
      status.textContent = `Container ${c.id} ${done}.`;
      announce(status.textContent);
    } catch (e) {
      status.textContent = `Could not ${verb} ${c.id}: ${e.describe ? e.describe() : e.message}`;
    }
    await load();
  };

  const actions = (c) => {
    const buttons = [];
    if (c.state === 'ready') buttons.push(h('button', { type: 'button', dataset: { key: `suspend-${c.id}`, action: 'hibernate' }, 'aria-label': `Hibernate ${c.id}`, onclick: () => act(c, 'hibernate') }, 'Hibernate'));
    if (c.state === 'hibernated') buttons.push(h('button', { type: 'button', dataset: { key: `suspend-${c.id}`, action: 'resume' }, 'aria-label': `Resume ${c.id}`, onclick: () => act(c, 'resume') }, 'Resume'));
    if (!['deleted', 'stopping'].includes(c.state)) buttons.push(h('button.danger', { type: 'button', dataset: { key: `delete-${c.id}`, action: 'delete' }, 'aria-label': `Delete ${c.id}`, onclick: () => act(c, 'delete') }, 'Delete'));
    return h('div.row-actions', buttons);
  };

  const usageCell = (c, u) => {
    if (!u) return h('span.muted', '–');
    if (u.error) return h('span.muted', `unknown (${u.error})`);
    const cpu = cpuPercent(c.id, u);
    return h('ul.usage', { 'aria-label': `Usage of ${c.id}` },
      h('li', `memory ${bytes(u.memory_bytes)}${u.memory_max_bytes ? ` of ${bytes(u.memory_max_bytes)}` : ''}`),
      h('li', `CPU ${cpu === null ? '…' : `${cpu.toFixed(1)}%`}`),
      h('li', `pids ${u.pids ?? '–'}${u.pids_max ? ` of ${u.pids_max}` : ''}`),
      u.oom_kills ? h('li.warning', `OOM kills ${u.oom_kills}`) : null,
      u.frozen ? h('li', 'frozen') : null);
  };

  let nodesLoaded = false;
  const load = async () => {
    try {
      if (!nodesLoaded) {
        const nodes = await get('/v1/nodes');
        for (const n of nodes.nodes) node.append(h('option', { value: n.id, selected: n.id === filters.node }, n.id));
        nodesLoaded = true;
      }
      const page = await get(`/v1/containers${query({ state: filters.state, node_id: filters.node, label: parseLabels(filters.label), limit: 100 })}`);
      const live = await Promise.all(page.containers.map((c) => (['ready', 'hibernated'].includes(c.state)
        ? get(`/v1/containers/${c.id}`).then((d) => d.usage, () => null)
        : Promise.resolve(null))));
      if (!ctx.alive()) return;
      keepFocus(list, () => list.replaceChildren(table('Containers, newest first',
        ['Container', 'State', 'Node', 'Labels', 'Usage', 'Created', 'Actions'],
        page.containers.map((c, i) => [
          h('a', { href: `#/containers?id=${c.id}`, dataset: { key: `open-${c.id}` } }, h('code', c.id)),
          h('span', badge(c.state), c.error_code ? h('span.muted', ` ${c.error_code}`) : null),
          h('code', c.node_id || '–'),
          labels(c.labels),
          usageCell(c, live[i]),
          when(c.created_at),
          actions(c),
        ]),
        'No container matches.')));
      if (status.textContent.startsWith('Could not read')) status.textContent = '';
    } catch (e) {
      if (ctx.alive()) status.textContent = `Could not read the containers: ${e.describe ? e.describe() : e.message}`;
    }
  };

  const id = p.get('id');
  if (id) {
    get(`/v1/containers/${id}`).then((c) => {
      if (!ctx.alive()) return;
      detail.replaceChildren(h('section.card', { 'aria-labelledby': 'ctr-detail' },
        h('h2', { id: 'ctr-detail' }, 'Container ', h('code', c.id)),
        h('dl.facts',
          h('dt', 'State'), h('dd', badge(c.state)),
          h('dt', 'Node'), h('dd', c.node_id || '–'),
          h('dt', 'Sessions'), h('dd', c.sessions.length ? h('ul', c.sessions.map((s) => h('li', h('a', { href: `#/sessions/${s}` }, s)))) : '–'),
          h('dt', 'Agents'), h('dd', c.agents.length ? h('ul', c.agents.map((a) => h('li', `${a.id} ${a.version} (${a.state || '?'})`))) : '–'),
          h('dt', 'Capacity'), h('dd', c.capacity ?? 'no limit'),
          h('dt', 'Error'), h('dd', c.error ? `${c.error_code}: ${c.error}` : '–')),
        h('details', h('summary', 'Profile'), h('pre', JSON.stringify(c.container_profile, null, 2)))));
    }, (e) => {
      if (ctx.alive()) detail.replaceChildren(h('p.error', { role: 'alert' }, `Container ${id}: ${e.describe ? e.describe() : e.message}`));
    });
  }
  return every(REFRESH_MS, load, ctx.alive);
}
