/**
 * Starting and stopping `<python> -m diffucode lsp`, the language server that does all the work.
 *
 * Knows how to find the interpreter, how to tell the user when diffucode is missing there, and
 * how to wire the client (settings, status notifications, completion feedback). It knows nothing
 * about completions: vscode-languageclient registers inline completion natively.
 */
import { execFile } from 'node:child_process';
import * as os from 'node:os';
import * as vscode from 'vscode';
import { LanguageClient, LanguageClientOptions, ServerOptions, State } from 'vscode-languageclient/node';
import { Completion, CompletionFeedback, Status, choosePython, explainStartFailure, localStatus } from './logic';

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
}

/** One language client at a time; `restart` replaces it. */
export class Server implements vscode.Disposable {
  client: LanguageClient | undefined;
  private feedback = new CompletionFeedback();
  private lastStatus: Status | undefined;

  /** `cwd` is where the server runs: not the workspace, whose folders would come first on
   * sys.path with `python -m` (a checkout of diffucode would shadow the installed package). */
  constructor(private readonly log: vscode.LogOutputChannel, private readonly events: ServerEvents,
    private readonly cwd: string) {}

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
      initializationOptions: { settings: settingsObject() },
      synchronize: { configurationSection: SECTION },
      middleware: {
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
        this.log.warn(`stopping the language server: ${error}`);
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
      this.log.debug(`not sent (server not running): ${method}`);
      return;
    }
    this.client.sendNotification(method, params).catch((e) => this.log.warn(`${method}: ${e}`));
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
