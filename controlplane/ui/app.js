// The dashboard's shell: hash routes (#/overview, #/sessions/ID, ...; the
// server serves one page), the login gate, the banner that says when the
// server cannot be reached, and focus moved to each new page's heading.

import { token, setToken, onConnectivity } from './api.js';
import * as login from './pages/login.js';
import * as overview from './pages/overview.js';
import * as containers from './pages/containers.js';
import * as sessions from './pages/sessions.js';
import * as session from './pages/session.js';
import * as registry from './pages/registry.js';
import * as audit from './pages/audit.js';

const ROUTES = [
  [/^\/login$/, login],
  [/^\/overview$/, overview],
  [/^\/containers$/, containers],
  [/^\/sessions$/, sessions],
  [/^\/sessions\/([A-Za-z0-9_.-]+)$/, session],
  [/^\/registry$/, registry],
  [/^\/audit$/, audit],
];

const main = document.getElementById('main');
const banner = document.getElementById('banner');
const nav = document.getElementById('nav');
const logout = document.getElementById('logout');

/** The current page's cleanup (streams, timers) and generation. */
let cleanup = null;
let generation = 0;

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/overview';
  const at = raw.indexOf('?');
  let path = at < 0 ? raw : raw.slice(0, at);
  try {
    path = decodeURIComponent(path);
  } catch (_) { /* a malformed escape: no page matches it */ }
  return { path: path || '/overview', params: new URLSearchParams(at < 0 ? '' : raw.slice(at + 1)) };
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function showBanner(text) {
  banner.textContent = text;
  banner.hidden = !text;
}

function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  generation += 1;
  const mine = generation;
  const { path, params } = parseHash();
  const signedIn = Boolean(token());
  nav.hidden = !signedIn;
  logout.hidden = !signedIn;
  if (!signedIn && path !== '/login') {
    sessionStorage.setItem('agentd.after', `#${path}${params.toString() ? `?${params}` : ''}`);
    location.replace('#/login');
    return;
  }
  let page = null;
  let match = null;
  for (const [pattern, candidate] of ROUTES) {
    match = path.match(pattern);
    if (match) {
      page = candidate;
      break;
    }
  }
  for (const a of nav.querySelectorAll('a')) {
    const here = path === a.getAttribute('href').slice(1) || (path.startsWith('/sessions/') && a.getAttribute('href') === '#/sessions');
    if (here) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  main.replaceChildren();
  if (!page) {
    document.title = 'Not found · agentd';
    main.append(Object.assign(document.createElement('h1'), { textContent: 'No such page', tabIndex: -1 }));
    main.querySelector('h1').focus();
    return;
  }
  document.title = `${page.title} · agentd`;
  const ctx = { alive: () => generation === mine, navigate, params, match };
  cleanup = page.render(main, ctx) || null;
  const heading = main.querySelector('h1');
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: false });
  }
  // Which route is shown (hashchange comes after the hash itself changes):
  // the tests wait for it before looking at the new page.
  main.dataset.route = path;
}

onConnectivity((error) => {
  if (!error) {
    showBanner('');
    return;
  }
  if (error.kind === 'unreachable') {
    showBanner(error.describe());
  } else if (error.kind === 'unauthorized' && parseHash().path !== '/login') {
    setToken(null);
    sessionStorage.setItem('agentd.why', error.describe());
    sessionStorage.setItem('agentd.after', location.hash);
    navigate('#/login');
  }
});

logout.addEventListener('click', () => {
  setToken(null);
  sessionStorage.removeItem('agentd.after');
  navigate('#/login');
});

document.getElementById('skip').addEventListener('click', () => {
  const heading = main.querySelector('h1');
  (heading || main).focus();
});

window.addEventListener('hashchange', route);
route();
