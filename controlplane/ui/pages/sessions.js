// Sessions: the list (filtered by state, container and labels; read again
// every 5 s while shown, as no stream lists sessions) and a form that
// starts one: an agent from the registry or a definition given as JSON,
// in a new container (its profile as JSON) or a ready one.

import { h, field, when, badge, labels, table, every, keepFocus, uid } from '../dom.js';
import { get, post, query } from '../api.js';
import { parseLabels } from './containers.js';

export const title = 'Sessions';

const STATES = ['', 'creating', 'ready', 'closed', 'failed'];
const REFRESH_MS = 5000;
const CUSTOM = '__custom__';
const NEW_CONTAINER = '';

/** "a=1 b=2" -> {a: "1", b: "2"}; null when a word is not key=value. */
function labelObject(text) {
  const out = {};
  for (const word of parseLabels(text)) {
    const eq = word.indexOf('=');
    if (eq <= 0) return null;
    out[word.slice(0, eq)] = word.slice(eq + 1);
  }
  return out;
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
}

function createForm(ctx) {
  const agent = h('select', { name: 'agent' }, h('option', { value: CUSTOM }, 'Agent definition (JSON below)'));
  const definition = h('textarea', { name: 'definition', rows: 7, spellcheck: 'false', placeholder: '{"id": "my-agent", "version": "1.0.0", "distribution": {...}}' });
  const container = h('select', { name: 'container' }, h('option', { value: NEW_CONTAINER }, 'A new container'));
  const profile = h('textarea', { name: 'profile', rows: 2, spellcheck: 'false', value: '{}' });
  const workingDir = h('input', { type: 'text', name: 'working_dir', value: '/workspace', autocomplete: 'off' });
  const permissions = h('select', { name: 'permissions' },
    h('option', { value: 'ask', selected: true }, 'ask me here'),
    h('option', { value: 'allow' }, 'allow all'),
    h('option', { value: 'deny' }, 'deny all'));
  const labelInput = h('input', { type: 'text', name: 'labels', autocomplete: 'off', placeholder: 'team=a' });
  const status = h('p.status', { role: 'status' });
  const button = h('button.primary', { type: 'submit' }, 'Start session');
  const definitionField = field('Agent definition', definition, 'The agent in the ACP registry\'s shape or agentd\'s manual_agent shape.');
  const profileField = field('Container profile', profile, 'JSON: memory, pids, cpus, network, ...; {} for the defaults.');
  const sync = () => {
    definitionField.hidden = agent.value !== CUSTOM;
    profileField.hidden = container.value !== NEW_CONTAINER;
  };
  agent.addEventListener('change', sync);
  container.addEventListener('change', sync);

  const preselect = ctx.params.get('agent');
  get('/v1/registry/agents').then((r) => {
    for (const a of r.agents) agent.append(h('option', { value: a.id, selected: a.id === preselect, disabled: !a.launch }, `${a.name || a.id} ${a.version}${a.launch ? '' : ' (not for this platform)'}`));
    sync();
  }, () => {});
  get(`/v1/containers${query({ state: 'ready', limit: 100 })}`).then((r) => {
    for (const c of r.containers) container.append(h('option', { value: c.id }, c.id));
  }, () => {});

  const form = h('form.card.create', {
    'aria-labelledby': 'new-session',
    onsubmit: async (e) => {
      e.preventDefault();
      const body = { session: { working_dir: workingDir.value.trim() || '/workspace' }, policy: { permissions: permissions.value } };
      try {
        if (agent.value === CUSTOM) body.manual_agent = parseJson(definition.value, 'The agent definition');
        else body.agent_id = agent.value;
        if (container.value === NEW_CONTAINER) body.container_profile = parseJson(profile.value || '{}', 'The container profile');
        else body.container_id = container.value;
        const l = labelObject(labelInput.value);
        if (l === null) throw new Error('Labels must be key=value words.');
        if (Object.keys(l).length) body.labels = l;
      } catch (err) {
        status.textContent = err.message;
        return;
      }
      button.disabled = true;
      status.textContent = 'Starting the session…';
      try {
        // Answered at once (202, `creating`): the session page shows the
        // setup's stages as they pass, or why it failed.
        const s = await post('/v1/sessions', body, { idempotent: true, headers: { Prefer: 'respond-async' } });
        ctx.navigate(`#/sessions/${s.id}`);
      } catch (err) {
        status.textContent = `The session did not start: ${err.describe ? err.describe() : err.message}`;
      } finally {
        button.disabled = false;
      }
    },
  },
  h('h2', { id: 'new-session' }, 'Start a session'),
  field('Agent', agent), definitionField,
  field('Container', container), profileField,
  field('Working directory', workingDir),
  field('Permission requests', permissions, 'ask: each request waits for an answer on the session page.'),
  field('Labels', labelInput, 'key=value, several separated by spaces'),
  h('div.actions', button), status);
  sync();
  return form;
}

export function render(main, ctx) {
  const p = ctx.params;
  const filters = { state: p.get('state') || '', container: p.get('container') || '', label: p.getAll('label').join(' ') };
  const state = h('select', { name: 'state' }, STATES.map((s) => h('option', { value: s, selected: s === filters.state }, s || 'any')));
  const container = h('input', { type: 'text', name: 'container', value: filters.container, autocomplete: 'off', placeholder: 'ctr_…' });
  const label = h('input', { type: 'text', name: 'label', value: filters.label, autocomplete: 'off', placeholder: 'team=a' });
  const filterForm = h('form.filters', {
    'aria-label': 'Filter sessions',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      if (state.value) q.set('state', state.value);
      if (container.value.trim()) q.set('container', container.value.trim());
      for (const l of parseLabels(label.value)) q.append('label', l);
      ctx.navigate(`#/sessions${q.toString() ? `?${q}` : ''}`);
    },
  }, field('State', state), field('Container', container), field('Labels', label),
  h('div.actions', h('button', { type: 'submit' }, 'Apply filters')));
  const status = h('p.status', { role: 'status' });
  const list = h('div');
  const listHeading = uid('h');
  main.append(h('h1', 'Sessions'), createForm(ctx),
    h('section', { 'aria-labelledby': listHeading }, h('h2', { id: listHeading }, 'All sessions'), filterForm, status, list));

  const load = async () => {
    try {
      const page = await get(`/v1/sessions${query({ state: filters.state, container_id: filters.container, label: parseLabels(filters.label), limit: 100 })}`);
      if (!ctx.alive()) return;
      keepFocus(list, () => list.replaceChildren(table('Sessions, newest first',
        ['Session', 'State', 'Agent', 'Container', 'Labels', 'Created'],
        page.sessions.map((s) => [
          h('a', { href: `#/sessions/${s.id}`, dataset: { key: `open-${s.id}` } }, h('code', s.id)),
          h('span', badge(s.state), s.error_code ? h('span.muted', ` ${s.error_code}`) : null),
          `${s.agent_id} ${s.agent_version}`,
          h('a', { href: `#/containers?id=${s.container_id}` }, h('code', s.container_id)),
          labels(s.labels),
          when(s.created_at),
        ]),
        'No session matches.')));
      status.textContent = '';
    } catch (e) {
      if (ctx.alive()) status.textContent = `Could not read the sessions: ${e.describe ? e.describe() : e.message}`;
    }
  };
  return every(REFRESH_MS, load, ctx.alive);
}
