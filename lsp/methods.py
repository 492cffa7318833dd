"""The language server's own methods: custom requests and notifications (JSON) between the editor
and `diffucode lsp`, beside the standard textDocument/inlineCompletion. Ranges and positions are
LSP's: 0-based lines, columns in the position encoding negotiated at initialize.

diffucode/fillSelection   client -> server, request.
    params {textDocument: {uri}, range}  ->  {edits: [{range, text}], version, parses, parseError}
    The selected range is re-written by the model (a canvas about the selection's size);
    `version` is the document version the edits apply to. Errors: the daemon's, as LSP errors.
diffucode/refineFunction  client -> server, request.
    params {textDocument: {uri}, position}  ->  {edits: [{range, text}], version, range,
    lines: [{line, confidence}], note, parses, parseError}: the enclosing function (Python
    through `ast`, others by indentation and braces), its least confident tokens re-masked and
    denoised; `lines` gives a confidence in [0, 1] per line of the new text (line numbers in the
    document after the edit); `note` says what the daemon's line guard kept.
    Both re-indent the model's text to the block it replaces (lsp/indent.py: the first line as
    the line it replaces, the others relative to it, tabs or spaces as the file uses). `parses`:
    whether the Python file with the edits applied parses (`ast`); null for other languages and
    for a file that did not parse before; `parseError` ("line 5: unexpected indent", a line of
    the document after the edit) when it does not. The editor asks for an explicit second
    confirmation before applying a proposal that does not parse.
diffucode/lastDecoding    client -> server, request.
    params {textDocument: {uri}}  ->  {kind: "suggestion" | "refinement" | "fill", tokens: [str],
    order: [int], steps, ar_ness: {local, global} | null, position | range} or null: how the
    model wrote the document's last suggestion (the item shown first) or proposal. `tokens` join
    to the text the user was shown (a suggestion after post-processing); `order[i]` is the
    denoising step in [0, steps) that revealed token i, -1 for one kept from before (most of a
    refinement); AR-ness is 1.0 for left to right (daemon/engine/order.py; null for a sampled
    alternative the daemon gave none). A suggestion gives the `position` it was offered at; a
    proposal the `range` its text covers once applied. null when the document has none.
diffucode/status          client -> server, request. {} -> EditorStatus (below).
diffucode/statusChanged   server -> client, notification. EditorStatus.
diffucode/retryCompletion server -> client, notification. {textDocument: {uri, version}, position}
                          The last inline completion answered empty because the daemon was not
                          ready (starting, or down) was asked at `position` in that version of
                          the document; the daemon is ready now. The editor asks again (VS Code:
                          editor.action.inlineSuggest.trigger) only if that document is active at
                          that version with the cursor at `position`. Sent once per such request;
                          the request that follows there is answered as the keystroke it stands
                          for (one suggestion, not an explicit trigger's alternatives).
diffucode/toggle          client -> server, notification. {enabled: bool}
diffucode/snooze          client -> server, notification. {minutes: number} (0 wakes up)
diffucode/didShowCompletion, diffucode/didAcceptCompletion, diffucode/didRejectCompletion
                          client -> server, notifications. {uri, text}. Logged locally and used
                          to tune the debounce; nothing leaves the machine.

EditorStatus: {state: "starting" | "ready" | "busy" | "error" | "down" | "disabled" | "snoozed",
               message, model, lastLatencyMs, snoozedUntil (epoch ms), enabled}
"""

LSP_FILL_SELECTION = "diffucode/fillSelection"
LSP_REFINE_FUNCTION = "diffucode/refineFunction"
LSP_LAST_DECODING = "diffucode/lastDecoding"
LSP_STATUS = "diffucode/status"
LSP_STATUS_CHANGED = "diffucode/statusChanged"
LSP_RETRY_COMPLETION = "diffucode/retryCompletion"
LSP_TOGGLE = "diffucode/toggle"
LSP_SNOOZE = "diffucode/snooze"
LSP_DID_SHOW = "diffucode/didShowCompletion"
LSP_DID_ACCEPT = "diffucode/didAcceptCompletion"
LSP_DID_REJECT = "diffucode/didRejectCompletion"
