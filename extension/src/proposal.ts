/**
 * Showing a proposed edit (Fill Selection, Refine Function) as a diff beside the document, with
 * accept and reject. The server computed the edits; this file renders them, highlights the lines
 * the model is unsure of, and applies them only to the document version they were made for. A
 * result that does not parse (the server checks Python) is applied only on an explicit "Apply
 * Anyway".
 */
import * as vscode from 'vscode';
import { Edit, FillResult, RefineResult, applyEdits, canAccept, lowConfidenceLines, planEdits, proposalPrompt } from './logic';

export const SCHEME = 'diffucode-proposal';
const CONTEXT_KEY = 'diffucode.proposalActive';

interface Proposal {
  kind: string;
  document: vscode.Uri;
  version: number;
  edits: Edit[];
  view: vscode.Uri;
  text: string;
  lowLines: { line: number; confidence: number }[];
  /** Why the file would not parse with the edits applied, when it would not. */
  parseError?: string;
}

function toRange(r: Edit['range']): vscode.Range {
  return new vscode.Range(r.start.line, r.start.character, r.end.line, r.end.character);
}

/** The WorkspaceEdit that applies the server's edits to one document. */
export function workspaceEdit(uri: vscode.Uri, edits: Edit[]): vscode.WorkspaceEdit {
  const edit = new vscode.WorkspaceEdit();
  for (const e of planEdits(edits)) edit.replace(uri, toRange(e.range), e.text);
  return edit;
}

export class Proposals implements vscode.Disposable, vscode.TextDocumentContentProvider {
  private current: Proposal | undefined;
  private counter = 0;
  private readonly changed = new vscode.EventEmitter<vscode.Uri>();
  readonly onDidChange = this.changed.event;
  private readonly lowConfidence = vscode.window.createTextEditorDecorationType({
    isWholeLine: true,
    backgroundColor: 'rgba(255, 170, 0, 0.18)',
    overviewRulerColor: new vscode.ThemeColor('editorWarning.foreground'),
    overviewRulerLane: vscode.OverviewRulerLane.Right,
  });
  private readonly disposables: vscode.Disposable[] = [this.changed, this.lowConfidence];

  constructor(private readonly log: vscode.LogOutputChannel) {
    this.disposables.push(
      vscode.workspace.registerTextDocumentContentProvider(SCHEME, this),
      vscode.window.onDidChangeVisibleTextEditors((editors) => this.decorate(editors)),
      // Closing the diff by hand rejects the proposal.
      vscode.window.tabGroups.onDidChangeTabs((e) => {
        const view = this.current?.view.toString();
        if (view && e.closed.some((t) => t.input instanceof vscode.TabInputTextDiff && t.input.modified.toString() === view)) {
          void this.discard();
        }
      }),
    );
  }

  provideTextDocumentContent(uri: vscode.Uri): string {
    return this.current && this.current.view.toString() === uri.toString() ? this.current.text : '';
  }

  /** The document a proposal view proposes a change to; any other uri is its own document. */
  documentOf(uri: vscode.Uri): vscode.Uri {
    const p = this.current;
    return p && p.view.toString() === uri.toString() ? p.document : uri;
  }

  /** The open proposal's view of `document`, if there is one. */
  viewsOf(document: vscode.Uri): vscode.Uri[] {
    const p = this.current;
    return p && p.document.toString() === document.toString() ? [p.view] : [];
  }

  /** Opens the diff for a new proposal (replacing any earlier one) and offers accept / reject. */
  async show(kind: string, document: vscode.TextDocument, result: FillResult & Partial<RefineResult>): Promise<void> {
    const { version, edits } = result;
    await this.discard();
    if (!canAccept(version, document.version)) {
      void vscode.window.showWarningMessage(
        `diffucode: the document changed while ${kind} was working; nothing to show. Run it again.`);
      return;
    }
    if (edits.length === 0) {
      void vscode.window.showInformationMessage(`diffucode: ${kind} proposes no change.`);
      return;
    }
    const view = document.uri.with({ scheme: SCHEME, query: `proposal=${++this.counter}` });
    const proposal: Proposal = {
      kind, document: document.uri, version, edits, view,
      text: applyEdits(document.getText(), edits), lowLines: lowConfidenceLines(result.lines ?? []),
      parseError: result.parses === false ? (result.parseError ?? 'a syntax error') : undefined,
    };
    this.current = proposal;
    await vscode.commands.executeCommand('setContext', CONTEXT_KEY, true);
    const name = document.uri.path.split('/').pop();
    const unsure = proposal.lowLines.length ? ` (${proposal.lowLines.length} low-confidence lines marked)` : '';
    await vscode.commands.executeCommand('vscode.diff', document.uri, view, `${name} ↔ diffucode ${kind}${unsure}`,
      { preview: true, viewColumn: vscode.ViewColumn.Active });
    this.decorate(vscode.window.visibleTextEditors);
    const prompt = proposalPrompt(kind, name ?? '', result, unsure, result.note ?? '');
    const choice = proposal.parseError
      ? await vscode.window.showWarningMessage(prompt.message, prompt.apply, 'Reject')
      : await vscode.window.showInformationMessage(prompt.message, prompt.apply, 'Reject');
    if (this.current !== proposal) return;
    if (choice === prompt.apply) await this.accept(true);
    else if (choice === 'Reject') await this.discard();
  }

  private decorate(editors: readonly vscode.TextEditor[]): void {
    const p = this.current;
    if (!p) return;
    for (const editor of editors) {
      if (editor.document.uri.toString() !== p.view.toString()) continue;
      editor.setDecorations(this.lowConfidence, p.lowLines.map((l) => ({
        range: new vscode.Range(l.line, 0, l.line, 0),
        hoverMessage: `diffucode: confidence ${Math.round(l.confidence * 100)}%`,
        renderOptions: { after: { contentText: `  ${Math.round(l.confidence * 100)}%`, color: new vscode.ThemeColor('editorWarning.foreground') } },
      })));
    }
  }

  /** Applies the proposal if its document is still at the version the edits were made for. One
   * that does not parse needs `confirmed` (the prompt's "Apply Anyway") or a second, modal, yes. */
  async accept(confirmed = false): Promise<boolean> {
    const p = this.current;
    if (!p) {
      void vscode.window.showInformationMessage('diffucode: there is no proposal to accept.');
      return false;
    }
    if (p.parseError && !confirmed) {
      const choice = await vscode.window.showWarningMessage(
        `diffucode: with the ${p.kind} edit the file does not parse (${p.parseError}).`, { modal: true }, 'Apply Anyway');
      if (choice !== 'Apply Anyway' || this.current !== p) return false;
    }
    const document = vscode.workspace.textDocuments.find((d) => d.uri.toString() === p.document.toString());
    if (!canAccept(p.version, document?.version)) {
      await this.discard();
      void vscode.window.showWarningMessage(
        `diffucode: the document changed after the ${p.kind} proposal was made; nothing was applied. Run ${p.kind} again.`);
      return false;
    }
    const applied = await vscode.workspace.applyEdit(workspaceEdit(p.document, p.edits));
    this.log.info(`${p.kind}: ${applied ? 'applied' : 'could not apply'} ${p.edits.length} edit(s) to ${p.document}` +
      (p.parseError ? ` although it does not parse (${p.parseError})` : ''));
    await this.discard();
    if (applied) {
      await vscode.window.showTextDocument(p.document, { preview: false });
    } else {
      void vscode.window.showErrorMessage(`diffucode: VS Code refused the ${p.kind} edit.`);
    }
    return applied;
  }

  /** Drops the proposal and closes its diff. */
  async discard(): Promise<void> {
    const p = this.current;
    this.current = undefined;
    await vscode.commands.executeCommand('setContext', CONTEXT_KEY, false);
    if (!p) return;
    const tabs = vscode.window.tabGroups.all.flatMap((g) => g.tabs).filter((t) =>
      t.input instanceof vscode.TabInputTextDiff && t.input.modified.toString() === p.view.toString());
    if (tabs.length) await vscode.window.tabGroups.close(tabs);
  }

  dispose(): void {
    this.current = undefined;
    for (const d of this.disposables) d.dispose();
  }
}
