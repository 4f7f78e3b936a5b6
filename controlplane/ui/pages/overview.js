// The fleet at a glance: nodes with capacity and usage, containers and
// sessions counted by state, and the latest failures. Lists have no
// stream of their own, so this page reads them again every 5 s while it
// is shown.

import { h, bytes, when, badge, table, every } from '../dom.js';
import { get, query } from '../api.js';

export const title = 'Overview';

const CONTAINER_STATES = ['provisioning', 'ready', 'hibernated', 'stopping', 'failed', 'deleted'];
const SESSION_STATES = ['creating', 'ready', 'closed', 'failed'];
const REFRESH_MS = 5000;
const COUNT_LIMIT = 500;

function meter(label, value, max, text) {
  if (!max) return h('span', text);
  return h('span.meter', h('meter', { min: 0, max, value, 'aria-label': label }), ' ', text);
}

function nodeRows(nodes) {
  return nodes.map((n) => {
    const usage = n.usage || {};
    const cap = n.capacity || {};
    return [
      h('code', n.id),
      badge(n.state),
      meter(`Sandboxes on ${n.id}`, usage.sandboxes || 0, cap.slots, `${usage.sandboxes ?? '–'} of ${cap.slots ?? '∞'}`),
      meter(`Memory on ${n.id}`, usage.memory_current || 0, cap.memory_bytes, `${bytes(usage.memory_current)} of ${cap.memory_bytes ? bytes(cap.memory_bytes) : '∞'}`),
      cap.cpus ? String(cap.cpus) : '–',
      when(n.last_heartbeat_at),
    ];
  });
}

function counts(kind, rows, states, more) {
  const by = {};
  for (const r of rows) by[r.state] = (by[r.state] || 0) + 1;
  const items = states.map((s) => h('li',
    h('a', { href: `#/${kind}?state=${s}` }, h('span.count', `${by[s] || 0}`), ' ', s)));
  return h('ul.counts', { 'aria-label': `${kind} by state` }, items, more ? h('li.muted', `counted among the newest ${COUNT_LIMIT}`) : null);
}

export function render(main, ctx) {
  const body = h('div.grid');
  const status = h('p.status', { role: 'status' });
  main.append(h('h1', 'Overview'), status, body);

  const load = async () => {
    try {
      const [nodes, containers, sessions, failedContainers, failedSessions] = await Promise.all([
        get('/v1/nodes'),
        get(`/v1/containers${query({ limit: COUNT_LIMIT })}`),
        get(`/v1/sessions${query({ limit: COUNT_LIMIT })}`),
        get(`/v1/containers${query({ state: 'failed', limit: 10 })}`),
        get(`/v1/sessions${query({ state: 'failed', limit: 10 })}`),
      ]);
      if (!ctx.alive()) return;
      const failures = [
        ...failedContainers.containers.map((c) => ({ kind: 'container', id: c.id, href: `#/containers?id=${c.id}`, code: c.error_code, error: c.error, at: c.updated_at })),
        ...failedSessions.sessions.map((s) => ({ kind: 'session', id: s.id, href: `#/sessions/${s.id}`, code: s.error_code, error: s.error, at: s.updated_at })),
      ].sort((a, b) => b.at - a.at).slice(0, 10);
      body.replaceChildren(
        h('section.card.wide', { 'aria-labelledby': 'ov-nodes' }, h('h2', { id: 'ov-nodes' }, 'Nodes'),
          table('Nodes with their capacity and usage', ['Node', 'State', 'Sandboxes', 'Memory', 'CPUs', 'Last heartbeat'], nodeRows(nodes.nodes), 'No node has joined.')),
        h('section.card', { 'aria-labelledby': 'ov-containers' }, h('h2', { id: 'ov-containers' }, 'Containers'),
          counts('containers', containers.containers, CONTAINER_STATES, containers.next_cursor)),
        h('section.card', { 'aria-labelledby': 'ov-sessions' }, h('h2', { id: 'ov-sessions' }, 'Sessions'),
          counts('sessions', sessions.sessions, SESSION_STATES, sessions.next_cursor)),
        h('section.card.wide', { 'aria-labelledby': 'ov-failures' }, h('h2', { id: 'ov-failures' }, 'Recent failures'),
          table('The latest failed containers and sessions', ['What', 'Code', 'Error', 'When'],
            failures.map((f) => [h('a', { href: f.href }, `${f.kind} `, h('code', f.id)), f.code || '–', f.error || '–', when(f.at)]),
            'No failures.')),
      );
      status.textContent = '';
    } catch (e) {
      if (ctx.alive()) status.textContent = e.describe ? e.describe() : e.message;
    }
  };
  return every(REFRESH_MS, load, ctx.alive);
}
