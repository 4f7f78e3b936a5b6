// Small DOM helpers. Everything reaches the page as text nodes or
// attributes: no HTML string is ever parsed (the CSP enforces Trusted
// Types, so assigning an HTML string would throw).

/** h('tag.class', {attr: value, onclick: fn}, ...children) */
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split('.');
  const el = document.createElement(tag || 'div');
  if (classes.length) el.className = classes.join(' ');
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'class') {
      el.className = [el.className, value].filter(Boolean).join(' ');
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (key === 'value' || key === 'checked' || key === 'selected') {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

let nextId = 0;
/** A document-unique id for label/aria wiring. */
export function uid(prefix = 'id') {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

/** A labelled form control: <label for> + control (+ hint). */
export function field(label, control, hint) {
  if (!control.id) control.id = uid('f');
  const parts = [h('label', { for: control.id }, label), control];
  if (hint) {
    const hintId = uid('hint');
    control.setAttribute('aria-describedby', hintId);
    parts.push(h('p.hint', { id: hintId }, hint));
  }
  return h('div.field', parts);
}

export function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

/** ms since the epoch -> "12 s ago", with the exact time in a <time>. */
export function when(ms) {
  if (!ms) return h('span', '–');
  const date = new Date(ms);
  return h('time', { datetime: date.toISOString(), title: date.toLocaleString() }, ago(ms));
}

export function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

/** A state word as a badge; the word itself carries the meaning. */
export function badge(state) {
  return h('span.badge', { dataset: { state: state || 'unknown' } }, state || 'unknown');
}

export function labels(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h('span.muted', '–');
  return h('ul.labels', entries.map(([k, v]) => h('li', `${k}=${v}`)));
}

/** A table with a caption, column headers and rows of cells; each cell
 *  knows its column's name, which narrow screens show beside it. */
export function table(caption, columns, rows, empty = 'Nothing here yet.') {
  if (!rows.length) return h('p.empty', { role: 'status' }, empty);
  return h('div.table-wrap',
    h('table',
      h('caption', caption),
      h('thead', h('tr', columns.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', rows.map((cells) => h('tr', cells.map((cell, i) => h('td', { 'data-label': columns[i] }, cell)))))));
}

/** Says `text` to screen readers (the polite live region). */
export function announce(text) {
  const region = document.getElementById('announce');
  if (!region) return;
  region.textContent = '';
  // A fresh text node, a moment later: announced even if equal to the last.
  setTimeout(() => { region.textContent = text; }, 30);
}

/** A modal confirmation (<dialog>: focus moves in, Escape cancels, focus
 *  returns to the opener). Resolves true on confirm. */
export function confirmDialog(title, message, confirmLabel = 'Confirm') {
  const dialog = document.getElementById('confirm');
  const opener = document.activeElement;
  // A refresh may have replaced the opener meanwhile: its twin has its key.
  const key = opener && opener.dataset ? opener.dataset.key : null;
  dialog.querySelector('#confirm-title').textContent = title;
  dialog.querySelector('#confirm-message').textContent = message;
  const ok = dialog.querySelector('#confirm-ok');
  ok.textContent = confirmLabel;
  return new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener('close', done);
      resolve(dialog.returnValue === 'confirm');
      const back = opener && opener.isConnected ? opener : key && document.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (back) back.focus();
    };
    dialog.returnValue = '';
    dialog.addEventListener('close', done);
    dialog.showModal();
    dialog.querySelector('#confirm-cancel').focus();
  });
}

/** Calls `fn` now and every `ms` while the page is shown and `alive()`. */
export function every(ms, fn, alive) {
  let timer = null;
  const tick = async () => {
    timer = null;
    if (!alive()) return;
    if (document.visibilityState === 'visible') {
      try { await fn(); } catch (_) { /* the page shows its own errors */ }
    }
    if (alive()) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { if (timer) clearTimeout(timer); };
}

/** Runs `render` (which replaces what is inside `container`) and gives the
 *  keyboard focus back to the control with the same `data-key`, so a
 *  refresh never throws a keyboard user back to the top. */
export function keepFocus(container, render) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.key : null;
  render();
  if (key) {
    const again = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (again && !again.disabled) again.focus();
  }
}
