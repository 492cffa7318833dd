// What the real-editor test (vscode.e2e.mjs) and the keystroke-latency benchmark share: waiting,
// a free port, a quiet editor's settings, code-server with the extension in headless Chromium, and
// the processes a run started, found by the marker in their environment (or the run's temp folder
// on their command line) and killed by PID, never by name.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function until(what, fn, timeoutMs, everyMs = 250) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs / 1000}s waiting for ${what}`);
    await sleep(everyMs);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

/** The processes of one run: those whose environment holds `mark` or whose command line names `tmp`. */
export function processes(mark, tmp) {
  /** PIDs of live processes whose environment or command line carries this run's marker. */
  function markedPids() {
    const pids = [];
    for (const entry of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
      try {
        const env = fs.readFileSync(`/proc/${entry}/environ`, 'latin1');
        const cmd = fs.readFileSync(`/proc/${entry}/cmdline`, 'latin1');
        if (env.split('\0').includes(mark) || cmd.includes(tmp)) pids.push(Number(entry));
      } catch { /* gone, or not ours to read */ }
    }
    return pids;
  }

  function cmdline(pid) {
    try { return fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0').join(' ').trim(); } catch { return ''; }
  }

  async function killMarked() {
    for (const signal of ['SIGTERM', 'SIGKILL']) {
      const pids = markedPids();
      if (!pids.length) return [];
      for (const pid of pids) { try { process.kill(pid, signal); } catch { /* already gone */ } }
      await until('marked processes to exit', () => markedPids().length === 0, 5000).catch(() => {});
    }
    return markedPids();
  }

  return { markedPids, cmdline, killMarked };
}

/** Editor settings that keep VS Code's own suggestions, tips and network out of the way: Tab must
 *  reach the ghost text, not a suggest widget (tooling.md). */
export const QUIET_EDITOR = {
  'editor.quickSuggestions': { other: 'off', comments: 'off', strings: 'off' },
  'editor.suggestOnTriggerCharacters': false,
  'editor.wordBasedSuggestions': 'off',
  'editor.inlineSuggest.enabled': true,
  'editor.autoClosingBrackets': 'never',
  'editor.autoClosingQuotes': 'never',
  'workbench.startupEditor': 'none',
  'workbench.secondarySideBar.defaultVisibility': 'hidden',
  'workbench.tips.enabled': false,
  'security.workspace.trust.enabled': false,
  'telemetry.telemetryLevel': 'off',
  'update.mode': 'none',
  'extensions.autoCheckUpdates': false,
  'extensions.autoUpdate': false,
  'extensions.ignoreRecommendations': true,
  'chat.disableAIFeatures': true,
  'git.enabled': false,
};

/** Install the .vsix, start code-server on a free port and open `workspace` in headless Chromium.
 *  Returns { codeServer, browser, page, port }. */
export async function openWorkbench({ chromium, codeServerBin, vsix, userData, extensions, workspace, env, serverLog,
  viewport = { width: 1280, height: 800 }, listenMs = 30000, workbenchMs = 60000, log = () => {} }) {
  execFileSync(codeServerBin, ['--extensions-dir', extensions, '--user-data-dir', userData,
    '--install-extension', path.resolve(vsix), '--force'], { stdio: 'ignore', env });
  const port = await freePort();
  const out = fs.openSync(serverLog, 'w');
  const codeServer = spawn(codeServerBin, ['--auth', 'none', '--bind-addr', `127.0.0.1:${port}`,
    '--user-data-dir', userData, '--extensions-dir', extensions, '--disable-telemetry',
    '--disable-update-check', '--disable-workspace-trust', workspace],
  { env, stdio: ['ignore', out, out], detached: true });
  await until('code-server to listen', async () => {
    try { return (await fetch(`http://127.0.0.1:${port}/healthz`)).ok; } catch { return false; }
  }, listenMs);
  log(`code-server on port ${port}`);
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium', headless: true, env,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const page = await browser.newPage({ viewport });
  await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(workspace)}`);
  await page.waitForSelector('.monaco-workbench', { timeout: workbenchMs });
  log('workbench loaded');
  return { codeServer, browser, page, port };
}
