/**
 * "diffucode: Show Decoding Order": replays the order in which the model wrote the active
 * document's last suggestion or proposal. A proposal's text that sits in an open editor (the
 * document once accepted, or the proposal's diff while it is open) is shaded there, token by
 * token, with the step and AR-ness in the hover. A suggestion (ghost text is not in the
 * document), or a proposal no longer where it was put, is shown on a read-only page beside the
 * editor. What the colours and words are is decided in order.ts.
 */
import * as vscode from 'vscode';
import { offsetAt } from './logic';
import {
  Decoding, bucketColor, bucketCount, bucketOf, hoverMarkdown, kindInWords, orderPage, stepCount, summary,
  textIsAt, tokenHover, tokenSpans,
} from './order';

export class DecodingOrderView implements vscode.Disposable {
  private panel: vscode.WebviewPanel | undefined;
  private shades: vscode.TextEditorDecorationType[] = [];
  private decorated: vscode.TextEditor | undefined;
  private message: vscode.Disposable | undefined;
  private readonly disposables: vscode.Disposable[] = [];

  constructor() {
    this.disposables.push(vscode.workspace.onDidChangeTextDocument((e) => {
      // the shading is for the text as it was written: the first change makes it stale
      if (this.decorated && e.document === this.decorated.document && e.contentChanges.length) this.clear();
    }));
  }

  /** Shows `d`, the last decoding of `document`. */
  async show(d: Decoding, document: vscode.TextDocument, views: vscode.Uri[]): Promise<void> {
    this.clear();
    const name = document.uri.path.split('/').pop() ?? document.uri.toString();
    if (d.kind === 'suggestion' || !d.range) {
      const pos = d.position ?? { line: 0, character: 0 };
      const line = pos.line < document.lineCount ? document.lineAt(pos.line).text : '';
      this.showPage(d, `Suggested in ${name} at line ${pos.line + 1}, column ${pos.character + 1} (the item shown first).`,
        line.slice(0, pos.character));
      return;
    }
    const start = d.range.start;
    const targets = [document.uri.toString(), ...views.map((v) => v.toString())];
    const editor = vscode.window.visibleTextEditors.find((e) => targets.includes(e.document.uri.toString())
      && textIsAt(e.document.getText(), offsetAt(e.document.getText(), start), d));
    if (!editor) {
      this.showPage(d, `Proposed for ${name}, lines ${start.line + 1}-${d.range.end.line + 1}.`, '',
        'The proposal is not in an open editor (rejected, or edited since), so it is shown here.');
      return;
    }
    this.shadeEditor(editor, d);
    this.message = vscode.window.setStatusBarMessage(
      `$(symbol-color) Decoding order of the last ${kindInWords(d)}: ${summary(d)} (hover the text)`, 30000);
  }

  private shadeEditor(editor: vscode.TextEditor, d: Decoding): void {
    const steps = stepCount(d);
    const n = bucketCount(steps);
    // one more, unstyled, over the whole text: its hover says what the shades mean, once
    this.shades = [vscode.window.createTextEditorDecorationType({}), ...Array.from({ length: n }, (_, b) => vscode.window.createTextEditorDecorationType({
      backgroundColor: bucketColor(b, n),
      overviewRulerColor: bucketColor(b, n),
      overviewRulerLane: vscode.OverviewRulerLane.Center,
    }))];
    const text = editor.document.getText();
    const base = offsetAt(text, d.range!.start);
    const at = (offset: number) => editor.document.positionAt(base + offset);
    const about = new vscode.MarkdownString(hoverMarkdown(d));
    about.supportHtml = true;
    const byShade: vscode.DecorationOptions[][] = this.shades.map(() => []);
    byShade[0].push({ range: new vscode.Range(at(0), at(d.tokens.join('').length)), hoverMessage: about });
    tokenSpans(d.tokens).forEach((span, i) => {
      const step = d.order[i] ?? -1;
      const b = bucketOf(step, steps);
      if (b === null || span.end === span.start) return;
      byShade[b + 1].push({ range: new vscode.Range(at(span.start), at(span.end)), hoverMessage: tokenHover(d, step) });
    });
    this.shades.forEach((shade, b) => editor.setDecorations(shade, byShade[b]));
    this.decorated = editor;
  }

  private showPage(d: Decoding, where: string, before: string, note = ''): void {
    if (!this.panel) {
      this.panel = vscode.window.createWebviewPanel('diffucode.decodingOrder', 'diffucode: Decoding Order',
        { viewColumn: vscode.ViewColumn.Beside, preserveFocus: true }, { enableScripts: false });
      this.panel.onDidDispose(() => { this.panel = undefined; });
    } else {
      this.panel.reveal(vscode.ViewColumn.Beside, true);
    }
    this.panel.webview.html = orderPage(d, where, before, note);
  }

  /** Removes the shading from the editor (the page stays until closed). */
  clear(): void {
    for (const shade of this.shades) shade.dispose();
    this.shades = [];
    this.message?.dispose();
    this.message = undefined;
    this.decorated = undefined;
  }

  dispose(): void {
    this.clear();
    this.panel?.dispose();
    for (const d of this.disposables) d.dispose();
  }
}
