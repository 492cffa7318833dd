"""The language server's settings: the "diffucode" section of the editor's configuration.

Read from initializationOptions.settings, from workspace/configuration, and again on
workspace/didChangeConfiguration. Unknown keys are ignored; a bad value is reported (logged and
shown in status) and its default kept, so one typo never disables completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..daemon.protocol import DEFAULT_TOP_K

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
}


@dataclass
class Settings:
    model: str = ""  # checkpoint dir or hub id for a spawned daemon; "" = the daemon's default
    daemon_socket: str = ""  # "" = the default socket in the runtime dir
    daemon_spawn: bool = True
    max_new_tokens: int = 32
    steps: int | None = None
    temperature: float = 0.0
    top_k: int = DEFAULT_TOP_K  # 0: no top-k
    debounce_min_ms: float = 50.0
    debounce_max_ms: float = 600.0
    before_tokens: int = 1536
    after_tokens: int = 512
    enabled_languages: dict = field(default_factory=lambda: {"*": True})
    request_timeout_ms: float = 10000.0

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


def parse(raw: dict | None) -> tuple[Settings, list[str]]:
    """Settings from a configuration object (defaults for what it omits), and the problems
    found, each naming the key, the value and what was expected."""
    settings = Settings()
    problems = []
    types = {f.name: f.type for f in fields(Settings)}
    for key, value in flatten(raw or {}).items():
        attr = KEYS.get(key)
        if attr is None or value is None and attr != "steps":
            continue
        want = "count" if attr == "top_k" else types[attr]
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
            "int | None": value is None or isinstance(value, int) and not isinstance(value, bool) and value > 0,
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
            "count": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "dict": isinstance(value, dict),
        }[want]
        if not ok:
            expected = "non-negative int" if want == "count" else want.replace("int", "positive int")
            problems.append(f"setting diffucode.{key} = {value!r} is not a valid {expected}")
            continue
        setattr(settings, attr, float(value) if want == "float" else value)
    if settings.debounce_min_ms > settings.debounce_max_ms:
        problems.append(f"setting diffucode.debounce.minMs = {settings.debounce_min_ms} exceeds "
                        f"debounce.maxMs = {settings.debounce_max_ms}; using maxMs for both")
        settings.debounce_min_ms = settings.debounce_max_ms
    return settings, problems
