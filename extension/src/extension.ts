/**
 * The diffucode extension: starts the language server, shows its state, and offers commands.
 * Ghost text comes from the server through vscode-languageclient's native inline completion;
 * Fill Selection and Refine Function ask the server for edits and show them as a proposal;
 * Show Decoding Order replays the order in which the model wrote the last of them. A completion
 * asked for before the daemon was ready is asked again when the server says it is, if the cursor
 * has not moved. Accept word / accept line are VS Code's own inline-suggest commands; nothing
 * here binds keys.
 */
import * as vscode from 'vscode';
import { Completion, FillResult, RefineResult, RetryCompletion, SNOOZE_MINUTES, parseMinutes, shouldRetry } from './logic';
import { Decoding } from './order';
import { DecodingOrderView } from './orderView';
import { Proposals } from './proposal';
import { SECTION, Server } from './server';
import { StatusBar } from './statusBar';

let server: Server | undefined;
let logChannel: vscode.LogOutputChannel | undefined;

/** Runs one server request under a cancellable progress notification; errors become messages. */
async function withServer<R>(server: Server, title: string, method: string, params: object): Promise<R | undefined> {
  try {
    return await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: `diffucode: ${title}…`, cancellable: true },
      (_progress, token) => server.request<R>(method, params, token));
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    if (!/cancel/i.test(message)) {
      const choice = await vscode.window.showErrorMessage(`diffucode: ${title} failed: ${message}`, 'Show Logs');
      if (choice) await vscode.commands.executeCommand('diffucode.showLogs');
    }
    return undefined;
  }
}

/** The retry the server asks for once the daemon is ready: only where the user still is. */
function retryCompletion(retry: RetryCompletion): void {
  const editor = vscode.window.activeTextEditor;
  const here = editor && {
    uri: editor.document.uri.toString(), version: editor.document.version,
    cursor: { line: editor.selection.active.line, character: editor.selection.active.character },
    empty: editor.selection.isEmpty,
  };
  // (an explicit trigger: VS Code 1.139 ignores `{explicit: false}` when nothing was typed since)
  if (shouldRetry(retry, here)) void vscode.commands.executeCommand('editor.action.inlineSuggest.trigger');
}

export function activate(context: vscode.ExtensionContext): void {
  // Not in context.subscriptions: the server is stopped first, in deactivate, and may log until then.
  const log = vscode.window.createOutputChannel('diffucode', { log: true });
  logChannel = log;
  const statusBar = new StatusBar();
  const proposals = new Proposals(log);
  const orderView = new DecodingOrderView();
  const srv = new Server(log, { status: (s) => statusBar.update(s), retry: retryCompletion }, context.extensionPath);
  server = srv;
  context.subscriptions.push(statusBar, proposals, orderView);

  const command = (name: string, run: (...args: any[]) => unknown) =>
    context.subscriptions.push(vscode.commands.registerCommand(name, run));

  command('diffucode.fillSelection', async () => {
    const editor = vscode.window.activeTextEditor;
    if (!editor || editor.selection.isEmpty) {
      void vscode.window.showInformationMessage('diffucode: select the code to fill first.');
      return;
    }
    const document = editor.document;
    const s = editor.selection;
    const result = await withServer<FillResult>(srv, 'Fill Selection', 'diffucode/fillSelection', {
      textDocument: { uri: document.uri.toString() },
      range: { start: { line: s.start.line, character: s.start.character }, end: { line: s.end.line, character: s.end.character } },
    });
    if (result) void proposals.show('Fill Selection', document, result);
  });

  command('diffucode.refineFunction', async () => {
    const editor = vscode.window.activeTextEditor;
    if (!editor) return;
    const document = editor.document;
    const p = editor.selection.active;
    const result = await withServer<RefineResult>(srv, 'Refine Function', 'diffucode/refineFunction', {
      textDocument: { uri: document.uri.toString() },
      position: { line: p.line, character: p.character },
    });
    if (result) void proposals.show('Refine Function', document, result);
  });

  command('diffucode.showDecodingOrder', async () => {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      void vscode.window.showInformationMessage('diffucode: open a document first.');
      return;
    }
    const uri = proposals.documentOf(editor.document.uri);
    const document = vscode.workspace.textDocuments.find((d) => d.uri.toString() === uri.toString()) ?? editor.document;
    let decoding: Decoding | null;
    try {
      decoding = await srv.request<Decoding | null>('diffucode/lastDecoding', { textDocument: { uri: uri.toString() } });
    } catch (error) {
      void vscode.window.showErrorMessage(`diffucode: Show Decoding Order failed: ${error instanceof Error ? error.message : error}`);
      return;
    }
    if (!decoding) {
      void vscode.window.showInformationMessage(
        'diffucode: no suggestion, Fill Selection or Refine Function yet in this document: nothing to replay.');
      return;
    }
    await orderView.show(decoding, document, proposals.viewsOf(uri));
  });

  command('diffucode.acceptProposal', () => proposals.accept());
  command('diffucode.rejectProposal', () => proposals.discard());

  command('diffucode.toggle', (enabled?: boolean) => {
    srv.notify('diffucode/toggle', { enabled: typeof enabled === 'boolean' ? enabled : !statusBar.current.enabled });
  });

  command('diffucode.snooze', async (minutes?: number) => {
    if (typeof minutes !== 'number') {
      const items = [...SNOOZE_MINUTES.map((m) => ({ label: `${m} minutes`, minutes: m as number | undefined })),
        { label: 'Other…', minutes: undefined }];
      if (statusBar.current.state === 'snoozed') items.unshift({ label: 'Wake up now', minutes: 0 });
      const pick = await vscode.window.showQuickPick(items, { title: 'diffucode: snooze completions for' });
      if (!pick) return;
      minutes = pick.minutes ?? parseMinutes(await vscode.window.showInputBox({
        prompt: 'Snooze completions for how many minutes?',
        validateInput: (v) => (parseMinutes(v) === undefined ? 'Whole minutes, 0 to 10080' : undefined),
      }) ?? '');
      if (minutes === undefined) return;
    }
    srv.notify('diffucode/snooze', { minutes });
  });

  command('diffucode.restartServer', () => srv.restart());
  command('diffucode.showLogs', () => log.show());
  command('diffucode.showMenu', () => statusBar.showMenu());
  command('diffucode.triggerSuggestion', () => vscode.commands.executeCommand('editor.action.inlineSuggest.trigger'));
  // The server attaches this command to every inline completion item; VS Code runs it on accept.
  command('diffucode.didAcceptCompletion', (item: Completion) => srv.didAccept(item));

  context.subscriptions.push(vscode.workspace.onDidChangeConfiguration((e) => {
    if (e.affectsConfiguration(`${SECTION}.pythonPath`) || e.affectsConfiguration(`${SECTION}.log.level`)) void srv.restart();
  }));

  void srv.start();
}

export async function deactivate(): Promise<void> {
  await server?.stop();
  if (server) server.logClosed = true;
  server = undefined;
  logChannel?.dispose();
  logChannel = undefined;
}
