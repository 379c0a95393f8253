// The console's entry point: logs in (from the address's #token=… or the form), then shows
// one page at a time by the address's fragment (#/graph, #/workload/ns/name, #/policies,
// #/tap, #/events). Each page follows its live view and stops when left.

import * as api from './api.js';
import { h, replace } from './dom.js';
import * as graph from './pages/graph.js';
import * as workload from './pages/workload.js';
import * as policies from './pages/policies.js';
import * as tapPage from './pages/tap.js';
import * as events from './pages/events.js';

const PAGES = [
  ['graph', 'Graph', graph],
  ['workload', 'Workloads', workload],
  ['policies', 'Policies', policies],
  ['tap', 'Tap', tapPage],
  ['events', 'Events', events],
];

let teardown = () => {};
let lastRevision = null;

const ctx = {
  /** Every view carries the revision it was computed at; the header shows it. */
  revision(n) {
    const el = document.getElementById('revision');
    if (lastRevision !== null && n !== lastRevision) {
      el.classList.remove('changed');
      void el.offsetWidth; // restart the highlight
      el.classList.add('changed');
    }
    lastRevision = n;
    el.textContent = `revision ${n}`;
  },
  go(hash) { location.hash = hash; },
};

function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  const name = parts[0] || 'graph';
  const page = PAGES.find(([n]) => n === name) || PAGES[0];
  return { page, rest: parts.slice(1) };
}

function show() {
  teardown();
  const main = document.getElementById('main');
  const { page, rest } = route();
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === page[0]);
  replace(main);
  main.dataset.page = page[0];
  teardown = page[2].render(main, rest, ctx) || (() => {});
}

function showLogin(message) {
  teardown();
  teardown = () => {};
  replace(document.getElementById('nav'));
  replace(document.getElementById('who'));
  replace(document.getElementById('revision'));
  const main = document.getElementById('main');
  main.dataset.page = 'login';
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', placeholder: 'login token', 'aria-label': 'login token' });
  const error = h('p', { class: 'error', id: 'login-error' }, message || '');
  const form = h('form', { id: 'login', class: 'login',
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api.login(input.value.trim());
        start();
      } catch (err) {
        error.textContent = err.message;
      }
    } },
  h('h1', {}, 'Log in to the Bulkhead console'),
  h('p', {}, 'Run ', h('code', {}, 'bulkhead console token'), ' with the admin credential and open the address it prints, or paste its token here (',
    h('code', {}, '--token-only'), '). A token works once, within 15 minutes.'),
  input, h('button', { type: 'submit' }, 'Log in'), error);
  replace(main, form);
}

async function start(message) {
  let who;
  try {
    who = await api.session();
  } catch (e) {
    return showLogin(e.message);
  }
  if (!who) return showLogin(message);
  replace(document.getElementById('nav'),
    PAGES.map(([name, label]) => h('a', { href: `#/${name}`, dataset: { page: name } }, label)));
  replace(document.getElementById('who'),
    h('span', { class: 'actor', title: who.via === 'certificate' ? 'admin client certificate' : 'session' }, who.actor),
    h('button', { id: 'logout', class: 'link', onclick: async () => { await api.logout(); showLogin('Logged out.'); } }, 'Log out'));
  show();
}

api.whenUnauthorized(() => showLogin('The session ended; log in again.'));
/** Logs in with the address's `#token=…`, if it holds one; false when it does not. */
async function loginFromAddress() {
  const token = location.hash.match(/^#token=([A-Za-z0-9_-]+)/);
  if (!token) return false;
  // The token leaves the address bar (and history) before anything else happens.
  history.replaceState(null, '', `${location.pathname}#/graph`);
  try {
    await api.login(token[1]);
  } catch (e) {
    showLogin(e.message);
    return true;
  }
  start();
  return true;
}

// A login address opened in a tab that already shows the console (or its login form) is a
// change of the address's fragment only: no page load, so it is handled here too.
window.addEventListener('hashchange', async () => {
  if (await loginFromAddress()) return;
  if (document.getElementById('main').dataset.page !== 'login') show();
});

(async () => {
  if (!(await loginFromAddress())) start();
})();
