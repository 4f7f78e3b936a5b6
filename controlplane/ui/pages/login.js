// Log in: an API token (agentd token create, or <state-dir>/admin.token),
// checked against the server before it is kept, in this tab's
// sessionStorage only: never in a URL, a cookie or localStorage.

import { h, field } from '../dom.js';
import { get, setToken } from '../api.js';

export const title = 'Log in';

export function render(main, ctx) {
  const why = sessionStorage.getItem('agentd.why');
  sessionStorage.removeItem('agentd.why');
  const input = h('input', { type: 'password', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true });
  const error = h('p.error', { id: 'login-error', role: 'alert' }, why || '');
  error.hidden = !why;
  const button = h('button.primary', { type: 'submit' }, 'Log in');
  const form = h('form.card.login', {
    onsubmit: async (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      button.disabled = true;
      error.hidden = true;
      try {
        // Any read proves the token; it is kept only once it worked.
        await get('/v1/sessions?limit=1', { headers: { Authorization: `Bearer ${value}` } });
        setToken(value);
        const after = sessionStorage.getItem('agentd.after');
        sessionStorage.removeItem('agentd.after');
        ctx.navigate(after && after !== '#/login' ? after : '#/overview');
      } catch (err) {
        error.textContent = err.describe ? err.describe() : err.message;
        error.hidden = false;
        input.setAttribute('aria-invalid', 'true');
        input.focus();
      } finally {
        button.disabled = false;
      }
    },
  },
  field('API token', input, 'A token from `agentd token create` (or the admin token in <state-dir>/admin.token). It is kept in this browser tab only and sent as a bearer header.'),
  h('div.actions', button),
  error);
  input.setAttribute('aria-errormessage', 'login-error');
  main.append(h('h1', 'Log in to agentd'), form);
  return null;
}
