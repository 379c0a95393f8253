// Building DOM without innerHTML: every value from the server is set as text, never parsed
// as markup, so nothing it says can run as code here.

/** h('a', {class: 'x', href: '#/y', onclick: f}, 'text', child) */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

/** `2024-05-01 10:00:00Z` */
export function time(unix) {
  if (!unix) return '-';
  return new Date(unix * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

/** `12s ago`, `in 40m` */
export function ago(unix) {
  if (!unix) return '-';
  const now = Date.now() / 1000;
  const d = Math.round(Math.abs(now - unix));
  const human = d < 120 ? `${d}s` : d < 7200 ? `${Math.floor(d / 60)}m` : d < 172800 ? `${Math.floor(d / 3600)}h` : `${Math.floor(d / 86400)}d`;
  return unix > now ? `in ${human}` : `${human} ago`;
}

export function table(headers, rows, props = {}) {
  return h('table', props,
    h('thead', {}, h('tr', {}, headers.map((t) => h('th', {}, t)))),
    h('tbody', {}, rows));
}

/** A `<select>` of `[value, label]` options. */
export function select(options, value, onchange, props = {}) {
  return h('select', { ...props, onchange: (e) => onchange(e.target.value) },
    options.map(([v, label]) => h('option', { value: v, selected: String(v) === String(value) }, label)));
}

export const WINDOWS = [['0', 'all kept'], ['300', 'last 5 minutes'], ['900', 'last 15 minutes'], ['3600', 'last hour'], ['86400', 'last day']];
