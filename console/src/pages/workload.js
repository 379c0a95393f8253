// One workload: what it is, the proxies serving it, who can reach it and its blast radius,
// from policy (`bulkhead reach`) and from traffic (`--observed`), the blast radius drawn as
// a subgraph with hop counts. Live: an apply redraws it without a reload.

import * as api from '../api.js';
import { h, replace, select, table, time, ago, WINDOWS } from '../dom.js';
import { cytoscape, baseStyle } from '../graphstyle.js';

export function render(main, rest, ctx) {
  const name = rest.length >= 2 ? `${rest[0]}/${rest[1]}` : '';
  if (!name) return pick(main, ctx);
  const state = { staged: false, stolenKey: false, window: '0' };
  const header = h('div', { class: 'toolbar' },
    h('label', {}, h('input', { type: 'checkbox', id: 'staged', onchange: (e) => { state.staged = e.target.checked; follow(); } }), ' staged (audit policies as if enforced)'),
    h('label', {}, h('input', { type: 'checkbox', id: 'stolen-key', onchange: (e) => { state.stolenKey = e.target.checked; follow(); } }), ' stolen key (egress not enforced)'),
    h('label', {}, 'Traffic ', select(WINDOWS, state.window, (v) => { state.window = v; follow(); }, { id: 'window' })));
  const summary = h('div', { id: 'blast-summary', class: 'summary' });
  const container = h('div', { id: 'blast-graph', class: 'graph small' });
  const body = h('div', { id: 'workload-body' }, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, h('a', { href: '#/workload' }, 'Workloads'), ' / ', name), header,
    h('section', {}, h('h2', {}, `Blast radius: if ${name} is compromised`), summary, container), body);

  const cy = cytoscape({ container, style: baseStyle(), boxSelectionEnabled: false });
  cy.on('tap', 'node', (e) => { if (e.target.id() !== name) ctx.go(`#/workload/${e.target.id()}`); });
  let stream = null;
  let drawn = '';
  function follow() {
    if (stream) stream.close();
    drawn = '';
    stream = api.live('workload', { name, view: state.staged ? 'staged' : '', egress: state.stolenKey ? 'bypassed' : '', window: state.window }, {
      onView: (v) => { ctx.revision(v.revision); draw(v); },
      onFailed: (m) => replace(body, h('p', { class: 'error' }, m)),
    });
  }

  function draw(v) {
    const blast = v.blastRadius;
    if (blast) {
      const oneHop = blast.reached.filter((r) => r.hops === 1).length;
      replace(summary,
        h('span', { class: 'stat', id: 'reached-count' }, h('b', {}, blast.reached.length), ` of ${v.otherWorkloads} other workloads reachable`),
        h('span', { class: 'stat', id: 'one-hop-count' }, h('b', {}, oneHop), ' in one hop'),
        h('span', { class: 'stat', id: 'edge-count' }, h('b', {}, blast.edges.length), ` edge${blast.edges.length === 1 ? '' : 's'} an attacker could use`),
        h('span', { class: 'muted' }, ` · from policy, revision ${v.revision}${v.assumptions.view === 'staged' ? ', staged' : ''}${v.assumptions.egress === 'bypassed' ? ', stolen key' : ''}`));
      const key = JSON.stringify([blast.reached.map((r) => [r.workload, r.hops]), blast.edges.map((e) => [e.from, e.to, e.port])]);
      if (key !== drawn) {
        drawn = key;
        cy.elements().remove();
        cy.add({ group: 'nodes', data: { id: name, label: `${name}\ncompromised` }, classes: 'start' });
        for (const r of blast.reached) cy.add({ group: 'nodes', data: { id: r.workload, label: `${r.workload}\n${r.hops} hop${r.hops === 1 ? '' : 's'}`, hops: r.hops } });
        for (const e of blast.edges) {
          cy.add({ group: 'edges', data: { id: `${e.from}|${e.to}|${e.port}`, source: e.from, target: e.to, label: `${e.port}/${e.protocol}` }, classes: 'reach' });
        }
        cy.layout({ name: 'breadthfirst', directed: true, roots: [name], spacingFactor: 1.3, padding: 20, animate: false }).run();
        cy.fit(undefined, 20);
      }
    } else {
      replace(summary, h('p', { class: 'warn' }, v.policyError || 'No answer from policy.'));
      cy.elements().remove();
      drawn = '';
    }
    replace(body,
      declared(v),
      h('section', {}, h('h2', {}, 'Proxies serving it'), proxies(v.proxies)),
      h('section', {}, h('h2', {}, 'Who can reach it'),
        h('h3', {}, 'From policy'), reachTable(v.whoCanReach, 'from'),
        h('h3', {}, 'From traffic that got through'), observedTable(v.observedCallers, 'caller')),
      h('section', {}, h('h2', {}, 'What it can reach'),
        h('h3', {}, 'From policy, hop by hop'), blast ? reachedTable(blast.reached) : null,
        h('h3', {}, 'From traffic that got through'), observedTable(v.observedReach, 'workload')));
  }

  follow();
  return () => { if (stream) stream.close(); cy.destroy(); };
}

function declared(v) {
  const d = v.declared;
  if (!d) return h('section', {}, h('p', { class: 'warn' }, `No Workload declares ${v.name}: it is only seen in traffic, and policy cannot be analysed for it.`));
  return h('section', { id: 'identity' },
    h('h2', {}, 'Identity'),
    h('dl', { class: 'facts' },
      h('dt', {}, 'SPIFFE ID'), h('dd', {}, h('code', {}, d.identity)),
      h('dt', {}, 'ports'), h('dd', {}, d.ports.map((p) => `${p.port}/${p.protocol}`).join(', ') || '-'),
      h('dt', {}, 'labels'), h('dd', {}, Object.entries(d.labels).map(([k, x]) => `${k}=${x}`).join(', ') || '-'),
      h('dt', {}, 'addresses'), h('dd', {}, d.addresses.join(', ') || '-')));
}

function proxies(list) {
  if (!list.length) return h('p', { class: 'muted' }, 'No proxy of this workload has connected since the control plane started.');
  return table(['identity', 'stream', 'revision', 'last contact', 'certificate expires', 'bundle'], list.map((p) => h('tr', {},
    h('td', {}, p.spiffeId), h('td', {}, p.connected ? 'open' : 'closed'),
    h('td', {}, p.nackedRevision ? `${p.nackedRevision} refused (${p.nackError}), ${p.ackedRevision} in force` : p.ackedRevision === p.sentRevision ? `${p.ackedRevision} acknowledged` : `${p.sentRevision} sent, ${p.ackedRevision} acknowledged`),
    h('td', { title: time(p.lastContactUnix) }, ago(p.lastContactUnix)),
    h('td', { title: time(p.certNotAfterUnix) }, ago(p.certNotAfterUnix)),
    h('td', {}, p.bundleCurrent ? 'current' : 'stale'))), { id: 'proxies' });
}

function reachTable(edges, side) {
  if (!edges) return h('p', { class: 'muted' }, '-');
  if (!edges.length) return h('p', { class: 'muted' }, 'Nothing.');
  return table([side, 'port', 'protocol', 'allowed by'], edges.map((e) => h('tr', {},
    h('td', {}, e[side]), h('td', { class: 'num' }, e.port), h('td', {}, e.protocol), h('td', {}, e.allowedBy))), { id: 'who-can-reach' });
}

function reachedTable(reached) {
  if (!reached.length) return h('p', { class: 'muted' }, 'Nothing.');
  return table(['workload', 'hops', 'path'], reached.map((r) => h('tr', { dataset: { workload: r.workload, hops: r.hops } },
    h('td', {}, h('a', { href: `#/workload/${r.workload}` }, r.workload)), h('td', { class: 'num' }, r.hops),
    h('td', {}, [r.path[0] ? r.path[0].from : '', ...r.path.map((e) => ` → ${e.to}:${e.port}`)].join('')))), { id: 'reached' });
}

function observedTable(rows, first) {
  if (!rows.length) return h('p', { class: 'muted' }, 'Nothing in this window.');
  return table([first, 'hops', 'path'], rows.map((r) => h('tr', {},
    h('td', {}, r.party), h('td', { class: 'num' }, r.hops), h('td', {}, r.path.join(' → ')))));
}

/** Without a name: every workload declared or seen, to pick from. */
function pick(main, ctx) {
  const list = h('div', { id: 'workloads' }, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, 'Workloads'), list);
  const stream = api.live('graph', {}, {
    onView: (v) => {
      ctx.revision(v.revision);
      const rows = v.nodes.filter((n) => n.kind === 'workload').map((n) => h('tr', {},
        h('td', {}, h('a', { href: `#/workload/${n.id}` }, n.id)), h('td', {}, n.declared ? 'declared' : 'seen in traffic only')));
      replace(list, table(['workload', ''], rows));
    },
    onFailed: (m) => replace(list, h('p', { class: 'error' }, m)),
  });
  return () => stream.close();
}
