/**
 * The order in which the model wrote its last answer, made visible: which colour a token gets
 * for the step that revealed it (a heat map, early steps blue, late steps red; tokens kept from
 * before unshaded), where each token sits in the text, the legend, the words that say what
 * AR-ness means, and the read-only page that shows a suggestion. Plain functions on the
 * `diffucode/lastDecoding` result, without `vscode`, so that `node --test` checks them.
 */
import { Position, Range } from './logic';

/** The result of `diffucode/lastDecoding` (null when the document has none). */
export interface Decoding {
  kind: 'suggestion' | 'refinement' | 'fill';
  tokens: string[];
  /** Per token, the denoising step that revealed it (0-based); -1: kept from before. */
  order: number[];
  steps: number;
  ar_ness: { local: number; global: number } | null;
  position?: Position;
  range?: Range;
}

/** At most this many shades: more would be hard to tell apart. */
export const MAX_BUCKETS = 8;
const EARLY = [37, 99, 235]; // blue
const LATE = [220, 38, 38]; // red
const ALPHA = 0x73; // 45 %: the text, and its syntax colours, stay readable on light and dark themes

export const AR_NESS_MEANING = 'AR-ness says how left to right the model wrote: local is the share of tokens ' +
  'revealed next to text already written on their left, global the share revealed at the leftmost open ' +
  'positions; 1.0 = strictly left to right.';

const KIND_WORDS: Record<Decoding['kind'], string> = { suggestion: 'suggestion', refinement: 'Refine Function proposal', fill: 'Fill Selection proposal' };

/** Steps the heat map spans: the daemon's count, or more if a token says so. */
export function stepCount(d: Pick<Decoding, 'steps' | 'order'>): number {
  return Math.max(1, d.steps || 0, ...d.order.map((s) => s + 1));
}

/** How many shades a decoding of `steps` steps gets. */
export function bucketCount(steps: number): number {
  return Math.max(1, Math.min(MAX_BUCKETS, steps));
}

/** The shade of a step, 0 (earliest) to bucketCount - 1 (latest); null for a kept token (-1). */
export function bucketOf(step: number, steps: number): number | null {
  if (!(step >= 0)) return null;
  const n = bucketCount(steps);
  return Math.min(n - 1, Math.floor((step * n) / Math.max(1, steps)));
}

const hex = (v: number) => Math.round(v).toString(16).padStart(2, '0');

/** The colour of a shade, as #rrggbbaa (VS Code hovers accept only hex colours): the
 * first blue, the last red, the rest in between. */
export function bucketColor(bucket: number, buckets: number): string {
  const t = buckets > 1 ? bucket / (buckets - 1) : 0;
  return '#' + EARLY.map((e, i) => hex(e + (LATE[i] - e) * t)).join('') + hex(ALPHA);
}

/** One legend entry per shade: its colour and the steps it covers ("step 3" or "steps 4-5"). */
export function legend(steps: number): { bucket: number; color: string; label: string }[] {
  const n = bucketCount(steps);
  const first: number[] = [];
  const last: number[] = [];
  for (let step = 0; step < steps; step++) {
    const b = bucketOf(step, steps)!;
    first[b] ??= step;
    last[b] = step;
  }
  return first.map((f, b) => ({
    bucket: b, color: bucketColor(b, n), label: f === last[b] ? `step ${f}` : `steps ${f}-${last[b]}`,
  }));
}

/** Each token's [start, end) in the joined text, in UTF-16 code units (like VS Code offsets). */
export function tokenSpans(tokens: string[]): { start: number; end: number }[] {
  let offset = 0;
  return tokens.map((t) => ({ start: offset, end: (offset += t.length) }));
}

/** "12 steps · AR-ness local 0.95, global 0.90" */
export function summary(d: Decoding): string {
  const steps = stepCount(d);
  const ar = d.ar_ness
    ? `AR-ness local ${d.ar_ness.local.toFixed(2)}, global ${d.ar_ness.global.toFixed(2)}`
    : 'AR-ness not reported for this alternative';
  const kept = d.order.filter((s) => s < 0).length;
  return `${steps} step${steps === 1 ? '' : 's'} · ${ar}` + (kept ? ` · ${kept} of ${d.tokens.length} tokens kept from before` : '');
}

export function kindInWords(d: Decoding): string {
  return KIND_WORDS[d.kind] ?? d.kind;
}

/** True when `text` holds the decoding's text at `offset`: the proposal is where it was put. */
export function textIsAt(text: string, offset: number, d: Decoding): boolean {
  const joined = d.tokens.join('');
  return joined.length > 0 && text.slice(offset, offset + joined.length) === joined;
}

/** The hover over the whole shaded text in the editor: what it is, steps, AR-ness and what it
 * means, and the legend as coloured spans (Markdown; VS Code allows hex colours in spans). */
export function hoverMarkdown(d: Decoding): string {
  const swatches = legend(stepCount(d)).map((e) => `<span style="background-color:${e.color};">&nbsp;${e.label}&nbsp;</span>`);
  return [
    `**diffucode: decoding order** of the last ${kindInWords(d)}`,
    '',
    summary(d),
    '',
    AR_NESS_MEANING,
    '',
    `Early ${swatches.join(' ')} late; unshaded: kept from before.`,
  ].join('\n');
}

/** The hover of one token: the step that revealed it. */
export function tokenHover(d: Decoding, step: number): string {
  return step >= 0 ? `Token revealed at step ${step} of ${stepCount(d)}.` : 'Token kept from before.';
}

export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]!));
}

/** The read-only page for a decoding: header (kind, steps, AR-ness and what it means), legend,
 * and the text with each token shaded by its step (`before`: the line's text before the
 * suggestion, dimmed, so it reads in place). No scripts. */
export function orderPage(d: Decoding, where: string, before = '', note = ''): string {
  const steps = stepCount(d);
  const n = bucketCount(steps);
  const styles = Array.from({ length: n }, (_, b) => `.b${b} { background-color: ${bucketColor(b, n)}; }`).join('\n');
  const tokens = d.tokens.map((t, i) => {
    const step = d.order[i] ?? -1;
    const b = bucketOf(step, steps);
    const title = step >= 0 ? `step ${step} of ${steps}` : 'kept from before';
    return `<span class="token ${b === null ? 'kept' : `b${b}`}" data-step="${step}" title="${title}">${escapeHtml(t)}</span>`;
  }).join('');
  const swatches = legend(steps).map((e) => `<span class="swatch b${e.bucket}">${e.label}</span>`).join('');
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline';">
<title>diffucode: decoding order</title>
<style>
body { font-family: var(--vscode-font-family); color: var(--vscode-foreground); padding: 0 16px; }
h1 { font-size: 1.2em; margin: 12px 0 4px; }
.summary { font-size: 1.05em; margin: 4px 0; }
.meaning, .where, .note { color: var(--vscode-descriptionForeground); margin: 4px 0; }
.legend { margin: 10px 0; display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.swatch { padding: 1px 6px; border-radius: 3px; }
.swatch.kept-swatch { border: 1px dashed var(--vscode-descriptionForeground); }
pre.code { font-family: var(--vscode-editor-font-family); font-size: var(--vscode-editor-font-size);
  background: var(--vscode-editor-background); padding: 10px; border-radius: 4px; white-space: pre-wrap;
  line-height: 1.6; }
.before { opacity: 0.55; }
.token { border-radius: 2px; box-shadow: inset -1px 0 0 var(--vscode-editor-background); }
${styles}
</style></head>
<body>
<h1>Decoding order of the last ${escapeHtml(kindInWords(d))}</h1>
<p class="where">${escapeHtml(where)}</p>
<p class="summary">${escapeHtml(summary(d))}</p>
<p class="meaning">${escapeHtml(AR_NESS_MEANING)}</p>
${note ? `<p class="note">${escapeHtml(note)}</p>` : ''}
<div class="legend"><span>early</span>${swatches}<span>late</span><span class="swatch kept-swatch">kept from before</span></div>
<pre class="code"><span class="before">${escapeHtml(before)}</span>${tokens}</pre>
</body></html>`;
}
