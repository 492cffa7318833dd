/**
 * The extension's own decisions, as plain functions on plain data, so that `node --test` can
 * check them without VS Code: what the status bar says, whether a proposal may still be applied,
 * how a proposal's edits become text and what its prompt offers, which refined lines to
 * highlight, which interpreter runs the server, which shown completions count as rejected, when
 * a completion the daemon was not ready for is asked again, and at which level a server log
 * line is shown.
 *
 * This module must not import `vscode` (nor anything that does). Completion logic (debounce,
 * cache, context, post-processing) is not here either: it lives in the language server.
 */

/** LSP positions: 0-based line, UTF-16 code units (the same units as JavaScript strings). */
export interface Position { line: number; character: number }
export interface Range { start: Position; end: Position }
export interface Edit { range: Range; text: string }

export type ServerState = 'starting' | 'ready' | 'busy' | 'error' | 'down' | 'disabled' | 'snoozed';

/** The result of `diffucode/status` and the payload of `diffucode/statusChanged`. */
export interface Status {
  state: ServerState;
  message: string;
  model: string | null;
  lastLatencyMs: number | null;
  snoozedUntil: number | null;
  enabled: boolean;
}

/** `diffucode/fillSelection` result. `parses`: whether the Python file with the edits applied
 * parses (null: not judged: another language, or a file that did not parse before either). */
export interface FillResult { edits: Edit[]; version: number; parses?: boolean | null; parseError?: string | null }

/** `diffucode/refineFunction` result; `lines[i].line` is a 0-based line of the document as it
 * reads after the edits (the proposal), `confidence` in 0..1. */
export interface RefineResult extends FillResult {
  range: Range;
  lines: { line: number; confidence: number }[];
  /** e.g. "3 of 6 lines changed; 3 kept: the model preferred them; the signature is kept" */
  note?: string;
}

/** Lines the model is less sure of than this are highlighted in a refine proposal. */
export const LOW_CONFIDENCE = 0.5;

const ICONS: Record<ServerState, string> = {
  starting: '$(loading~spin)',
  ready: '$(sparkle)',
  busy: '$(sync~spin)',
  error: '$(error)',
  down: '$(debug-disconnect)',
  disabled: '$(circle-slash)',
  snoozed: '$(clock)',
};

/** The last path or hub-id component: "/ckpt/tiny-dream/" and "apple/DiffuCoder-7B" read short. */
export function shortModelName(model: string | null): string | null {
  if (!model) return null;
  const parts = model.split(/[\\/]/).filter((p) => p.length > 0);
  return parts.length > 0 ? parts[parts.length - 1] : model;
}

function minutesLeft(until: number | null, now: number): number | null {
  if (until === null) return null;
  return Math.max(1, Math.ceil((until - now) / 60000));
}

/** The status bar item: short text with an icon, and a tooltip that says the state in words. */
export function statusBarText(status: Status, now: number): { text: string; tooltip: string } {
  const parts = [`${ICONS[status.state] ?? '$(question)'} diffucode`];
  const model = shortModelName(status.model);
  if (status.state === 'snoozed') {
    const left = minutesLeft(status.snoozedUntil, now);
    parts.push(left === null ? 'snoozed' : `snoozed ${left} min`);
  } else if (status.state === 'disabled') {
    parts.push('off');
  } else if (status.state === 'ready' || status.state === 'busy') {
    if (model) parts.push(model);
    if (status.lastLatencyMs !== null) parts.push(`${Math.round(status.lastLatencyMs)} ms`);
  } else if (status.state === 'error' || status.state === 'down') {
    parts.push(status.state);
  }
  return { text: parts.join(' · '), tooltip: stateInWords(status, now) };
}

/** One or two sentences for the tooltip and the menu's title. */
export function stateInWords(status: Status, now: number): string {
  const model = status.model ? `model ${status.model}` : 'the default model';
  const latency = status.lastLatencyMs !== null
    ? `; the last completion took ${Math.round(status.lastLatencyMs)} ms` : '';
  let words: string;
  switch (status.state) {
    case 'starting': words = `Starting (${model})`; break;
    case 'ready': words = `Ready with ${model}${latency}`; break;
    case 'busy': words = `Working with ${model}${latency}`; break;
    case 'error': words = 'Error'; break;
    case 'down': words = 'The language server is not running'; break;
    case 'disabled': words = 'Completions are turned off'; break;
    case 'snoozed': {
      const left = minutesLeft(status.snoozedUntil, now);
      words = left === null ? 'Snoozed' : `Snoozed for ${left} more minute${left === 1 ? '' : 's'}`;
      break;
    }
    default: words = `Unknown state ${JSON.stringify(status.state)}`;
  }
  // A message that names the model itself (an older server's "MODEL via ADDRESS") is not told twice.
  if (status.model && status.message.includes(status.model)) words = words.replace(` with ${model}`, '').replace(` (${model})`, '');
  const message = status.message.trim();
  return message && message !== words ? `${words}. ${message}` : `${words}.`;
}

/** A status made on this side, while the server cannot speak for itself. */
export function localStatus(state: ServerState, message: string, last?: Status): Status {
  return {
    state,
    message,
    model: last?.model ?? null,
    lastLatencyMs: last?.lastLatencyMs ?? null,
    snoozedUntil: null,
    enabled: last?.enabled ?? true,
  };
}

/** A proposal may be applied only to the document version its edits were computed for. */
export function canAccept(proposalVersion: number, documentVersion: number | undefined): boolean {
  return documentVersion !== undefined && documentVersion === proposalVersion;
}

function comparePositions(a: Position, b: Position): number {
  return a.line - b.line || a.character - b.character;
}

function showRange(r: Range): string {
  return `${r.start.line}:${r.start.character}-${r.end.line}:${r.end.character}`;
}

/** The edits in document order, checked: every range well formed, none overlapping (a
 * WorkspaceEdit applies all of them against the original text). Throws naming the ranges. */
export function planEdits(edits: Edit[]): Edit[] {
  const sorted = [...edits].sort((a, b) => comparePositions(a.range.start, b.range.start));
  for (const e of sorted) {
    if (comparePositions(e.range.start, e.range.end) > 0 || e.range.start.line < 0 || e.range.start.character < 0) {
      throw new Error(`edit range ${showRange(e.range)} is not a valid range`);
    }
  }
  for (let i = 1; i < sorted.length; i++) {
    if (comparePositions(sorted[i - 1].range.end, sorted[i].range.start) > 0) {
      throw new Error(`edit ranges ${showRange(sorted[i - 1].range)} and ${showRange(sorted[i].range)} overlap`);
    }
  }
  return sorted;
}

/** Offset of a position in `text`, clamped the way editors clamp (past the end of a line: its end). */
export function offsetAt(text: string, pos: Position): number {
  let offset = 0;
  for (let line = 0; line < pos.line; line++) {
    const next = text.indexOf('\n', offset);
    if (next < 0) return text.length;
    offset = next + 1;
  }
  let end = text.indexOf('\n', offset);
  if (end < 0) end = text.length;
  if (end > offset && text[end - 1] === '\r') end--;
  return Math.min(offset + Math.max(0, pos.character), end);
}

/** The text after the edits: what the proposal view shows beside the original. */
export function applyEdits(text: string, edits: Edit[]): string {
  let result = '';
  let cursor = 0;
  for (const e of planEdits(edits)) {
    const start = offsetAt(text, e.range.start);
    result += text.slice(cursor, start) + e.text;
    cursor = Math.max(start, offsetAt(text, e.range.end));
  }
  return result + text.slice(cursor);
}

/** Refined lines to highlight, in line order, with the model's confidence. */
export function lowConfidenceLines(
  lines: { line: number; confidence: number }[],
  threshold: number = LOW_CONFIDENCE,
): { line: number; confidence: number }[] {
  return lines
    .filter((l) => Number.isInteger(l.line) && l.line >= 0 && l.confidence < threshold)
    .sort((a, b) => a.line - b.line);
}

/** The interpreter that runs `-m diffucode lsp`: the setting (a leading `~/` is the home
 * folder), else the Python extension's active interpreter, else `python3`. */
export function choosePython(setting: string | undefined, pythonExtension: string | undefined, home?: string):
  { path: string; source: string } {
  const path = setting?.trim();
  if (path) {
    return { path: home && path.startsWith('~/') ? home + path.slice(1) : path, source: 'the setting diffucode.pythonPath' };
  }
  if (pythonExtension && pythonExtension.trim()) {
    return { path: pythonExtension.trim(), source: "the Python extension's active interpreter" };
  }
  return { path: 'python3', source: 'the default (python3 on PATH)' };
}

/** What failed when `<python> -m diffucode lsp --help` was tried, in a sentence the user can act on. */
export function explainStartFailure(python: string, source: string, error: { code?: string | number; stderr?: string }): string {
  if (error.code === 'ENOENT') {
    return `diffucode: the Python interpreter "${python}" (from ${source}) was not found.`;
  }
  const stderr = (error.stderr ?? '').trim();
  if (/No module named '?diffucode/.test(stderr)) {
    return `diffucode is not installed for "${python}" (from ${source}). Install it there ` +
      '(pip install diffucode) or set diffucode.pythonPath to an interpreter that has it.';
  }
  if (/invalid choice: '?lsp/.test(stderr)) {
    return `The diffucode installed for "${python}" (from ${source}) has no language server ` +
      '(`diffucode lsp`): upgrade it.';
  }
  const last = stderr.split('\n').filter((l) => l.trim()).pop() ?? `exit status ${error.code}`;
  return `diffucode: "${python} -m diffucode lsp" (from ${source}) failed: ${last}`;
}

export interface Completion { uri: string; text: string }
export type Feedback = { method: 'diffucode/didShowCompletion' | 'diffucode/didRejectCompletion'; params: Completion };

/**
 * Turns "the provider returned this item" and "the user accepted that one" into the server's
 * feedback notifications. VS Code reports no rejection, so a shown completion counts as
 * rejected when a different one is shown instead; one that is the tail of the previous (the
 * user typed its start) continues it.
 */
export class CompletionFeedback {
  private pending: Completion | undefined;

  shown(item: Completion): Feedback[] {
    const prev = this.pending;
    this.pending = item;
    if (prev && prev.uri === item.uri && prev.text === item.text) return [];
    const out: Feedback[] = [];
    if (prev && !(prev.uri === item.uri && prev.text.endsWith(item.text))) {
      out.push({ method: 'diffucode/didRejectCompletion', params: prev });
    }
    out.push({ method: 'diffucode/didShowCompletion', params: item });
    return out;
  }

  accepted(): void {
    this.pending = undefined;
  }
}

/** Snooze durations offered in the menu, in minutes (0 wakes). */
export const SNOOZE_MINUTES = [5, 15, 30, 60, 240];

/** A typed snooze duration: whole minutes, 0 to a week. */
export function parseMinutes(input: string): number | undefined {
  const text = input.trim();
  if (!/^\d+$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 7 * 24 * 60 ? n : undefined;
}

/** What a proposal's prompt says and offers. A proposal whose result does not parse says why and
 * offers "Apply Anyway" instead of "Accept": applying it takes that explicit choice. */
export function proposalPrompt(kind: string, name: string, result: { parses?: boolean | null; parseError?: string | null },
  unsure: string, note: string): { message: string; apply: 'Accept' | 'Apply Anyway' } {
  const extra = note ? ` (${note})` : '';
  if (result.parses === false) {
    return {
      message: `diffucode ${kind}: with this edit ${name} does not parse (${result.parseError ?? 'a syntax error'}). ` +
        `Apply it anyway?${unsure}${extra}`,
      apply: 'Apply Anyway',
    };
  }
  return { message: `diffucode ${kind}: accept the proposed edit to ${name}?${unsure}${extra}`, apply: 'Accept' };
}

/** `diffucode/retryCompletion`: the daemon is ready for a completion it was asked for too early. */
export interface RetryCompletion { textDocument: { uri: string; version: number }; position: Position }

/** Ask again only where the user still is: the same document, unchanged, the cursor (no
 * selection) where the completion was asked for. */
export function shouldRetry(retry: RetryCompletion, editor: { uri: string; version: number; cursor: Position; empty: boolean } | undefined): boolean {
  return editor !== undefined && editor.empty && editor.uri === retry.textDocument.uri &&
    editor.version === retry.textDocument.version &&
    editor.cursor.line === retry.position.line && editor.cursor.character === retry.position.character;
}

export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';

const LEVELS: Record<string, LogLevel> = {
  TRACE: 'trace', DEBUG: 'debug', INFO: 'info', WARNING: 'warn', ERROR: 'error', CRITICAL: 'error',
};

/** A line the server wrote to stderr, at its level: the server's log lines read
 * `2026-11-26 22:23:10,123 INFO diffucode.lsp: message` (lsp/server.py's configure_logging); the
 * output channel adds its own time, so the text keeps `name: message`. A line that is no log
 * line (a traceback's, a message's second line) continues the one before, at its level; before
 * any, it is an error (what Python prints when it fails to start). */
export function serverLogLine(line: string, previous: LogLevel | undefined): { level: LogLevel; text: string } {
  const m = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) (.*)$/.exec(line);
  if (m && LEVELS[m[1]]) return { level: LEVELS[m[1]], text: m[2] };
  return { level: previous ?? 'error', text: line };
}
