// One session, live: its event stream (from the first event, so the page
// shows the whole conversation; reconnecting with Last-Event-ID) rendered
// by Conversation, a prompt box, cancel, and the run's state. A closed
// session shows its archived history and stops there.

import { h, append, field, badge, when, confirmDialog, announce, uid } from '../dom.js';
import { get, post, del, authHeaders } from '../api.js';
import { EventStream } from '../sse.js';
import { Conversation } from '../conversation.js';

export const title = 'Session';

const ACTIVE = ['queued', 'dispatching', 'streaming'];

export function render(main, ctx) {
  const id = ctx.match[1];
  const facts = h('dl.facts');
  const streamState = h('span.badge', { dataset: { state: 'connecting' } }, 'connecting');
  const runState = h('p.run-state', { role: 'status', 'aria-live': 'polite' }, 'No turn is running.');
  const log = h('div.conversation', { role: 'log', 'aria-live': 'polite', 'aria-label': 'Conversation', tabindex: '0' });
  const problem = h('p.error', { role: 'alert' });
  problem.hidden = true;
  const prompt = h('textarea', { name: 'prompt', rows: 3, required: true, placeholder: 'Ask the agent…' });
  const send = h('button.primary', { type: 'submit' }, 'Send');
  const cancel = h('button.danger', { type: 'button', disabled: true }, 'Cancel turn');
  const remove = h('button.danger.quiet', { type: 'button' }, 'Delete session');
  let sessionState = null;
  let running = false;
  let sending = false;

  const setRunning = (value, text) => {
    running = value;
    cancel.disabled = !running;
    send.disabled = running || sending || sessionState !== 'ready';
    if (text) runState.textContent = text;
  };

  const conversation = new Conversation(log, {
    answer: (requestId, optionId) => post(`/v1/sessions/${id}/permissions/${encodeURIComponent(requestId)}`, { option_id: optionId }),
    onRunState: (state, runId, detail) => {
      if (state === 'running') setRunning(true, 'The agent is responding…');
      else if (state === 'completed') setRunning(false, `The turn ended: ${detail || 'end_turn'}.`);
      else setRunning(false, `The turn failed: ${detail}`);
      if (state !== 'running') refresh();
    },
  });

  const form = h('form.prompt', {
    onsubmit: async (e) => {
      e.preventDefault();
      const text = prompt.value;
      if (!text.trim() || send.disabled) return;
      sending = true;
      send.disabled = true;
      runState.textContent = 'Sending…';
      try {
        const run = await post(`/v1/sessions/${id}:prompt`, { prompt: text }, { idempotent: true });
        conversation.addPrompt(run.run_id, text);
        prompt.value = '';
        if (conversation.activeRun === run.run_id || ACTIVE.includes(run.state)) {
          if (!conversation.turns.get(run.run_id) || !conversation.turns.get(run.run_id).end) setRunning(true, 'The agent is responding…');
        }
      } catch (err) {
        runState.textContent = `The prompt was not taken: ${err.describe ? err.describe() : err.message}`;
      } finally {
        sending = false;
        send.disabled = running || sessionState !== 'ready';
      }
    },
  }, field('Prompt', prompt, 'Enter sends; Shift+Enter starts a new line.'), h('div.actions', send, cancel));
  prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    runState.textContent = 'Cancelling the turn…';
    try {
      await post(`/v1/sessions/${id}:cancel`);
    } catch (err) {
      runState.textContent = `Could not cancel: ${err.describe ? err.describe() : err.message}`;
      cancel.disabled = !running;
    }
  });

  remove.addEventListener('click', async () => {
    const ok = await confirmDialog(`Delete session ${id}?`, 'The agent\'s session is closed; the last session of a container takes its sandbox with it.', 'Delete session');
    if (!ok) return;
    try {
      await del(`/v1/sessions/${id}`);
      announce(`Session ${id} deleted.`);
      ctx.navigate('#/sessions');
    } catch (err) {
      problem.textContent = `Could not delete: ${err.describe ? err.describe() : err.message}`;
      problem.hidden = false;
    }
  });

  const heading = uid('h');
  main.append(
    h('h1', 'Session ', h('code', id)),
    h('div.session-layout',
      h('section.card.session-facts', { 'aria-labelledby': heading }, h('h2', { id: heading }, 'About'), facts, h('div.actions', remove)),
      h('section.card.session-live', { 'aria-label': 'Live conversation' },
        h('p.stream', 'Stream: ', streamState),
        problem, log, runState, form)));

  const showFacts = (s) => {
    const agent = s.agent || {};
    facts.replaceChildren();
    append(facts, [
      h('dt', 'State'), h('dd', badge(s.state)),
      h('dt', 'Agent'), h('dd', `${agent.id} ${agent.version}`, agent.state ? h('span', ' ', badge(agent.state)) : null),
      h('dt', 'Container'), h('dd', h('a', { href: `#/containers?id=${s.container_id}` }, h('code', s.container_id))),
      h('dt', 'Working directory'), h('dd', h('code', s.working_dir)),
      h('dt', 'Turns'), h('dd', String((s.runs || []).length)),
      h('dt', 'Created'), h('dd', when(s.created_at)),
      s.error ? [h('dt', 'Error'), h('dd.error', `${s.error_code}: ${s.error}`)] : null]);
  };

  let refreshing = null;
  const refresh = () => {
    refreshing = refreshing || get(`/v1/sessions/${id}`).then((s) => {
      refreshing = null;
      if (!ctx.alive()) return s;
      sessionState = s.state;
      showFacts(s);
      send.disabled = running || sending || s.state !== 'ready';
      prompt.disabled = s.state !== 'ready';
      return s;
    }, (err) => {
      refreshing = null;
      if (ctx.alive()) {
        problem.textContent = err.describe ? err.describe() : err.message;
        problem.hidden = false;
      }
      throw err;
    });
    return refreshing;
  };

  // The stream says nothing when setup ends (a new session may have no
  // event yet): the session is read again each second until it is no
  // longer being created, so the prompt box opens.
  let awaiting = false;
  const awaitReady = async () => {
    if (awaiting) return;
    awaiting = true;
    try {
      while (ctx.alive() && sessionState === 'creating') {
        await new Promise((resolve) => { setTimeout(resolve, 1000); });
        if (ctx.alive()) await refresh().catch(() => {});
      }
      if (ctx.alive() && sessionState === 'ready' && !running) runState.textContent = 'The agent is ready.';
    } finally {
      awaiting = false;
    }
  };

  const STREAM_WORDS = { connecting: 'connecting', open: 'live', reconnecting: 'reconnecting', ended: 'ended', denied: 'refused', gone: 'gone' };
  let stream = null;
  refresh().then((s) => {
    if (!ctx.alive()) return;
    const active = (s.runs || []).find((r) => ACTIVE.includes(r.state));
    if (active) setRunning(true, 'A turn is running.');
    if (s.state === 'creating') {
      runState.textContent = 'Setting up the agent…';
      awaitReady();
    }
    stream = new EventStream(`/v1/sessions/${encodeURIComponent(id)}/events`, {
      headers: authHeaders,
      onEvent: (event) => {
        // A session still being created: its setup stages, then its log.
        if (event.type === 'session.setup') {
          const stage = JSON.parse(event.data || '{}').state;
          runState.textContent = `Setting up the agent: ${stage === 'installing' ? 'installing it' : 'starting it'}…`;
          awaitReady();
          return;
        }
        if (event.type === 'session.failed') {
          const f = JSON.parse(event.data || '{}');
          problem.textContent = `The session could not be created: ${f.code ? `${f.code}: ` : ''}${f.error || f.state}`;
          problem.hidden = false;
          refresh().catch(() => {});
          return;
        }
        if (sessionState === 'creating') refresh().catch(() => {});
        conversation.apply(event);
      },
      onState: (state, detail) => {
        streamState.dataset.state = state;
        streamState.textContent = STREAM_WORDS[state] || state;
        if (state === 'denied' || state === 'gone') {
          problem.textContent = `The event stream was refused: ${detail}`;
          problem.hidden = false;
        }
      },
      // The server ends the stream of a session that is over: stop then.
      shouldReconnect: async () => {
        try {
          const again = await refresh();
          return again.state === 'ready' || again.state === 'creating';
        } catch (_) {
          return true;
        }
      },
    }).start();
  }, () => {});

  return () => {
    if (stream) stream.close();
  };
}
