// A session's event stream rendered as a conversation. Each event is
// applied once, in order: a turn per run (run.started ... run.completed /
// run.failed), agent message chunks merged into one text until something
// else comes between, thoughts likewise, tool calls updated in place
// (status, content, diffs), the latest plan, permission requests with
// their options as buttons, and the run's end with its stop reason.

import { h, uid, announce } from './dom.js';

const TOOL_STATUS = { pending: 'pending', in_progress: 'running', completed: 'completed', failed: 'failed' };

export class Conversation {
  /**
   * log: the element (role=log) turns go into; options:
   * - answer(requestId, optionId): answers a permission request (a promise);
   * - onRunState(state, runId, detail): the run's state changed.
   */
  constructor(log, options = {}) {
    this.log = log;
    this.options = options;
    this.turns = new Map();
    this.prompts = new Map();
    this.tools = new Map();
    this.permissions = new Map();
    this.turn = null;
    /** The text block chunks merge into, with its kind. */
    this.open = null;
    this.activeRun = null;
  }

  /** One SSE event: {id, type, data}. */
  apply(event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch (_) {
      data = { raw: event.data };
    }
    switch (event.type) {
      case 'run.started': return this.runStarted(data.run_id);
      case 'run.completed': return this.runEnded(data.run_id, 'completed', data.stop_reason);
      case 'run.failed': return this.runEnded(data.run_id, 'failed', data.code ? `${data.code}: ${data.error}` : data.error);
      case 'session.update': return this.update(data.update || {});
      case 'permission.requested': return this.permissionRequested(data);
      case 'permission.resolved': return this.permissionResolved(data);
      case 'agent.protocol_error': return this.note('warning', `The agent broke the protocol: ${data.error}`);
      case 'sandbox.oom': return this.note('warning', `The sandbox ran out of memory (OOM kills: ${data.oom_kills}).`);
      default: return this.note('info', `${event.type}: ${event.data}`);
    }
  }

  /** The turn of `runId`, made if new; events before any run (a load's
   *  replay) go into a history turn. */
  turnOf(runId) {
    const key = runId || 'history';
    let turn = this.turns.get(key);
    if (!turn) {
      const headingId = uid('turn');
      const state = h('span.badge', { dataset: { state: runId ? 'queued' : 'history' } }, runId ? 'starting' : 'history');
      const heading = h('h3.turn-title', { id: headingId }, runId ? 'Turn ' : 'Earlier history', runId ? h('code', runId) : null, ' ', state);
      const body = h('div.turn-body');
      const el = h('article.turn', { 'aria-labelledby': headingId, dataset: { run: key } }, heading, body);
      this.log.append(el);
      turn = { el, body, state, end: null };
      this.turns.set(key, turn);
      const prompt = this.prompts.get(key);
      if (prompt) this.showPrompt(turn, prompt);
    }
    return turn;
  }

  /** The prompt a run was started with (known to the page that sent it). */
  addPrompt(runId, text) {
    this.prompts.set(runId, text);
    const turn = this.turnOf(runId);
    if (!turn.prompt) this.showPrompt(turn, text);
  }

  showPrompt(turn, text) {
    turn.prompt = h('div.msg.user', h('span.who', 'You'), h('p.text', text));
    turn.body.prepend(turn.prompt);
  }

  runStarted(runId) {
    this.turn = this.turnOf(runId);
    this.open = null;
    this.setTurnState(this.turn, 'streaming', 'running');
    this.activeRun = runId;
    if (this.options.onRunState) this.options.onRunState('running', runId);
  }

  runEnded(runId, state, detail) {
    const turn = this.turnOf(runId);
    const cancelled = state === 'completed' && detail === 'cancelled';
    this.setTurnState(turn, cancelled ? 'cancelled' : state, cancelled ? 'cancelled' : state);
    const text = state === 'completed' ? `Turn ended: ${detail || 'end_turn'}` : `Turn failed: ${detail}`;
    turn.end = h('p.turn-end', { dataset: { stop: detail || '' } }, text);
    turn.body.append(turn.end);
    // Questions left open are moot once the turn is over.
    for (const p of this.permissions.values()) {
      if (p.turn === turn && !p.resolved) this.settle(p, 'the turn ended');
    }
    this.open = null;
    if (this.activeRun === runId) this.activeRun = null;
    if (this.options.onRunState) this.options.onRunState(state, runId, detail);
  }

  setTurnState(turn, state, word) {
    turn.state.dataset.state = state;
    turn.state.textContent = word;
  }

  current() {
    if (!this.turn) this.turn = this.turnOf(null);
    return this.turn;
  }

  update(u) {
    switch (u.sessionUpdate) {
      case 'agent_message_chunk': return this.chunk('agent', u.content);
      case 'agent_thought_chunk': return this.chunk('thought', u.content);
      case 'user_message_chunk': return this.chunk('user', u.content);
      case 'tool_call': return this.toolCall(u);
      case 'tool_call_update': return this.toolCall(u);
      case 'plan': return this.plan(u.entries || []);
      case 'current_mode_update': return this.note('info', `Mode: ${u.currentModeId}`);
      case 'available_commands_update': return null;
      case 'config_option_update': return this.note('info', 'The agent changed its configuration options.');
      case 'session_info_update': return u.title ? this.note('info', `Session title: ${u.title}`) : null;
      default: return this.note('info', `Update ${u.sessionUpdate || '(unnamed)'}`);
    }
  }

  /** Merges a chunk into the open block of its kind, or opens one. */
  chunk(kind, content) {
    const turn = this.current();
    const text = contentText(content);
    if (!this.open || this.open.kind !== kind || this.open.turn !== turn) {
      const p = h('p.text');
      let el;
      if (kind === 'thought') {
        el = h('details.thought', h('summary', 'Thinking'), p);
      } else {
        el = h(`div.msg.${kind}`, h('span.who', kind === 'agent' ? 'Agent' : 'You'), p);
      }
      turn.body.append(el);
      this.open = { kind, turn, p, node: document.createTextNode('') };
      p.append(this.open.node);
    }
    // One growing text node: screen readers hear the new words (role=log).
    this.open.node.appendData(text);
  }

  toolCall(u) {
    const id = u.toolCallId || uid('tool');
    let tool = this.tools.get(id);
    if (!tool) {
      const turn = this.current();
      const title = h('span.tool-title');
      const status = h('span.badge');
      const kind = h('span.tool-kind');
      const body = h('div.tool-body');
      const headingId = uid('tool');
      const el = h('section.tool', { 'aria-labelledby': headingId, dataset: { tool: id } },
        h('h4', { id: headingId }, 'Tool call: ', title, ' ', kind, ' ', status), body);
      turn.body.append(el);
      tool = { el, title, status, kind, body, turn, content: null, raw: null };
      this.tools.set(id, tool);
      this.open = null;
    }
    if (u.title) tool.title.textContent = u.title;
    if (u.kind) tool.kind.textContent = `(${u.kind})`;
    const status = u.status || (tool.status.dataset.state ? null : 'pending');
    if (status) {
      tool.status.dataset.state = status;
      tool.status.textContent = TOOL_STATUS[status] || status;
    }
    if (Array.isArray(u.content)) {
      const content = h('div.tool-content', u.content.map(toolContent));
      if (tool.content) tool.content.replaceWith(content); else tool.body.prepend(content);
      tool.content = content;
    }
    if (u.locations && u.locations.length && !tool.locations) {
      tool.locations = h('ul.locations', u.locations.map((l) => h('li', h('code', l.line ? `${l.path}:${l.line}` : l.path))));
      tool.body.append(tool.locations);
    }
    if (u.rawInput !== undefined || u.rawOutput !== undefined) {
      const raw = h('details.raw', h('summary', 'Raw input and output'),
        u.rawInput !== undefined ? h('pre', JSON.stringify(u.rawInput, null, 2)) : null,
        u.rawOutput !== undefined ? h('pre', JSON.stringify(u.rawOutput, null, 2)) : null);
      if (tool.raw) tool.raw.replaceWith(raw); else tool.body.append(raw);
      tool.raw = raw;
    }
  }

  plan(entries) {
    const turn = this.current();
    const list = h('ol.plan-entries', entries.map((e) => h('li', { dataset: { state: e.status || 'pending' } },
      h('span.badge', { dataset: { state: e.status || 'pending' } }, (e.status || 'pending').replace('_', ' ')),
      ' ', e.content, e.priority ? h('span.muted', ` (${e.priority} priority)`) : null)));
    const el = h('section.plan', { 'aria-label': 'Plan' }, h('h4', 'Plan'), list);
    // The agent sends the whole plan each time: the latest replaces the last.
    if (turn.plan && turn.plan.parentNode) turn.plan.replaceWith(el); else turn.body.append(el);
    turn.plan = el;
    this.open = null;
  }

  permissionRequested(data) {
    const turn = this.current();
    const title = (data.tool_call && data.tool_call.title) || 'a tool call';
    const headingId = uid('perm');
    const outcome = h('p.perm-outcome', { role: 'status' });
    const p = { turn, resolved: false, buttons: [], outcome, options: data.options || [] };
    p.buttons = p.options.map((o) => h('button', {
      type: 'button',
      class: /^reject/.test(o.kind || '') ? 'danger' : 'primary',
      dataset: { option: o.optionId },
      onclick: () => this.answer(p, data.request_id, o),
    }, o.name || o.optionId));
    const timeout = data.timeout_ms ? h('p.hint', `Unanswered, it is denied after ${Math.round(data.timeout_ms / 1000)} s.`) : null;
    p.el = h('section.permission', { role: 'group', 'aria-labelledby': headingId, dataset: { request: data.request_id } },
      h('h4', { id: headingId }, `Permission requested: ${title}`), timeout,
      h('div.actions', p.buttons), outcome);
    turn.body.append(p.el);
    this.permissions.set(data.request_id, p);
    this.open = null;
    announce(`The agent asks permission: ${title}`);
    // Take the keyboard to the question when nothing else holds it.
    const active = document.activeElement;
    if ((!active || active === document.body || this.log.contains(active)) && p.buttons[0]) p.buttons[0].focus();
  }

  async answer(p, requestId, option) {
    if (p.resolved) return;
    for (const b of p.buttons) b.disabled = true;
    p.outcome.textContent = `Answering ${option.name}…`;
    try {
      await this.options.answer(requestId, option.optionId);
    } catch (e) {
      p.outcome.textContent = `The answer was not taken: ${e.describe ? e.describe() : e.message}`;
      if (!p.resolved) for (const b of p.buttons) b.disabled = false;
    }
  }

  permissionResolved(data) {
    const p = this.permissions.get(data.request_id);
    const outcome = data.outcome || {};
    let text;
    if (outcome.outcome === 'selected') {
      const option = p && p.options.find((o) => o.optionId === outcome.option_id);
      text = `Answered: ${option ? option.name : outcome.option_id} (by ${data.by})`;
    } else {
      text = `Withdrawn (by ${data.by})`;
    }
    if (p) this.settle(p, text);
    else this.note('info', `Permission ${text.toLowerCase()}`);
  }

  settle(p, text) {
    p.resolved = true;
    for (const b of p.buttons) b.disabled = true;
    p.el.dataset.resolved = 'true';
    p.outcome.textContent = text;
  }

  note(level, text) {
    const turn = this.current();
    turn.body.append(h(`p.note.${level}`, text));
    this.open = null;
  }
}

function contentText(content) {
  if (!content) return '';
  switch (content.type) {
    case 'text': return content.text || '';
    case 'image': return `[image ${content.mimeType || ''}]`;
    case 'audio': return `[audio ${content.mimeType || ''}]`;
    case 'resource_link': return `[${content.name || content.uri}]`;
    case 'resource': return (content.resource && content.resource.text) || `[${content.resource && content.resource.uri}]`;
    default: return `[${content.type}]`;
  }
}

function toolContent(c) {
  switch (c.type) {
    case 'diff': return diffView(c.path, c.oldText, c.newText);
    case 'terminal': return h('p.muted', `Terminal ${c.terminalId}`);
    case 'content': return h('pre.tool-output', contentText(c.content));
    default: return h('p.muted', `[${c.type}]`);
  }
}

/** A unified line diff (longest common subsequence), bounded in size. */
export function diffLines(oldText, newText) {
  const a = oldText ? oldText.split('\n') : [];
  const b = newText ? newText.split('\n') : [];
  if (a.length * b.length > 250000) {
    return [...a.map((l) => ['-', l]), ...b.map((l) => ['+', l])];
  }
  const lcs = Array.from({ length: a.length + 1 }, () => new Uint32Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i -= 1) {
    for (let j = b.length - 1; j >= 0; j -= 1) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) { out.push([' ', a[i]]); i += 1; j += 1; }
    else if (lcs[i + 1][j] >= lcs[i][j + 1]) { out.push(['-', a[i]]); i += 1; }
    else { out.push(['+', b[j]]); j += 1; }
  }
  while (i < a.length) { out.push(['-', a[i]]); i += 1; }
  while (j < b.length) { out.push(['+', b[j]]); j += 1; }
  return out;
}

function diffView(path, oldText, newText) {
  const lines = diffLines(oldText, newText);
  const words = { '-': 'removed', '+': 'added', ' ': 'unchanged' };
  return h('figure.diff',
    h('figcaption', oldText === null || oldText === undefined ? 'New file ' : 'Diff of ', h('code', path)),
    h('pre', lines.map(([sign, line]) => h('span', { class: `line ${words[sign]}` },
      h('span', { 'aria-hidden': 'true' }, `${sign} `), sign === ' ' ? null : h('span.visually-hidden', `${words[sign]}: `), `${line}\n`))));
}
