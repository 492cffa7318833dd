// Unit tests for the extension's own decisions (src/logic.ts), run with `node --test`.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  CompletionFeedback, Edit, RetryCompletion, Status, applyEdits, canAccept, choosePython, explainStartFailure,
  localStatus, lowConfidenceLines, offsetAt, parseMinutes, planEdits, proposalPrompt, serverLogLine,
  shortModelName, shouldRetry, stateInWords, statusBarText,
} from '../src/logic';

const NOW = 1_700_000_000_000;

function status(over: Partial<Status>): Status {
  return { state: 'ready', message: '', model: '/tmp/ckpt/tiny-dream', lastLatencyMs: null, snoozedUntil: null, enabled: true, ...over };
}

function edit(l1: number, c1: number, l2: number, c2: number, text: string): Edit {
  return { range: { start: { line: l1, character: c1 }, end: { line: l2, character: c2 } }, text };
}

describe('status bar', () => {
  it('shows model and latency when ready', () => {
    const { text, tooltip } = statusBarText(status({ lastLatencyMs: 123.4 }), NOW);
    assert.equal(text, '$(sparkle) diffucode · tiny-dream · 123 ms');
    assert.equal(tooltip, 'Ready with model /tmp/ckpt/tiny-dream; the last completion took 123 ms.');
  });

  it('spins while busy and while starting', () => {
    assert.match(statusBarText(status({ state: 'busy' }), NOW).text, /^\$\(sync~spin\) diffucode · tiny-dream$/);
    assert.match(statusBarText(status({ state: 'starting' }), NOW).text, /^\$\(loading~spin\) diffucode$/);
  });

  it('says error and down, with the message in the tooltip', () => {
    const s = status({ state: 'error', message: 'checkpoint /x has no config.json' });
    assert.equal(statusBarText(s, NOW).text, '$(error) diffucode · error');
    assert.equal(statusBarText(s, NOW).tooltip, 'Error. checkpoint /x has no config.json');
    assert.equal(statusBarText(status({ state: 'down' }), NOW).text, '$(debug-disconnect) diffucode · down');
  });

  it('counts snooze minutes down, rounding up', () => {
    const s = status({ state: 'snoozed', snoozedUntil: NOW + 14 * 60000 + 1 });
    assert.equal(statusBarText(s, NOW).text, '$(clock) diffucode · snoozed 15 min');
    assert.equal(stateInWords(s, NOW), 'Snoozed for 15 more minutes.');
    assert.equal(stateInWords(status({ state: 'snoozed', snoozedUntil: NOW + 1000 }), NOW), 'Snoozed for 1 more minute.');
  });

  it('says off when disabled and names the default model when none is set', () => {
    assert.equal(statusBarText(status({ state: 'disabled', enabled: false }), NOW).text, '$(circle-slash) diffucode · off');
    assert.equal(stateInWords(status({ state: 'starting', model: null }), NOW), 'Starting (the default model).');
  });

  it('shortens model paths and hub ids', () => {
    assert.equal(shortModelName('apple/DiffuCoder-7B-cpGRPO'), 'DiffuCoder-7B-cpGRPO');
    assert.equal(shortModelName('/a/b/'), 'b');
    assert.equal(shortModelName(null), null);
  });

  it('keeps model and latency in a local status', () => {
    const s = localStatus('down', 'stopped', status({ lastLatencyMs: 5 }));
    assert.deepEqual([s.state, s.model, s.lastLatencyMs], ['down', '/tmp/ckpt/tiny-dream', 5]);
  });
});

describe('accepting a proposal', () => {
  it('is allowed only at the version the edits were made for', () => {
    assert.equal(canAccept(7, 7), true);
    assert.equal(canAccept(7, 8), false);
    assert.equal(canAccept(7, undefined), false);
  });
});

describe('edits', () => {
  it('are sorted into document order', () => {
    const a = edit(3, 0, 3, 1, 'a');
    const b = edit(1, 0, 1, 4, 'b');
    assert.deepEqual(planEdits([a, b]), [b, a]);
  });

  it('may touch but not overlap', () => {
    assert.doesNotThrow(() => planEdits([edit(0, 0, 0, 2, 'x'), edit(0, 2, 0, 4, 'y')]));
    assert.throws(() => planEdits([edit(0, 0, 1, 2, 'x'), edit(1, 1, 1, 4, 'y')]), /0:0-1:2 and 1:1-1:4 overlap/);
    assert.throws(() => planEdits([edit(2, 0, 1, 0, 'x')]), /2:0-1:0 is not a valid range/);
  });

  it('apply to text like a WorkspaceEdit', () => {
    const text = 'def f(x):\n    return x\n\nprint(f(1))\n';
    const out = applyEdits(text, [edit(1, 11, 1, 12, 'x * 2'), edit(3, 0, 3, 11, 'print(f(2))')]);
    assert.equal(out, 'def f(x):\n    return x * 2\n\nprint(f(2))\n');
  });

  it('replace whole lines, insert, and handle CRLF and positions past a line end', () => {
    assert.equal(applyEdits('a\nb\nc\n', [edit(1, 0, 2, 0, 'B1\nB2\n')]), 'a\nB1\nB2\nc\n');
    assert.equal(applyEdits('ab', [edit(0, 1, 0, 1, '-')]), 'a-b');
    assert.equal(applyEdits('ab\r\ncd', [edit(0, 0, 0, 99, 'X')]), 'X\r\ncd');
    assert.equal(offsetAt('ab\ncd', { line: 9, character: 0 }), 5);
  });

  it('count UTF-16 code units, like LSP', () => {
    assert.equal(applyEdits('😀x\n', [edit(0, 2, 0, 3, 'y')]), '😀y\n');
  });
});

describe('refine highlights', () => {
  it('keeps lines below the threshold, in line order', () => {
    const lines = [{ line: 4, confidence: 0.2 }, { line: 2, confidence: 0.9 }, { line: 1, confidence: 0.49 }, { line: 3, confidence: 0.5 }];
    assert.deepEqual(lowConfidenceLines(lines), [{ line: 1, confidence: 0.49 }, { line: 4, confidence: 0.2 }]);
    assert.deepEqual(lowConfidenceLines(lines, 0.95).map((l) => l.line), [1, 2, 3, 4]);
    assert.deepEqual(lowConfidenceLines([{ line: -1, confidence: 0 }, { line: 1.5, confidence: 0 }]), []);
  });
});

describe('python interpreter', () => {
  it('prefers the setting, then the Python extension, then python3', () => {
    assert.equal(choosePython(' /venv/bin/python ', '/other').path, '/venv/bin/python');
    assert.deepEqual(choosePython('', '/py/ext'), { path: '/py/ext', source: "the Python extension's active interpreter" });
    assert.equal(choosePython(undefined, undefined).path, 'python3');
    assert.equal(choosePython('~/venv/bin/python', undefined, '/home/me').path, '/home/me/venv/bin/python');
  });

  it('explains a missing interpreter, a missing package and a missing subcommand', () => {
    assert.match(explainStartFailure('/nope', 'the setting', { code: 'ENOENT' }), /"\/nope" \(from the setting\) was not found/);
    assert.match(explainStartFailure('python3', 'the default', { code: 1, stderr: "/usr/bin/python3: No module named diffucode\n" }),
      /diffucode is not installed for "python3".*pip install diffucode.*diffucode\.pythonPath/);
    assert.match(explainStartFailure('py', 's', { code: 2, stderr: "error: argument command: invalid choice: 'lsp' (choose from ...)" }),
      /has no language server/);
    assert.match(explainStartFailure('py', 's', { code: 1, stderr: 'Traceback\nImportError: boom\n' }), /failed: ImportError: boom$/);
  });
});

describe('completion feedback', () => {
  it('reports shown, and a different completion shown next as a rejection of the first', () => {
    const f = new CompletionFeedback();
    assert.deepEqual(f.shown({ uri: 'u', text: 'foo()' }).map((e) => e.method), ['diffucode/didShowCompletion']);
    assert.deepEqual(f.shown({ uri: 'u', text: 'foo()' }), []);
    const next = f.shown({ uri: 'u', text: 'bar' });
    assert.deepEqual(next.map((e) => [e.method, e.params.text]),
      [['diffucode/didRejectCompletion', 'foo()'], ['diffucode/didShowCompletion', 'bar']]);
  });

  it('does not count typing through a completion, or an accepted one, as a rejection', () => {
    const f = new CompletionFeedback();
    f.shown({ uri: 'u', text: 'return x' });
    assert.deepEqual(f.shown({ uri: 'u', text: 'rn x' }).map((e) => e.method), ['diffucode/didShowCompletion']);
    f.accepted();
    assert.deepEqual(f.shown({ uri: 'u', text: 'zzz' }).map((e) => e.method), ['diffucode/didShowCompletion']);
  });
});

describe('snooze minutes', () => {
  it('accepts whole minutes up to a week', () => {
    assert.equal(parseMinutes(' 20 '), 20);
    assert.equal(parseMinutes('0'), 0);
    assert.equal(parseMinutes('1.5'), undefined);
    assert.equal(parseMinutes('-3'), undefined);
    assert.equal(parseMinutes('99999'), undefined);
  });
});

describe('issue 19: the status menu, proposals that do not parse, retries, log levels', () => {
  it('names the model once in the menu title, whatever the message says', () => {
    assert.equal(stateInWords(status({ message: 'served by the daemon at /run/d.sock' }), NOW),
      'Ready with model /tmp/ckpt/tiny-dream. served by the daemon at /run/d.sock');
    // an older server's message names the model itself
    const title = stateInWords(status({ lastLatencyMs: 40, message: '/tmp/ckpt/tiny-dream via /run/d.sock' }), NOW);
    assert.equal(title, 'Ready; the last completion took 40 ms. /tmp/ckpt/tiny-dream via /run/d.sock');
    assert.equal(title.split('/tmp/ckpt/tiny-dream').length - 1, 1);
  });

  it('offers Apply Anyway, with the reason, for a proposal that does not parse', () => {
    const bad = proposalPrompt('Fill Selection', 'a.py', { parses: false, parseError: 'line 3: unexpected indent' }, '', '');
    assert.equal(bad.apply, 'Apply Anyway');
    assert.match(bad.message, /a\.py does not parse \(line 3: unexpected indent\)\. Apply it anyway\?/);
    for (const parses of [true, null, undefined]) {
      const ok = proposalPrompt('Refine Function', 'a.py', { parses }, ' (2 low-confidence lines marked)', '1 of 4 lines changed');
      assert.equal(ok.apply, 'Accept');
      assert.equal(ok.message, 'diffucode Refine Function: accept the proposed edit to a.py? (2 low-confidence lines marked) (1 of 4 lines changed)');
    }
  });

  it('retries a completion only where the cursor still is', () => {
    const retry: RetryCompletion = { textDocument: { uri: 'file:///a.py', version: 3 }, position: { line: 8, character: 11 } };
    const here = { uri: 'file:///a.py', version: 3, cursor: { line: 8, character: 11 }, empty: true };
    assert.equal(shouldRetry(retry, here), true);
    assert.equal(shouldRetry(retry, { ...here, version: 4 }), false);
    assert.equal(shouldRetry(retry, { ...here, cursor: { line: 8, character: 10 } }), false);
    assert.equal(shouldRetry(retry, { ...here, uri: 'file:///b.py' }), false);
    assert.equal(shouldRetry(retry, { ...here, empty: false }), false);
    assert.equal(shouldRetry(retry, undefined), false);
  });

  it('reads the level of each server log line; other lines continue the last', () => {
    assert.deepEqual(serverLogLine('2026-11-26 22:23:10,123 INFO diffucode.lsp: connected', undefined),
      { level: 'info', text: 'diffucode.lsp: connected' });
    assert.equal(serverLogLine('2026-11-26 22:23:10,123 WARNING pygls: slow', 'info').level, 'warn');
    assert.equal(serverLogLine('2026-11-26 22:23:10,123 DEBUG diffucode.lsp: x', 'info').level, 'debug');
    assert.equal(serverLogLine('2026-11-26 22:23:10,123 TRACE pygls.protocol: {...}', 'info').level, 'trace');
    assert.equal(serverLogLine('2026-11-26 22:23:10,123 CRITICAL x: y', 'info').level, 'error');
    assert.deepEqual(serverLogLine('  File "x.py", line 3', 'error'), { level: 'error', text: '  File "x.py", line 3' });
    assert.equal(serverLogLine('second line of an info message', 'info').level, 'info');
    assert.equal(serverLogLine('Traceback (most recent call last):', undefined).level, 'error');
  });
});
