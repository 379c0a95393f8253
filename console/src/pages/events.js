// Anomalies (`bulkhead events`): a new edge, an identity never seen before, a spike of
// denials, newest first, live.

import * as api from '../api.js';
import { h, replace, table, time } from '../dom.js';

export function render(main, _rest, ctx) {
  const note = h('p', { id: 'learning', class: 'muted' });
  const list = h('div', { id: 'events' }, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, 'Events'), note, list);
  const stream = api.live('events', {}, {
    onView: (v) => {
      note.textContent = v.learningUntil
        ? `Learning the baseline until ${time(v.learningUntil)}: new edges and identities seen before then are not reported.`
        : 'New edges, identities never seen before and spikes of denials, as flow reports reveal them.';
      const rows = [...v.events].reverse().map((e) => h('tr', { class: `event ${e.kind}`, dataset: { seq: e.seq } },
        h('td', {}, time(e.at)), h('td', {}, h('span', { class: `badge ${e.kind}` }, e.kind)),
        h('td', {}, `${e.sourceIdentity || (e.sourceWorkload ? `${e.sourceWorkload.namespace}/${e.sourceWorkload.name}` : '')} → ${e.destination ? `${e.destination.namespace}/${e.destination.name}${e.port ? `:${e.port}` : ''}` : ''}`),
        h('td', {}, e.detail)));
      replace(list, rows.length ? table(['time', 'kind', 'caller → destination', 'detail'], rows, { id: 'events-table' }) : h('p', { class: 'muted' }, 'No event yet.'));
    },
    onFailed: (m) => replace(list, h('p', { class: 'error' }, m)),
  });
  return () => stream.close();
}
