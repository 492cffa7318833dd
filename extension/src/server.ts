/**
 * Starting and stopping `<python> -m diffucode lsp`, the language server that does all the work.
 *
 * Knows how to find the interpreter, how to tell the user when diffucode is missing there, and
 * how to wire the client (settings, status and retry notifications, completion feedback, the
 * server's log lines into the log channel at their own level). It knows nothing about
 * completions: vscode-languageclient registers inline completion natively.
 */
import { execFile } from 'node:child_process';
import * as os from 'node:os';
import * as readline from 'node:readline';
import type { Readable } from 'node:stream';
import * as vscode from 'vscode';
import { LanguageClient, LanguageClientOptions, ServerOptions, State } from 'vscode-languageclient/node';
import {
  Completion, CompletionFeedback, LogLevel, RetryCompletion, Status, choosePython, explainStartFailure, localStatus,
  serverLogLine,
} from './logic';

export const SECTION = 'diffucode';

/** The whole `diffucode` settings section as plain JSON (what the server reads). */
export function settingsObject(): Record<string, unknown> {
  return JSON.parse(JSON.stringify(vscode.workspace.getConfiguration(SECTION)));
}

interface PythonExtensionApi {
  environments?: { getActiveEnvironmentPath?(resource?: vscode.Uri): { path?: string } | undefined };
  settings?: { getExecutionDetails?(resource?: vscode.Uri): { execCommand?: string[] } | undefined };
}

async function pythonFromExtension(): Promise<string | undefined> {
  const ext = vscode.extensions.getExtension<PythonExtensionApi>('ms-python.python');
  if (!ext) return undefined;
  try {
    const api = ext.isActive ? ext.exports : await ext.activate();
    const resource = vscode.workspace.workspaceFolders?.[0]?.uri;
    return api?.environments?.getActiveEnvironmentPath?.(resource)?.path
      ?? api?.settings?.getExecutionDetails?.(resource)?.execCommand?.[0];
  } catch {
    return undefined;
  }
}

export async function resolvePython(): Promise<{ path: string; source: string }> {
  const setting = vscode.workspace.getConfiguration(SECTION).get<string>('pythonPath');
  return choosePython(setting, setting ? undefined : await pythonFromExtension(), os.homedir());
}

/** Runs `<python> -m diffucode lsp --help`; resolves to an explanation when that fails. */
function checkInstalled(python: string, source: string, cwd: string): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile(python, ['-m', 'diffucode', 'lsp', '--help'], { timeout: 30000, cwd }, (error, _stdout, stderr) => {
      resolve(error ? explainStartFailure(python, source, { code: error.code ?? undefined, stderr }) : undefined);
    });
  });
}

export interface ServerEvents {
  status(status: Status): void;
  /** `diffucode/retryCompletion`: the daemon is ready for a completion asked for too early. */
  retry(retry: RetryCompletion): void;
}

/** One language client at a time; `restart` replaces it. */
export class Server implements vscode.Disposable {
  client: LanguageClient | undefined;
  private feedback = new CompletionFeedback();
  private lastStatus: Status | undefined;
  /** Set once the log channel is disposed: what the server still writes then is dropped (a
   * closed channel throws "Channel has been closed"). */
  logClosed = false;

  /** `cwd` is where the server runs: not the workspace, whose folders would come first on
   * sys.path with `python -m` (a checkout of diffucode would shadow the installed package). */
  constructor(private readonly log: vscode.LogOutputChannel, private readonly events: ServerEvents,
    private readonly cwd: string) {}

  /** One line to the log channel at `level`, unless it is closed. */
  private write(level: LogLevel, text: string): void {
    if (!this.logClosed) this.log[level](text);
  }

  /** The server's stderr: each log line at its own level (vscode-languageclient would log every
   * line as an error); the channel's level (Developer: Set Log Level) hides what is below it. */
  private pipeLog(input: Readable, stream: 'stdout' | 'stderr'): void {
    let level: LogLevel | undefined = stream === 'stdout' ? 'info' : undefined;
    readline.createInterface({ input, crlfDelay: Infinity, terminal: false, historySize: 0 }).on('line', (line) => {
      const parsed = serverLogLine(line, level);
      level = parsed.level;
      this.write(parsed.level, parsed.text);
    });
  }

  private report(status: Status): void {
    this.lastStatus = status;
    this.events.status(status);
  }

  async start(): Promise<void> {
    const { path: python, source } = await resolvePython();
    this.report(localStatus('starting', `Starting ${python} -m diffucode lsp`, this.lastStatus));
    this.log.info(`python: ${python} (from ${source})`);
    const problem = await checkInstalled(python, source, this.cwd);
    if (problem) {
      this.log.error(problem);
      this.report(localStatus('error', problem, this.lastStatus));
      void vscode.window.showErrorMessage(problem, 'Open Setting', 'Show Logs').then((choice) => {
        if (choice === 'Open Setting') {
          void vscode.commands.executeCommand('workbench.action.openSettings', 'diffucode.pythonPath');
        } else if (choice === 'Show Logs') {
          this.log.show();
        }
      });
      return;
    }
    const logLevel = vscode.workspace.getConfiguration(SECTION).get<string>('log.level') || 'info';
    const serverOptions: ServerOptions = { command: python, args: ['-m', 'diffucode', 'lsp', '--log-level', logLevel],
      options: { cwd: this.cwd } };
    const clientOptions: LanguageClientOptions = {
      documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
      outputChannel: this.log,
      stdioOptions: { stdout: (input) => this.pipeLog(input, 'stdout'), stderr: (input) => this.pipeLog(input, 'stderr') },
      initializationOptions: { settings: settingsObject() },
      synchronize: { configurationSection: SECTION },
      middleware: {
        // A setting that restarts the server (pythonPath, log.level) also reaches the one stopping:
        // what cannot be sent to it is no error (the next server reads the settings at start).
        workspace: {
          didChangeConfiguration: async (sections, next) => {
            try {
              await next(sections);
            } catch (error) {
              if (this.client === client && client.isRunning()) throw error;
            }
          },
        },
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          const result = await next(document, position, context, token);
          const items = Array.isArray(result) ? result : result?.items;
          const first = items?.[0]?.insertText;
          if (first !== undefined && !token.isCancellationRequested) {
            const text = typeof first === 'string' ? first : first.value;
            for (const f of this.feedback.shown({ uri: document.uri.toString(), text })) {
              this.notify(f.method, f.params);
            }
          }
          return result;
        },
      },
    };
    const client = new LanguageClient('diffucode', 'diffucode', serverOptions, clientOptions);
    this.client = client;
    client.onDidChangeState((e) => {
      if (this.client !== client) return;
      if (e.newState === State.Starting) this.report(localStatus('starting', 'Starting the language server', this.lastStatus));
      if (e.newState === State.Stopped) this.report(localStatus('down', 'The language server stopped (see Show Logs)', this.lastStatus));
    });
    client.onNotification('diffucode/statusChanged', (s: Status) => this.report(s));
    client.onNotification('diffucode/retryCompletion', (r: RetryCompletion) => this.events.retry(r));
    try {
      await client.start();
      this.report(await client.sendRequest<Status>('diffucode/status', {}));
    } catch (error) {
      const message = `diffucode: the language server failed to start: ${error instanceof Error ? error.message : error}`;
      this.log.error(message);
      this.report(localStatus('error', message, this.lastStatus));
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) {
      try {
        await client.stop(5000);
      } catch (error) {
        this.write('warn', `stopping the language server: ${error}`);
      }
    }
    this.report(localStatus('down', 'Stopped', this.lastStatus));
  }

  private restarting: Promise<void> = Promise.resolve();

  /** Restarts queue up, so that quick setting changes never leave two servers running. */
  restart(): Promise<void> {
    this.restarting = this.restarting.then(() => this.stop()).then(() => this.start());
    return this.restarting;
  }

  /** A notification to the running server; dropped (and logged) when none runs. */
  notify(method: string, params: object): void {
    if (!this.client?.isRunning()) {
      this.write('debug', `not sent (server not running): ${method}`);
      return;
    }
    this.client.sendNotification(method, params).catch((e) => this.write('warn', `${method}: ${e}`));
  }

  /** The server's `command` on each inline completion item lands here when the user accepts it. */
  didAccept(item: Completion): void {
    this.feedback.accepted();
    this.notify('diffucode/didAcceptCompletion', item);
  }

  async request<R>(method: string, params: object, token?: vscode.CancellationToken): Promise<R> {
    if (!this.client?.isRunning()) {
      throw new Error(this.lastStatus?.state === 'error' ? this.lastStatus.message : 'the language server is not running');
    }
    // without a token, pass none: an `undefined` last argument would be sent as a second param (an array)
    return token ? this.client.sendRequest<R>(method, params, token) : this.client.sendRequest<R>(method, params);
  }

  dispose(): void {
    void this.stop();
  }
}
