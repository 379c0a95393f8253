// The applied set with each policy's hits and would-denies, the history with the diff of
// each revision, and the recommendation with its evidence (`bulkhead get`, `history`,
// `recommend` and `recommend --diff`), live.

import * as api from '../api.js';
import { h, replace, select, table, time, ago, WINDOWS } from '../dom.js';

export function render(main, rest, ctx) {
  const open = rest.length ? rest.join('/') : '';
  const state = { window: '0' };
  const applied = h('section', { id: 'applied' });
  const history = h('section', { id: 'history' });
  const recommendation = h('section', { id: 'recommendation' });
  replace(main, h('h1', {}, 'Policies'),
    h('div', { class: 'toolbar' }, h('label', {}, 'Hits in ', select(WINDOWS, state.window, (v) => { state.window = v; follow(); }, { id: 'window' }))),
    applied, history, recommendation);
  let stream = null;
  let scrolled = false;
  function follow() {
    if (stream) stream.close();
    stream = api.live('policies', { window: state.window }, {
      onView: (v) => {
        ctx.revision(v.revision);
        draw(v);
        const target = open && document.getElementById(`resource-${open}`);
        if (target && !scrolled) { scrolled = true; target.scrollIntoView(); }
      },
      onFailed: (m) => replace(applied, h('p', { class: 'error' }, m)),
    });
  }

  function draw(v) {
    const rows = v.resources.map((r) => {
      const hits = r.hits;
      const counted = r.kind === 'AuthorizationPolicy' || r.kind === 'DefaultPosture';
      return h('tr', { id: `resource-${r.key}`, class: r.key === open ? 'open' : '', dataset: { key: r.key } },
        h('td', {}, h('details', { open: r.key === open }, h('summary', {}, r.key), h('pre', { class: 'yaml' }, r.yaml))),
        h('td', {}, r.mode || ''),
        h('td', {}, r.summary),
        h('td', { class: 'num allowed-count' }, counted ? hits.allowed : ''),
        h('td', { class: 'num denied-count' }, counted ? hits.denied : ''),
        h('td', { class: 'num would-deny-count' }, counted ? hits.wouldDeny : ''),
        h('td', {}, counted && hits.lastSeen ? ago(hits.lastSeen) : ''));
    });
    replace(applied, h('h2', {}, `Applied at revision ${v.revision}`),
      rows.length ? table(['resource', 'mode', 'summary', 'allowed', 'denied', 'would-deny', 'last hit'], rows, { class: 'resources' }) : h('p', { class: 'muted' }, 'Nothing is applied.'));

    replace(history, h('h2', {}, 'History'), v.history.length ? h('ul', { class: 'revisions' }, v.history.map((r) =>
      h('li', { id: `revision-${r.revision}`, class: 'revision-entry' },
        h('div', {}, h('b', {}, `revision ${r.revision}`), ` · ${r.action} · ${r.actor} · `, h('span', { title: time(r.timeUnix) }, ago(r.timeUnix))),
        h('ul', { class: 'changes' }, r.changes.map((c) => h('li', {}, c))),
        r.diff.map((d) => h('details', { class: 'diff' }, h('summary', {}, d.key),
          h('pre', {}, d.lines.map((l) => h('span', { class: l.op === '+' ? 'add' : l.op === '-' ? 'del' : 'same' }, `${l.op}${l.text}\n`)))))))) : h('p', { class: 'muted' }, 'No revision yet.'));

    const rec = v.recommendation;
    replace(recommendation, h('h2', {}, 'Recommendation'),
      h('p', { class: 'muted' }, `Least-privilege audit policy from ${rec.requests} observed ingress requests (bulkhead recommend); apply it, watch its would-denies, then promote it.`),
      rec.policies.map((p) => h('div', { class: 'recommended' },
        h('h3', {}, `${p.name} for ${p.workload}`),
        p.rules.length ? table(['rule', 'caller', 'ports', 'methods', 'paths', 'requests', 'evidence'], p.rules.map((r) => h('tr', {},
          h('td', {}, r.name), h('td', {}, r.identity), h('td', {}, r.ports.join(', ')), h('td', {}, r.methods.join(', ')),
          h('td', {}, r.paths.join(', ')), h('td', { class: 'num' }, r.requests),
          h('td', {}, h('ul', {}, r.evidence.map((e) => h('li', {}, e))), r.notes.map((n) => h('p', { class: 'muted' }, n)))))) : h('p', { class: 'muted' }, 'No rule: none of its traffic could be recommended.'),
        p.leftOut ? h('p', { class: 'muted' }, `${p.leftOut} kinds of request seen but not recommended (denied, or without an identity); the YAML lists them.`) : null)),
      rec.notes.map((n) => h('p', { class: 'muted' }, n)),
      h('details', {}, h('summary', {}, 'Changes against the recommendation applied now (bulkhead recommend --diff)'), h('pre', { id: 'recommend-diff' }, rec.diff)),
      h('details', {}, h('summary', {}, 'As YAML, with the evidence (bulkhead recommend)'), h('pre', { class: 'yaml', id: 'recommend-yaml' }, rec.yaml)));
  }

  follow();
  return () => { if (stream) stream.close(); };
}
