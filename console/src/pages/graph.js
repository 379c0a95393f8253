// The service graph: `bulkhead graph`'s lines drawn live, nodes grouped by namespace, each
// edge coloured by what was decided (denied if any request was refused, else would-deny if
// audit mode would refuse some, else allowed) and labelled with its counts. Clicking an
// edge lists its decisions with policy, rule, revision and the nearest miss of each default
// deny; clicking a workload opens it.

import * as api from '../api.js';
import { h, replace, select, table, time, ago, WINDOWS } from '../dom.js';
import { cytoscape, COLOURS, baseStyle } from '../graphstyle.js';

const VERDICTS = ['allowed', 'denied', 'would-deny'];

export function render(main, _rest, ctx) {
  const state = { window: '0', namespace: '', protocol: '', verdicts: new Set(VERDICTS), view: null, selected: null };
  const container = h('div', { id: 'graph', class: 'graph' });
  const detail = h('aside', { id: 'detail', class: 'detail' }, legend(), h('p', { class: 'muted' }, 'Click an edge for its decisions, a workload to open it.'));
  const lines = h('div', { id: 'lines' });
  const status = h('span', { id: 'graph-status', class: 'muted' }, 'Waiting for the graph…');
  const namespaces = h('span');
  const protocols = h('span');
  const toolbar = h('div', { class: 'toolbar' },
    h('label', {}, 'Window ', select(WINDOWS, state.window, (v) => { state.window = v; follow(); }, { id: 'window' })),
    h('label', {}, 'Namespace ', namespaces),
    h('label', {}, 'Protocol ', protocols),
    VERDICTS.map((v) => h('label', { class: `verdict ${v}` },
      h('input', { type: 'checkbox', checked: true, id: `show-${v}`, onchange: (e) => {
        if (e.target.checked) state.verdicts.add(v); else state.verdicts.delete(v);
        filter();
      } }), ` ${v}`)),
    status);
  replace(main, h('h1', {}, 'Service graph'), toolbar, h('div', { class: 'split' }, container, detail), lines);

  const cy = cytoscape({
    container,
    style: baseStyle(),
    boxSelectionEnabled: false,
    autoungrabify: false,
  });
  cy.on('tap', 'edge', (e) => { state.selected = e.target.id(); showEdge(); });
  cy.on('tap', 'node[kind = "workload"]', (e) => ctx.go(`#/workload/${e.target.id()}`));

  let stream = null;
  function follow() {
    if (stream) stream.close();
    stream = api.live('graph', { window: state.window }, {
      onView: (v) => { state.view = v; ctx.revision(v.revision); draw(v); if (state.selected) showEdge(); },
      onFailed: (m) => { status.textContent = m; },
    });
  }

  function draw(v) {
    replace(namespaces, select([['', 'all'], ...v.namespaces.map((n) => [n, n])], state.namespace, (x) => { state.namespace = x; filter(); }, { id: 'namespace' }));
    replace(protocols, select([['', 'all'], ...v.protocols.map((p) => [p, p])], state.protocol, (x) => { state.protocol = x; filter(); }, { id: 'protocol' }));
    const wanted = new Set();
    let added = false;
    cy.batch(() => {
      for (const ns of v.namespaces) {
        const id = `ns:${ns}`;
        wanted.add(id);
        if (cy.getElementById(id).empty()) { cy.add({ group: 'nodes', data: { id, label: ns, kind: 'namespace' } }); added = true; }
      }
      for (const n of v.nodes) {
        wanted.add(n.id);
        const data = { id: n.id, label: label(n), kind: n.kind, namespace: n.namespace, declared: n.declared, parent: `ns:${n.namespace}` };
        const el = cy.getElementById(n.id);
        if (el.empty()) { cy.add({ group: 'nodes', data }); added = true; } else el.data(data);
      }
      for (const l of v.lines) {
        wanted.add(l.id);
        const data = {
          id: l.id, source: l.source, target: l.destination, label: edgeLabel(l), cls: l.class,
          allowed: l.allowed, denied: l.denied, wouldDeny: l.wouldDeny, wouldAllow: l.wouldAllow,
          protocol: l.protocol, port: l.port, decided: l.decided, rate: l.ratePerMinute, lastSeen: l.lastSeen,
        };
        const el = cy.getElementById(l.id);
        if (el.empty()) { cy.add({ group: 'edges', data, classes: l.class }); added = true; } else {
          el.data(data);
          el.classes(l.class);
        }
      }
      cy.elements().filter((el) => !wanted.has(el.id())).remove();
    });
    if (added) layout();
    filter();
    const shown = v.lines.length;
    status.textContent = `${shown} edge${shown === 1 ? '' : 's'} from ${v.records} reported records${v.dropped ? `; ${v.dropped} requests dropped by sidecars` : ''} · updated ${time(v.now)}`;
    drawTable(v);
  }

  // The same graph is always laid out the same way (no random start), so a reload, or two
  // operators looking at it, see the same picture: callers above the workloads they call,
  // in the order of their names, nodes never on top of each other.
  function layout() {
    cy.layout({ name: 'breadthfirst', directed: true, animate: false, avoidOverlap: true, nodeDimensionsIncludeLabels: true, spacingFactor: 1.4, padding: 30, sort: (a, b) => (a.id() < b.id() ? -1 : a.id() > b.id() ? 1 : 0) }).run();
    cy.fit(undefined, 30);
  }

  function visible(l) {
    const ns = state.namespace;
    const srcNs = (cy.getElementById(l.source).data('namespace')) || '';
    const dstNs = (cy.getElementById(l.destination).data('namespace')) || '';
    return state.verdicts.has(l.class)
      && (!state.protocol || l.protocol === state.protocol)
      && (!ns || srcNs === ns || dstNs === ns);
  }

  function filter() {
    if (!state.view) return;
    const show = new Set();
    cy.batch(() => {
      for (const l of state.view.lines) {
        const on = visible(l);
        cy.getElementById(l.id).toggleClass('hidden', !on);
        if (on) { show.add(l.source); show.add(l.destination); }
      }
      for (const n of state.view.nodes) {
        const inNs = !state.namespace || n.namespace === state.namespace;
        const keep = show.has(n.id) || (inNs && state.verdicts.size === VERDICTS.length && !state.protocol);
        cy.getElementById(n.id).toggleClass('hidden', !keep);
      }
      for (const ns of state.view.namespaces) {
        const kids = cy.getElementById(`ns:${ns}`).children().filter((c) => !c.hasClass('hidden'));
        cy.getElementById(`ns:${ns}`).toggleClass('hidden', kids.empty());
      }
    });
    for (const row of lines.querySelectorAll('tbody tr')) {
      const l = state.view.lines.find((x) => x.id === row.dataset.id);
      row.hidden = !l || !visible(l);
    }
  }

  function drawTable(v) {
    const rows = v.lines.map((l) => h('tr', { dataset: { id: l.id }, class: `row ${l.class}`, onclick: () => { state.selected = l.id; showEdge(); } },
      h('td', {}, h('span', { class: `swatch ${l.class}`, title: l.class }), l.source),
      h('td', {}, l.destination), h('td', { class: 'num' }, l.port), h('td', {}, l.protocol),
      h('td', { class: 'num allowed-count' }, l.allowed), h('td', { class: 'num denied-count' }, l.denied),
      h('td', { class: 'num would-deny-count' }, l.wouldDeny), h('td', { class: 'num' }, l.ratePerMinute),
      h('td', {}, l.decided), h('td', { title: time(l.lastSeen) }, ago(l.lastSeen))));
    replace(lines, table(['source', 'destination', 'port', 'protocol', 'allowed', 'denied', 'would-deny', 'per minute', 'seen by', 'last seen'], rows, { id: 'lines-table', class: 'lines' }));
    filter();
  }

  let asked = 0;
  async function showEdge() {
    const l = state.view && state.view.lines.find((x) => x.id === state.selected);
    cy.elements().unselect();
    if (!l) { replace(detail, legend(), h('p', { class: 'muted' }, 'That edge is not in this window any more.')); return; }
    cy.getElementById(l.id).select();
    const mine = ++asked;
    let d;
    try {
      d = await api.getJSON(`/api/view/edge${api.query({ window: state.window, source: l.source, destination: l.destination, port: l.port, decided: l.decided })}`);
    } catch (e) {
      if (mine === asked) replace(detail, h('p', { class: 'error' }, e.message));
      return;
    }
    if (mine !== asked) return;
    replace(detail,
      h('h2', { id: 'edge-title' }, `${l.source} → ${l.destination}:${l.port}`),
      h('p', {}, h('span', { class: `badge ${l.class}` }, l.class), ` ${l.protocol}, seen by the ${l.decided === 'ingress' ? "destination's" : "source's"} sidecar · ${l.allowed} allowed, ${l.denied} denied, ${l.wouldDeny} would-deny · ${l.ratePerMinute}/min · last seen ${ago(l.lastSeen)}`),
      h('ol', { id: 'decisions', class: 'decisions' }, d.decisions.map(decision)),
      l.source.includes('/') && !l.source.startsWith('spiffe://') ? h('p', {}, h('a', { href: `#/workload/${l.source}` }, `blast radius of ${l.source} →`)) : null);
  }

  follow();
  return () => { if (stream) stream.close(); cy.destroy(); };
}

function decision(d) {
  const what = [d.method, d.path].filter(Boolean).join(' ') || `${d.protocol} connections`;
  const by = d.rule ? `policy ${d.policy} rule ${d.rule}` : d.policy === 'built-in' ? 'the built-in posture' : `posture ${d.policy}`;
  return h('li', { class: `decision ${d.verdict}`, dataset: { verdict: d.verdict, what, revision: d.revision, policy: d.policy || '' } },
    h('div', { class: 'what' }, h('span', { class: `badge ${d.verdict}` }, d.verdict), ` ${what} · ${d.count} request${d.count === 1 ? '' : 's'} · last seen ${ago(d.lastSeen)}`),
    h('div', { class: 'by' }, 'decided by ',
      d.resource ? h('a', { href: `#/policies/${encodeURIComponent(d.resource)}`, class: 'policy-link' }, by) : by,
      `, revision ${d.revision}`),
    d.nearestMiss ? h('div', { class: 'nearest-miss' }, 'nearest miss: policy ',
      h('a', { href: `#/policies/${encodeURIComponent(`AuthorizationPolicy/${d.nearestMiss.policy}`)}` }, d.nearestMiss.policy),
      ` rule ${d.nearestMiss.rule} ${d.nearestMiss.matched.length ? `matched the ${d.nearestMiss.matched.join(' and ')} but not ` : 'did not match '}${d.nearestMiss.failed}`) : null,
    h('div', { class: 'explanation' }, d.explanation),
    d.replayAgrees ? null : h('div', { class: 'warn' }, 'Replayed without its headers, host and address, this request is decided differently; the recorded verdict above is what happened.'));
}

function label(n) {
  if (n.kind === 'workload') return n.id.split('/').slice(1).join('/');
  return n.id;
}

function edgeLabel(l) {
  const parts = [`${l.port}/${l.protocol}`];
  if (l.allowed) parts.push(`${l.allowed} ok`);
  if (l.denied) parts.push(`${l.denied} denied`);
  if (l.wouldDeny) parts.push(`${l.wouldDeny} would-deny`);
  return parts.join(' · ');
}

function legend() {
  return h('div', { class: 'legend' }, Object.keys(COLOURS).map((c) => h('span', { class: 'item' }, h('span', { class: `swatch ${c}` }), ` ${c}`)));
}
