// How graphs are drawn, in one place: the colours of allowed, denied and would-deny edges
// (the same as the CSS swatches and `bulkhead graph -o dot`'s black, red and orange in
// spirit) and the Cytoscape style every graph on the console uses.

import cytoscape from 'cytoscape';

export { cytoscape };

export const COLOURS = {
  allowed: '#2e7d32',
  denied: '#c62828',
  'would-deny': '#ef6c00',
};

// Nodes as wide as their longest label line and as tall as their lines.
const lines = (ele) => String(ele.data('label') || '').split('\n');
const labelWidth = (ele) => Math.max(40, ...lines(ele).map((l) => l.length * 7));
const labelHeight = (ele) => 16 * lines(ele).length;

export function baseStyle() {
  return [
    { selector: 'node', style: {
      label: 'data(label)', shape: 'round-rectangle', 'background-color': '#e8eef6', 'border-width': 1, 'border-color': '#6b7f99',
      'font-size': 12, 'text-valign': 'center', 'text-halign': 'center', width: labelWidth, height: labelHeight, padding: 8, color: '#14243a',
      'text-wrap': 'wrap',
    } },
    { selector: 'node[kind = "identity"], node[kind = "plaintext"]', style: { 'border-style': 'dashed', 'background-color': '#f6f1e8' } },
    { selector: 'node[kind = "namespace"]', style: {
      'background-color': '#f4f7fb', 'background-opacity': 0.6, 'border-style': 'dashed', 'border-color': '#9fb0c6', shape: 'round-rectangle',
      'text-valign': 'top', 'text-halign': 'center', 'font-size': 11, color: '#50627a', padding: 18,
    } },
    { selector: 'node.start', style: { 'background-color': '#14243a', color: '#ffffff', 'border-color': '#14243a' } },
    { selector: 'edge', style: {
      width: 3, 'curve-style': 'bezier', 'target-arrow-shape': 'triangle', 'arrow-scale': 1.2,
      'line-color': COLOURS.allowed, 'target-arrow-color': COLOURS.allowed,
      label: 'data(label)', 'font-size': 10, color: '#14243a', 'text-background-color': '#ffffff', 'text-background-opacity': 0.85,
      'text-background-padding': 2, 'text-margin-y': -12,
    } },
    { selector: 'edge.denied', style: { 'line-color': COLOURS.denied, 'target-arrow-color': COLOURS.denied } },
    { selector: 'edge.would-deny', style: { 'line-color': COLOURS['would-deny'], 'target-arrow-color': COLOURS['would-deny'] } },
    { selector: 'edge.reach', style: { 'line-color': '#6b7f99', 'target-arrow-color': '#6b7f99', 'line-style': 'solid' } },
    { selector: 'edge:selected', style: { width: 6, 'underlay-color': '#1f6feb', 'underlay-opacity': 0.25, 'underlay-padding': 4 } },
    { selector: '.hidden', style: { display: 'none' } },
  ];
}
