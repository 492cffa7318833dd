"""The language server's settings: the "diffucode" section of the editor's configuration.

Read from initializationOptions.settings, from workspace/configuration, and again on
workspace/didChangeConfiguration. Unknown keys are ignored; a bad value is reported (logged and
shown in status) and its default kept, so one typo never disables completion. The minimums
are extension/package.json's, so what its settings UI allows is accepted here (a count must still
be a whole number).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# setting key (as the editor spells it) -> attribute
KEYS = {
    "model": "model",
    "daemon.socket": "daemon_socket",
    "daemon.spawn": "daemon_spawn",
    "maxNewTokens": "max_new_tokens",
    "steps": "steps",
    "temperature": "temperature",
    "topK": "top_k",
    "debounce.minMs": "debounce_min_ms",
    "debounce.maxMs": "debounce_max_ms",
    "context.beforeTokens": "before_tokens",
    "context.afterTokens": "after_tokens",
    "enabledLanguages": "enabled_languages",
    "requestTimeoutMs": "request_timeout_ms",
    "completion.minConfidence": "min_confidence",
}


@dataclass
class Settings:
    model: str = ""  # checkpoint dir or hub id for a spawned daemon; "" = the daemon's default
    daemon_socket: str = ""  # "" = the default socket in the runtime dir
    daemon_spawn: bool = True
    max_new_tokens: int = 32
    # sampling: None (null) leaves it to the daemon, whose defaults are the engine's
    # (daemon/engine/options.py); the editor restates none of them
    steps: int | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0: no top-k
    debounce_min_ms: float = 50.0
    debounce_max_ms: float = 150.0  # benchmarks/keystroke_latency.mjs: 600 cost ~250 ms a keystroke
    before_tokens: int = 1536
    after_tokens: int = 512
    enabled_languages: dict = field(default_factory=lambda: {"*": True})
    request_timeout_ms: float = 10000.0
    # a suggestion is cut before its first token less confident than this (0: no cut); measured
    # on the bundled model by benchmarks/confidence_cut.py (README, "Post-processing")
    min_confidence: float = 0.1

    def language_enabled(self, language_id: str) -> bool:
        langs = self.enabled_languages
        return bool(langs.get(language_id, langs.get("*", True)))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"daemon": {"socket": x}} -> {"daemon.socket": x}; dotted keys pass through."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "enabledLanguages":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# What each numeric setting accepts: (kind, minimum), the minimums being extension/package.json's
# (tests/test_lsp_parts.py holds the two together). "int?", "number?": also null (null, the
# default: the daemon decides).
NUMBERS = {
    "max_new_tokens": ("int", 1),
    "steps": ("int?", 1),
    "temperature": ("number?", 0),
    "top_k": ("int?", 0),  # 0: no top-k
    "debounce_min_ms": ("number", 0),
    "debounce_max_ms": ("number", 0),
    "before_tokens": ("int", 0),  # 0: no text before the cursor (only snippets)
    "after_tokens": ("int", 0),  # 0: no text after the cursor
    "request_timeout_ms": ("number", 1),
    "min_confidence": ("number", 0),  # 0: no cut
}
KINDS = {"int": "an integer", "number": "a number"}
OTHER_KINDS = {"str": (str, "a string"), "bool": (bool, "a boolean"), "dict": (dict, "an object")}


def expected(attr: str, value) -> str | None:
    """None when `value` suits the setting, else what it should have been ("an integer >= 1")."""
    if attr not in NUMBERS:
        kind, words = OTHER_KINDS[{f.name: f.type for f in fields(Settings)}[attr]]
        return None if isinstance(value, kind) else words
    kind, minimum = NUMBERS[attr]
    if value is None and kind.endswith("?"):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (kind.startswith("number") or isinstance(value, int)) and value >= minimum
    return None if ok else f"{KINDS[kind.rstrip('?')]} >= {minimum}" + (" or null" if kind.endswith("?") else "")


def parse(raw: dict | None) -> tuple[Settings, list[str]]:
    """Settings from a configuration object (defaults for what it omits), and the problems
    found, each naming the key, the value and what was expected."""
    settings = Settings()
    problems = []
    for key, value in flatten(raw or {}).items():
        attr = KEYS.get(key)
        if attr is None or value is None and not NUMBERS.get(attr, ("",))[0].endswith("?"):
            continue
        wanted = expected(attr, value)
        if wanted is not None:
            problems.append(f"setting diffucode.{key} = {value!r} is not {wanted}")
            continue
        is_float = attr in NUMBERS and NUMBERS[attr][0].startswith("number") and value is not None
        setattr(settings, attr, float(value) if is_float else value)
    if settings.debounce_min_ms > settings.debounce_max_ms:
        problems.append(f"setting diffucode.debounce.minMs = {settings.debounce_min_ms} exceeds "
                        f"debounce.maxMs = {settings.debounce_max_ms}; using maxMs for both")
        settings.debounce_min_ms = settings.debounce_max_ms
    return settings, problems
