"""The HTTP dialects of fill-in-the-middle that editors and plugins already speak.

Each dialect reads a JSON body into one `Fill` (the code before and after the cursor, the wire's
Sampling, how many choices, stop strings, streaming, a deadline) and writes the answers back in
its own shape: whole, or as the events of a stream. Knows JSON shapes and the wire's params;
not HTTP, sockets or the scheduler (http.py does those). As in the servers imitated, fields a
dialect does not know are ignored; a known field of the wrong type is a BadRequest naming it.
A sampling field left out stays None, so the engine's default applies (scheduler.options_of).

Where each shape comes from (read, then written here in our own words):
- OpenAI legacy completions: openai/openai-python src/openai/types/completion.py,
  completion_choice.py, completion_usage.py, completion_create_params.py; a stream is
  `data: <chunk>` events ending with `data: [DONE]` (src/openai/_streaming.py).
- Continue's OpenAI-family FIM: continuedev/continue core/llm/llms/OpenAI.ts `_streamFim` posts
  {model, prompt, suffix, max_tokens, temperature, top_p, frequency_penalty, presence_penalty,
  stop, stream: true} to `<apiBase>fim/completions` and reads `choices[0].delta.content`.
- llama.cpp `/infill`: ggml-org/llama.cpp tools/server/README.md (the /infill options, the
  /completion options and response fields); ggml-org/llama.vscode src/llama-server.ts (the body
  it posts: input_prefix, input_suffix, input_extra, prompt, n_predict, top_k, top_p, stream,
  samplers, cache_prompt, t_max_prompt_ms, t_max_predict_ms, n_indent), src/completion.ts (reads
  `content`) and its status bar's `showInfo` (tokens_cached, truncated, generation_settings.n_ctx,
  timings.prompt_n/_ms/_per_second, timings.predicted_n/_ms/_per_second).
- Ollama `/api/generate`: ollama/ollama docs/api.md (model, prompt, suffix, options, stream
  default true, raw; NDJSON chunks {model, created_at, response, done}, the last with
  done_reason and durations in nanoseconds); continuedev/continue core/llm/llms/Ollama.ts
  (`_getGenerateOptions`, and `/api/show`, whose template must mention `.Suffix` for Continue
  to use fill-in-the-middle).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ..engine.options import Options
from ..rpc.protocol import CompleteParams, InfillParams, Sampling, TaskResult, short
from ..rpc.snippets import language_of, snippet_block

# A completion (no suffix) with n > 1: the choices after the first are sampled at these temperatures,
# each with a seed of its own, one job per choice. An infill with n > 1 is one job asking for n
# alternatives, which the daemon samples as one batch and ranks by the coupled likelihood
# (daemon/engine/ranking.py): the choices come best first, de-duplicated (so there may be fewer).
ALTERNATIVE_TEMPERATURES = (0.4, 0.8)
MAX_CHOICES = 8  # n
MAX_STOP = 16  # stop strings
MAX_EXTRA = 256  # input_extra entries (llama.vscode keeps a ring of 16 chunks)
RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's "pick a seed": here the engine's default seed


class BadRequest(Exception):
    """A request the client must change: HTTP status, a message with the value and the limit,
    and the field it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


# --- reading fields ----------------------------------------------------------------------------

_KINDS = {"a string": str, "an integer": int, "a number": (int, float), "a boolean": bool, "an object": dict,
          "an array": list}


def _get(body: dict, name: str, kind: str, where: str = ""):
    """body[name] if it is of `kind` (None when absent or null), else a BadRequest naming it."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, _KINDS[kind]) and not (kind in ("an integer", "a number") and isinstance(value, bool))
    if ok and kind == "a number":
        value = float(value)
        ok = math.isfinite(value)
    if not ok:
        raise BadRequest(f"{where}{name} must be {kind}, got {short(value)}", where + name)
    return value


def _stop(body: dict, name: str = "stop", where: str = "") -> list[str]:
    """A stop string or a list of them (empty strings dropped)."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest(f"{where}{name} must be a string or an array of strings, got {short(value)}", where + name)
    if len(items) > MAX_STOP:
        raise BadRequest(f"{where}{name} has {len(items)} strings, over the limit of {MAX_STOP}", where + name)
    return [s for s in items if s]


# Fill-in-the-middle prompts that clients format themselves, as (prefix, suffix, middle) markers: Zed's
# open_ai_compatible_api and ollama providers send no suffix field but one of these (zed-industries/zed
# crates/edit_prediction/src/fim.rs `format_fim_prompt`), as do llm.nvim and other plugins.
FIM_MARKERS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen (DiffuCoder's own family), CodeGemma
               ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, Zed's default
               ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek
               ("<|code_prefix|>", "<|code_suffix|>", "<|code_middle|>"),  # GLM
               ("<PRE> ", " <SUF>", " <MID>"))  # CodeLlama
CODESTRAL = ("[SUFFIX]", "[PREFIX]")  # suffix first: [SUFFIX]s[PREFIX]p


def split_fim(prompt: str) -> tuple[str, str] | None:
    """(before, after) from a prompt in one of the FIM layouts, None if it is in none. Text after
    the middle marker starts the middle (it joins `before`, as llama.cpp's `prompt` does); text
    before the prefix marker (repository headers of some layouts) is dropped: its markers are not
    code, and the model is given the code on either side of the cursor only."""
    for pre, suf, mid in FIM_MARKERS:
        i = prompt.find(pre)
        j = prompt.find(suf, i + len(pre)) if i >= 0 else -1
        k = prompt.rfind(mid) if j >= 0 else -1
        if k >= j + len(suf):
            return prompt[i + len(pre):j] + prompt[k + len(mid):], prompt[j + len(suf):k]
    suf, pre = CODESTRAL
    if prompt.startswith(suf) and pre in prompt:
        after, _, before = prompt[len(suf):].partition(pre)
        return before, after
    return None


def _fim(before: str, after: str | None) -> tuple[str, str | None]:
    """A body without a suffix may carry one inside a FIM-formatted prompt."""
    if after is None and (split := split_fim(before)) is not None:
        return split
    return before, after


def _canvas(value: int | None) -> int | None:
    """A dialect's token count as a canvas size: negative (llama.cpp and Ollama: no limit) means
    the engine's default; 0 means answer empty without running the model."""
    return None if value is None or value < 0 else value


def _seed(value: int | None) -> int | None:
    return None if value is None or value in RANDOM_SEEDS else value


# --- one request, whatever the dialect ------------------------------------------------------------

@dataclass
class Fill:
    before: str
    after: str | None  # None: a completion, nothing after the cursor
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    deadline_ms: int | None = None
    tokens_field: str = "max_tokens"  # the dialect's name for the canvas size, for error messages
    include_usage: bool = False  # OpenAI stream_options.include_usage
    group: str | None = None  # X-Diffucode-Group: a newer request of the group cancels this one

    @property
    def canvas(self) -> int:
        return Options.max_new_tokens if self.sampling.max_new_tokens is None else self.sampling.max_new_tokens

    def jobs(self) -> list[tuple[str, CompleteParams | InfillParams]]:
        """The daemon's method and params of each job this request needs (see ALTERNATIVE_TEMPERATURES)."""
        if self.after is not None and self.n > 1:
            return [("infill", InfillParams(before=self.before, after=self.after, sampling=self.sampling,
                                            deadline_ms=self.deadline_ms, group=self.group, alternatives=self.n))]
        return [self.params(i) for i in range(self.n)]

    def params(self, i: int) -> tuple[str, CompleteParams | InfillParams]:
        """The daemon's method and params for choice i: the first as asked, the others at the
        alternative temperatures, each with its own seed."""
        sampling = self.sampling
        if i:
            sampling = replace(sampling, temperature=ALTERNATIVE_TEMPERATURES[(i - 1) % len(ALTERNATIVE_TEMPERATURES)],
                               seed=(sampling.seed or 0) + i)
        group = None if self.group is None else f"{self.group}#{i}"  # as the language server names them
        if self.after is None:
            return "complete", CompleteParams(before=self.before, sampling=sampling, deadline_ms=self.deadline_ms,
                                              group=group)
        return "infill", InfillParams(before=self.before, after=self.after, sampling=sampling,
                                      deadline_ms=self.deadline_ms, group=group)


@dataclass
class Choice:
    """One answer as the dialects report it."""

    text: str
    finish: str  # "stop": the model ended it or a stop string did; "length": the canvas was full
    tokens: int
    stopping_word: str = ""
    elapsed_ms: float = 0.0
    queued_ms: float = 0.0
    prompt_tokens: int = 0  # the code before and after the model saw
    truncated: bool = False  # some of it was cut to fit the context


def choices_of(results: list[TaskResult], fill: Fill) -> list[Choice]:
    """The choices of a request's job results: one per job, or a ranked infill's alternatives."""
    if len(results) == 1 and len(results[0].alternatives) > 1:
        r = results[0]
        return [choice_of(replace(r, text=a["text"], tokens=a["tokens"]), fill) for a in r.alternatives]
    return [choice_of(result, fill) for result in results] or [choice_of(None, fill)] * fill.n


def choice_of(result: TaskResult | None, fill: Fill) -> Choice:
    """A daemon answer cut at the first stop string (None: the empty answer of a zero canvas)."""
    if result is None:
        return Choice("", "length", 0)
    text, tokens = result.text, len(result.tokens)
    finish = "length" if tokens >= fill.canvas else "stop"
    cuts = [(text.find(s), s) for s in fill.stop if s in text]
    word = ""
    if cuts:
        at, word = min(cuts)
        text, finish, covered, tokens = text[:at], "stop", 0, 0
        for piece in result.tokens:  # tokens up to the cut
            if covered >= at:
                break
            covered += len(piece)
            tokens += 1
    ctx = result.context
    return Choice(text, finish, tokens, word, result.elapsed_ms, result.queued_ms,
                  ctx.get("before_tokens", 0) + ctx.get("after_tokens", 0),
                  bool(ctx.get("before_chars_cut") or ctx.get("after_chars_cut")))


@dataclass
class Reply:
    """What every response names besides the answers."""

    model: str
    id: str
    created: float  # time.time()
    n_ctx: int  # the daemon's context limit in tokens


# --- OpenAI /v1/completions ------------------------------------------------------------------------

class OpenAI:
    name = "openai"
    stream_type = "text/event-stream"
    done_event = "[DONE]"

    @staticmethod
    def parse(body: dict) -> Fill:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a string (or an array of one string), got {short(prompt)}", "prompt")
        n = _get(body, "n", "an integer")
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise BadRequest(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
        options = _get(body, "stream_options", "an object") or {}
        before, after = _fim(prompt, _get(body, "suffix", "a string"))
        return Fill(
            before=before, after=after, n=n or 1, stop=_stop(body),
            stream=bool(_get(body, "stream", "a boolean")), tokens_field="max_tokens",
            include_usage=bool(_get(options, "include_usage", "a boolean", "stream_options.")),
            sampling=Sampling(max_new_tokens=_canvas(_get(body, "max_tokens", "an integer")),
                              temperature=_get(body, "temperature", "a number"),
                              top_p=_get(body, "top_p", "a number"), seed=_seed(_get(body, "seed", "an integer"))))

    @staticmethod
    def _choice(i: int, text: str, finish: str | None) -> dict:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def _usage(choices: list[Choice]) -> dict:
        # prompt_tokens: the code the model saw (the prompt template's few tokens not counted)
        done, prompt = sum(c.tokens for c in choices), choices[0].prompt_tokens if choices else 0
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    @classmethod
    def _head(cls, r: Reply) -> dict:
        return {"id": r.id, "object": "text_completion", "created": int(r.created), "model": r.model}

    @classmethod
    def body(cls, fill: Fill, choices: list[Choice], r: Reply) -> dict:
        return {**cls._head(r), "choices": [cls._choice(i, c.text, c.finish) for i, c in enumerate(choices)],
                "usage": cls._usage(choices)}

    @classmethod
    def events(cls, fill: Fill, choices: list[Choice], r: Reply) -> list[dict]:
        """Per choice its text, then its finish reason (OpenAI's last chunk has empty text)."""
        out = []
        for i, c in enumerate(choices):
            out.append({**cls._head(r), "choices": [cls._choice(i, c.text, None)]})
            out.append({**cls._head(r), "choices": [cls._choice(i, "", c.finish)]})
        if fill.include_usage:
            out.append({**cls._head(r), "choices": [], "usage": cls._usage(choices)})
        return out

    @staticmethod
    def error(status: int, message: str, param: str | None) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error"}.get(status, "server_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class OpenAIFim(OpenAI):
    """Continue's `fim/completions` (Mistral's and DeepSeek's FIM API): OpenAI's body, with the
    text also as `delta.content` in stream chunks and as `message.content` in a whole reply."""

    name = "openai-fim"

    @staticmethod
    def _choice(i: int, text: str, finish: str | None) -> dict:
        return {**OpenAI._choice(i, text, finish), "delta": {"content": text},
                "message": {"role": "assistant", "content": text}}


# --- llama.cpp /infill -------------------------------------------------------------------------------

class Llama:
    name = "llama"
    stream_type = "text/event-stream"
    done_event = None  # llama.cpp's own endpoints end a stream with `stop: true`, not [DONE]

    @staticmethod
    def parse(body: dict) -> Fill:
        extra = _get(body, "input_extra", "an array") or []
        if len(extra) > MAX_EXTRA:
            raise BadRequest(f"input_extra has {len(extra)} entries, over the limit of {MAX_EXTRA}", "input_extra")
        chunks = []
        for i, item in enumerate(extra):
            where = f"input_extra[{i}]."
            if not isinstance(item, dict):
                raise BadRequest(f"input_extra[{i}] must be an object {{filename, text}}, got {short(item)}",
                                 f"input_extra[{i}]")
            chunks.append((_get(item, "filename", "a string", where) or "", _get(item, "text", "a string", where) or ""))
        # the code being completed is in the chunks' language, most likely (llama.cpp sends no language)
        languages = [language_of(name) for name, _ in chunks]
        language = max(languages, key=languages.count) if languages else ""
        snippets = "".join(snippet_block(name, text, language, len(text)) for name, text in chunks if text)
        # llama.cpp: input_prefix, then the FIM suffix, then `prompt` right after FIM_MID, so `prompt`
        # continues the prefix (llama.vscode sends the cursor line's text before the cursor there)
        before = snippets + (_get(body, "input_prefix", "a string") or "") + (_get(body, "prompt", "a string") or "")
        deadline = _get(body, "t_max_predict_ms", "an integer")
        return Fill(
            before=before, after=_get(body, "input_suffix", "a string") or "", stop=_stop(body),
            stream=bool(_get(body, "stream", "a boolean")), tokens_field="n_predict",
            deadline_ms=deadline if deadline is not None and deadline > 0 else None,
            sampling=Sampling(max_new_tokens=_canvas(_get(body, "n_predict", "an integer")),
                              temperature=_get(body, "temperature", "a number"), top_p=_get(body, "top_p", "a number"),
                              top_k=_get(body, "top_k", "an integer"), seed=_seed(_get(body, "seed", "an integer"))))

    @staticmethod
    def _final(fill: Fill, c: Choice, r: Reply, content: str) -> dict:
        ms = max(c.elapsed_ms, 1e-3)
        s = fill.sampling
        return {
            "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": r.model,
            "tokens_predicted": c.tokens, "tokens_evaluated": c.prompt_tokens, "tokens_cached": 0,
            "truncated": c.truncated,
            "stop_type": "word" if c.stopping_word else ("limit" if c.finish == "length" else "eos"),
            "stopping_word": c.stopping_word, "has_new_line": "\n" in c.text, "prompt": "",
            "generation_settings": {"n_ctx": r.n_ctx, "n_predict": fill.canvas, "model": r.model,
                                    "temperature": s.temperature if s.temperature is not None else Options.temperature,
                                    "top_k": s.top_k if s.top_k is not None else Options.top_k,
                                    "top_p": s.top_p if s.top_p is not None else 1.0, "stream": fill.stream},
            "timings": {"prompt_n": c.prompt_tokens, "prompt_ms": round(c.queued_ms, 3), "prompt_per_second": 0.0,
                        "predicted_n": c.tokens, "predicted_ms": round(ms, 3),
                        "predicted_per_second": round(c.tokens * 1000 / ms, 3)},
        }

    @classmethod
    def body(cls, fill: Fill, choices: list[Choice], r: Reply) -> dict:
        return cls._final(fill, choices[0], r, choices[0].text)

    @classmethod
    def events(cls, fill: Fill, choices: list[Choice], r: Reply) -> list[dict]:
        c = choices[0]
        first = [{"index": 0, "content": c.text, "tokens": [], "stop": False, "id_slot": 0}] if c.text else []
        return first + [cls._final(fill, c, r, "")]

    @staticmethod
    def error(status: int, message: str, param: str | None) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 503: "unavailable_error"}.get(status, "server_error")
        return {"error": {"code": status, "message": message, "type": kind}}


# --- Ollama /api/generate -----------------------------------------------------------------------------

class Ollama:
    name = "ollama"
    stream_type = "application/x-ndjson"
    done_event = None

    @staticmethod
    def parse(body: dict) -> Fill:
        _get(body, "model", "a string")
        options = _get(body, "options", "an object") or {}
        stream = _get(body, "stream", "a boolean")
        before, after = _fim(_get(body, "prompt", "a string") or "", _get(body, "suffix", "a string"))
        return Fill(
            before=before, after=after,
            stop=_stop(options, where="options."), stream=True if stream is None else stream,
            tokens_field="options.num_predict",
            sampling=Sampling(max_new_tokens=_canvas(_get(options, "num_predict", "an integer", "options.")),
                              temperature=_get(options, "temperature", "a number", "options."),
                              top_p=_get(options, "top_p", "a number", "options."),
                              top_k=_get(options, "top_k", "an integer", "options."),
                              seed=_seed(_get(options, "seed", "an integer", "options."))))

    @staticmethod
    def _head(r: Reply) -> dict:
        at = time.gmtime(r.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", at) + f".{int(r.created % 1 * 1e6):06d}Z"
        return {"model": r.model, "created_at": stamp}

    @classmethod
    def _final(cls, c: Choice, r: Reply, response: str) -> dict:
        ns = 1_000_000
        return {**cls._head(r), "response": response, "done": True, "done_reason": c.finish, "context": [],
                "total_duration": int((c.elapsed_ms + c.queued_ms) * ns), "load_duration": 0,
                "prompt_eval_count": c.prompt_tokens, "prompt_eval_duration": int(c.queued_ms * ns),
                "eval_count": c.tokens, "eval_duration": int(c.elapsed_ms * ns)}

    @classmethod
    def body(cls, fill: Fill, choices: list[Choice], r: Reply) -> dict:
        return cls._final(choices[0], r, choices[0].text)

    @classmethod
    def events(cls, fill: Fill, choices: list[Choice], r: Reply) -> list[dict]:
        c = choices[0]
        first = [{**cls._head(r), "response": c.text, "done": False}] if c.text else []
        return first + [cls._final(c, r, "")]

    @staticmethod
    def error(status: int, message: str, param: str | None) -> dict:
        return {"error": message}

    @staticmethod
    def show(model: str) -> dict:
        """/api/show: a template that mentions .Suffix, which Continue takes as FIM support, and
        the capabilities newer Ollama reports ("insert" is fill-in-the-middle)."""
        return {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}{{ .Suffix }}",
                "details": {"format": "safetensors", "family": "dream"}, "capabilities": ["completion", "insert"],
                "model_info": {"general.basename": model}}

    @staticmethod
    def tags(model: str, created: float) -> dict:
        return {"models": [{"name": model, "model": model, "modified_at": Ollama._head(
            Reply(model, "", created, 0))["created_at"], "size": 0, "digest": "",
            "details": {"format": "safetensors", "family": "dream"}}]}


DIALECTS = {"/v1/completions": OpenAI, "/v1/fim/completions": OpenAIFim, "/infill": Llama,
            "/api/generate": Ollama}


def dialect_of(path: str):
    """The dialect whose error shape a path's errors take (OpenAI's where none is named)."""
    if path.startswith("/api/"):
        return Ollama
    if path in ("/infill", "/health"):
        return Llama
    return DIALECTS.get(path, OpenAI)
