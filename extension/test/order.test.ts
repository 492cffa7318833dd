// Unit tests for the decoding-order heat map (src/order.ts), run with `node --test`.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  AR_NESS_MEANING, Decoding, bucketColor, bucketCount, bucketOf, escapeHtml, hoverMarkdown, legend, orderPage,
  stepCount, summary, textIsAt, tokenHover, tokenSpans,
} from '../src/order';

function decoding(over: Partial<Decoding> = {}): Decoding {
  return {
    kind: 'suggestion', tokens: ['return', ' a', ' +', ' b'], order: [0, 2, 1, 3], steps: 4,
    ar_ness: { local: 0.75, global: 0.5 }, position: { line: 3, character: 4 }, ...over,
  };
}

describe('heat map shades', () => {
  it('gives each step its own shade up to 8, then groups steps evenly', () => {
    assert.equal(bucketCount(4), 4);
    assert.equal(bucketCount(32), 8);
    assert.deepEqual([0, 1, 2, 3].map((s) => bucketOf(s, 4)), [0, 1, 2, 3]);
    assert.deepEqual([0, 3, 4, 7, 31].map((s) => bucketOf(s, 32)), [0, 0, 1, 1, 7]);
    assert.equal(bucketOf(40, 32), 7); // a step past the count stays in the last shade
  });

  it('leaves tokens kept from before unshaded', () => {
    assert.equal(bucketOf(-1, 10), null);
  });

  it('goes from blue (early) to red (late), as hex with alpha', () => {
    assert.equal(bucketColor(0, 8), '#2563eb73');
    assert.equal(bucketColor(7, 8), '#dc262673');
    assert.match(bucketColor(3, 8), /^#[0-9a-f]{8}$/);
    assert.notEqual(bucketColor(3, 8), bucketColor(4, 8));
    assert.equal(bucketColor(0, 1), '#2563eb73');
  });

  it('has a legend entry per shade naming its steps', () => {
    assert.deepEqual(legend(3).map((e) => e.label), ['step 0', 'step 1', 'step 2']);
    assert.deepEqual(legend(12).map((e) => e.label),
      ['steps 0-1', 'step 2', 'steps 3-4', 'step 5', 'steps 6-7', 'step 8', 'steps 9-10', 'step 11']);
    assert.deepEqual(legend(12).map((e) => e.bucket), [0, 1, 2, 3, 4, 5, 6, 7]);
  });

  it('counts at least the steps the tokens name', () => {
    assert.equal(stepCount({ steps: 4, order: [0, 6] }), 7);
    assert.equal(stepCount({ steps: 0, order: [-1] }), 1);
  });
});

describe('token offsets', () => {
  it('are cumulative UTF-16 offsets of the joined text', () => {
    assert.deepEqual(tokenSpans(['ab', '', '😀', '\n x']), [
      { start: 0, end: 2 }, { start: 2, end: 2 }, { start: 2, end: 4 }, { start: 4, end: 7 }]);
  });

  it('find the proposal where it was put, and not elsewhere', () => {
    const d = decoding({ kind: 'fill', tokens: ['x = ', '1'] });
    assert.equal(textIsAt('def f():\n    x = 1\n', 13, d), true);
    assert.equal(textIsAt('def f():\n    x = 2\n', 13, d), false);
    assert.equal(textIsAt('x', 0, decoding({ tokens: [] })), false);
  });
});

describe('words', () => {
  it('summarise steps and AR-ness, and say what AR-ness means', () => {
    assert.equal(summary(decoding()), '4 steps · AR-ness local 0.75, global 0.50');
    assert.equal(summary(decoding({ ar_ness: null, order: [-1, 0, -1, 1], steps: 2 })),
      '2 steps · AR-ness not reported for this alternative · 2 of 4 tokens kept from before');
    assert.match(AR_NESS_MEANING, /1\.0 = strictly left to right/);
  });

  it('hover says the kind, the AR-ness and the legend, and each token its step', () => {
    const md = hoverMarkdown(decoding({ kind: 'refinement' }));
    assert.match(md, /Refine Function proposal/);
    assert.match(md, /AR-ness local 0\.75/);
    assert.match(md, /1\.0 = strictly left to right/);
    assert.match(md, /<span style="background-color:#2563eb73;">&nbsp;step 0&nbsp;<\/span>/);
    assert.equal(tokenHover(decoding(), 2), 'Token revealed at step 2 of 4.');
    assert.equal(tokenHover(decoding(), -1), 'Token kept from before.');
  });
});

describe('the page', () => {
  it('shades each token by its step, escapes the code, and runs no scripts', () => {
    const html = orderPage(decoding({ tokens: ['if a', ' < b', ':'], order: [0, -1, 3] }), 'at line 4', '    ');
    assert.match(html, /<span class="token b0" data-step="0" title="step 0 of 4">if a<\/span>/);
    assert.match(html, /<span class="token kept" data-step="-1" title="kept from before"> &lt; b<\/span>/);
    assert.match(html, /<span class="token b3" data-step="3" title="step 3 of 4">:<\/span>/);
    assert.match(html, /\.b3 \{ background-color: #dc262673; \}/);
    assert.match(html, /AR-ness local 0\.75, global 0\.50/);
    assert.match(html, /<span class="before">    <\/span>/);
    assert.doesNotMatch(html, /<script/);
    assert.match(html, /default-src 'none'/);
  });

  it('escapes HTML', () => {
    assert.equal(escapeHtml(`<a href="x">'&'</a>`), '&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;');
  });
});
