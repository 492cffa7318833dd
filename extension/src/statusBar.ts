/**
 * The status bar item (state, model, last latency) and the menu it opens: the commands, with the
 * state in words as the menu's title. What the text says is decided in logic.ts.
 */
import * as vscode from 'vscode';
import { Status, localStatus, stateInWords, statusBarText } from './logic';

export class StatusBar implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('diffucode.status', vscode.StatusBarAlignment.Right, 100);
  private status: Status = localStatus('starting', 'Starting');
  private timer: NodeJS.Timeout | undefined;

  constructor() {
    this.item.name = 'diffucode';
    this.item.command = 'diffucode.showMenu';
    this.render();
    this.item.show();
  }

  get current(): Status {
    return this.status;
  }

  update(status: Status): void {
    this.status = status;
    this.render();
  }

  private render(): void {
    const { text, tooltip } = statusBarText(this.status, Date.now());
    this.item.text = text;
    this.item.tooltip = tooltip;
    this.item.accessibilityInformation = { label: `diffucode: ${tooltip}` };
    this.item.backgroundColor = this.status.state === 'error'
      ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
    // A snooze counts down in minutes: redraw once a minute while snoozed.
    if (this.status.state === 'snoozed' && !this.timer) {
      this.timer = setInterval(() => this.render(), 60000);
    } else if (this.status.state !== 'snoozed' && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  async showMenu(): Promise<void> {
    const s = this.status;
    const items: (vscode.QuickPickItem & { command?: string; args?: unknown[] })[] = [
      { label: '$(sparkle) Trigger Suggestion', command: 'diffucode.triggerSuggestion' },
      { label: '$(edit) Fill Selection', command: 'diffucode.fillSelection' },
      { label: '$(wand) Refine Function', command: 'diffucode.refineFunction' },
      { label: '$(symbol-color) Show Decoding Order', command: 'diffucode.showDecodingOrder' },
      { label: '', kind: vscode.QuickPickItemKind.Separator },
      s.enabled
        ? { label: '$(circle-slash) Turn Completions Off', command: 'diffucode.toggle', args: [false] }
        : { label: '$(check) Turn Completions On', command: 'diffucode.toggle', args: [true] },
      s.state === 'snoozed'
        ? { label: '$(bell) Wake Up', command: 'diffucode.snooze', args: [0] }
        : { label: '$(clock) Snooze…', command: 'diffucode.snooze' },
      { label: '$(debug-restart) Restart Server', command: 'diffucode.restartServer' },
      { label: '$(output) Show Logs', command: 'diffucode.showLogs' },
      { label: '$(gear) Settings', command: 'workbench.action.openSettings', args: ['@ext:diffucode.diffucode'] },
    ];
    const pick = await vscode.window.showQuickPick(items, {
      title: `diffucode: ${stateInWords(s, Date.now())}`,
      placeHolder: 'diffucode commands',
    });
    if (pick?.command) await vscode.commands.executeCommand(pick.command, ...(pick.args ?? []));
  }

  dispose(): void {
    if (this.timer) clearInterval(this.timer);
    this.item.dispose();
  }
}
