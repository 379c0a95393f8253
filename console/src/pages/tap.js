// `bulkhead tap` in the browser: one workload's decisions as they happen, with the CLI's
// filters, which run in the sidecars. Nothing is stored; the stream ends when the page does.

import * as api from '../api.js';
import { h, replace, table } from '../dom.js';

const MAX_ROWS = 500;

export function render(main, rest, ctx) {
  const fields = {};
  const field = (name, label, props = {}) => {
    fields[name] = h('input', { id: `tap-${name}`, name, ...props });
    return h('label', {}, `${label} `, fields[name]);
  };
  const verdict = h('select', { id: 'tap-verdict' }, ['', 'allow', 'deny', 'would-deny', 'would-allow'].map((v) => h('option', { value: v }, v || 'any')));
  const direction = h('select', { id: 'tap-direction' }, [['', 'any'], ['in', 'in'], ['out', 'out']].map(([v, l]) => h('option', { value: v }, l)));
  const status = h('p', { id: 'tap-status', class: 'muted' }, 'Choose a workload and start.');
  const rows = h('tbody', { id: 'tap-rows' });
  let stream = null;
  let skipped = 0;
  const button = h('button', { id: 'tap-start', type: 'submit' }, 'Start');
  const form = h('form', { class: 'toolbar tap-form', onsubmit: (e) => { e.preventDefault(); if (stream) stop(); else start(); } },
    field('workload', 'Workload', { placeholder: 'shop/orders', required: true, value: rest.length >= 2 ? `${rest[0]}/${rest[1]}` : '' }),
    field('from', 'From', { placeholder: 'shop/frontend or spiffe://…' }),
    field('to', 'To', { placeholder: 'namespace/name' }),
    field('method', 'Method', { placeholder: 'GET', size: 7 }),
    field('path', 'Path', { placeholder: '/orders' }),
    h('label', {}, 'Verdict ', verdict), h('label', {}, 'Direction ', direction), button);
  replace(main, h('h1', {}, 'Tap'), form, status,
    h('table', { class: 'tap' }, h('thead', {}, h('tr', {}, ['time', 'dir', 'caller → destination', 'request', 'status', 'verdict', 'decided by', 'latency'].map((t) => h('th', {}, t)))), rows));

  function start() {
    replace(rows);
    skipped = 0;
    const params = { verdict: verdict.value, direction: direction.value };
    for (const [k, el] of Object.entries(fields)) params[k] = el.value.trim();
    status.textContent = `Opening a tap of ${params.workload}…`;
    button.textContent = 'Stop';
    stream = api.tap(params, {
      onHello: (m) => {
        status.textContent = m.proxiesConnected
          ? `Tapping ${params.workload}: ${m.proxiesConnected} sidecar${m.proxiesConnected === 1 ? '' : 's'} connected. Requests appear as they are decided.`
          : `Tapping ${params.workload}: no sidecar of it is connected now; waiting for one.`;
      },
      onTap: (m) => {
        skipped += m.skipped;
        for (const e of m.events) rows.insertBefore(row(e), rows.firstChild);
        while (rows.children.length > MAX_ROWS) rows.removeChild(rows.lastChild);
        if (skipped) status.textContent = `${skipped} matching requests not shown (rate limit, or a reader slower than the traffic).`;
      },
      onEnded: () => { stop(); status.textContent = 'The session ended.'; },
    });
  }

  function stop() {
    if (stream) stream.close();
    stream = null;
    button.textContent = 'Start';
  }

  if (rest.length >= 2) start();
  return () => stop();
}

function row(e) {
  const at = new Date(e.atMillis).toISOString().slice(11, 23);
  const status = e.status === null || e.status === undefined ? '-' : `${e.status}${e.grpcStatus !== undefined ? ` grpc-status ${e.grpcStatus}` : ''}`;
  const by = e.rule ? `${e.policy} rule ${e.rule}` : (e.policy || '-');
  return h('tr', { class: `tap-row ${e.verdict}` },
    h('td', {}, at), h('td', {}, e.direction === 'ingress' ? 'in' : 'out'),
    h('td', {}, `${e.caller} → ${e.destination.namespace}/${e.destination.name}:${e.port}`),
    h('td', {}, [e.method, e.path].filter(Boolean).join(' ') || e.protocol),
    h('td', { class: 'num' }, status), h('td', {}, h('span', { class: `badge ${e.verdict}` }, e.verdict)), h('td', {}, by),
    h('td', { class: 'num' }, `${(e.latencyMicros / 1000).toFixed(1)} ms`));
}
