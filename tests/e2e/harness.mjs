// What the real-editor test (vscode.e2e.mjs) needs besides the editor: waiting, a free port, and
// the processes it started, found by the marker in their environment (or the run's temp folder on
// their command line) and killed by PID, never by name.
import fs from 'node:fs';
import net from 'node:net';

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
