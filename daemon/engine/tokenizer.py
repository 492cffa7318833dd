"""Byte-level BPE tokenizer of DiffuCoder/Dream checkpoints, loaded with `tokenizers` only.

The checkpoints' tokenizer_config.json names a custom `DreamTokenizer` that transformers would
import from the checkpoint as remote code. That class is a plain Qwen2 byte-level BPE, so this
module rebuilds what transformers' Qwen2 tokenizer builds from vocab.json + merges.txt (or loads
tokenizer.json where a directory has one) and adds the special tokens at their exact ids. No
remote code is run and transformers is not needed at run time.

It knows nothing of models: it maps text to ids and back, and can train a small tokenizer in
the same file layout for tests and tiny checkpoints.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from ..errors import CheckpointError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"]

# transformers/models/qwen2/tokenization_qwen2.py: PRETOKENIZE_REGEX
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """Text <-> token ids for one checkpoint directory. Safe to share between threads."""

    def __init__(self, backend: _Backend):
        self._backend = backend
        self._lock = threading.Lock()  # guards the encode_special_tokens switch

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json if present, else vocab.json + merges.txt, then the added tokens
        of added_tokens.json and tokenizer_config.json at their ids. Raises CheckpointError."""
        path = Path(path)
        files = {name: path / name for name in ("tokenizer.json", "vocab.json", "merges.txt")}
        if files["tokenizer.json"].is_file():
            try:
                backend = _Backend.from_file(str(files["tokenizer.json"]))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise CheckpointError(f"{files['tokenizer.json']}: cannot be loaded: {e}") from e
        elif files["vocab.json"].is_file() and files["merges.txt"].is_file():
            backend = _qwen2_backend(_read_vocab(files["vocab.json"]), _read_merges(files["merges.txt"]),
                                     source=files["merges.txt"])
        else:
            missing = ", ".join(name for name, f in files.items() if not f.is_file())
            raise CheckpointError(f"{path}: no tokenizer: need tokenizer.json, or vocab.json and "
                                  f"merges.txt (missing: {missing})")
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file, dict) if config_file.is_file() else {}
        _add_tokens(backend, _added_tokens(path, config))
        # (a checkpoint's chat_template is not read: tasks.py lays out ChatML prompts itself)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        """Ids of user text. Special-token strings in it are encoded as plain text."""
        return self._encode(text, specials_as_text=True)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of a prompt template: special-token strings in it become their ids."""
        return self._encode(text, specials_as_text=False)

    def _encode(self, text: str, specials_as_text: bool) -> list[int]:
        with self._lock:
            self._backend.encode_special_tokens = specials_as_text
            return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids; special tokens are written out unless skip_special."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, content: str) -> int | None:
        """Id of one token string such as "<|mask|>", or None if it is not a single token."""
        return self._backend.token_to_id(content)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _Backend:
        """The underlying tokenizers.Tokenizer (do not change its encode_special_tokens)."""
        return self._backend


def _qwen2_backend(vocab: dict[str, int], merges: list[tuple[str, str]], source: Path | None = None) -> _Backend:
    """What transformers' Qwen2 tokenizer builds from vocab + merges, without its added tokens."""
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                    byte_fallback=False)
    except Exception as e:  # e.g. a merge of tokens missing from the vocab
        raise CheckpointError(f"{source}: does not fit vocab.json: {e}") from e
    backend = _Backend(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _read_json(file: Path, kind: type) -> Any:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON: {e}") from e
    if not isinstance(data, kind):
        raise CheckpointError(f"{file}: expected a JSON {kind.__name__}, found {type(data).__name__}")
    return data


def _read_vocab(file: Path) -> dict[str, int]:
    vocab = _read_json(file, dict)
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise CheckpointError(f"{file}: the id of {bad!r} is {vocab[bad]!r}, not an integer")
    return vocab


def _read_merges(file: Path) -> list[tuple[str, str]]:
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read: {e}") from e
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{file}:{number}: expected two tokens separated by a space, found {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _added_tokens(path: Path, config: dict) -> dict[int, tuple[str, Path]]:
    """id -> (content, file that names it), from added_tokens.json and added_tokens_decoder."""
    found: dict[int, tuple[str, Path]] = {}
    named: list[tuple[Path, int, Any]] = []
    added_file = path / "added_tokens.json"
    if added_file.is_file():
        named += [(added_file, i, c) for c, i in _read_json(added_file, dict).items()]
    config_file = path / "tokenizer_config.json"
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        named.append((config_file, int(key) if str(key).isdigit() else key, content))
    for file, token_id, content in named:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not isinstance(content, str):
            raise CheckpointError(f"{file}: bad added token {content!r} with id {token_id!r}")
        if token_id in found and found[token_id][0] != content:
            raise CheckpointError(f"{file}: id {token_id} is {content!r} here but "
                                  f"{found[token_id][0]!r} in {found[token_id][1]}")
        found.setdefault(token_id, (content, file))
    return found


def _add_tokens(backend: _Backend, added: dict[int, tuple[str, Path]]) -> None:
    """Add each token as special, in id order, and check it lands at its id."""
    for token_id in sorted(added):
        content, file = added[token_id]
        size = backend.get_vocab_size(with_added_tokens=True)
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        landed = backend.token_to_id(content)
        if landed != token_id:
            raise CheckpointError(f"{file}: added token {content!r} should have id {token_id} but got "
                                  f"id {landed} (the vocabulary had {size} ids before it)")


def train_byte_level_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                         special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on texts and write it in the real checkpoints' layout
    (vocab.json, merges.txt, added_tokens.json, tokenizer_config.json, special_tokens_map.json;
    no tokenizer.json). vocab_size counts the special tokens, which get the last ids in order.
    Returns the tokenizer loaded back from out_dir. The same inputs give the same files."""
    special_tokens = list(special_tokens)
    base_size = vocab_size - len(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if base_size < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the {len(alphabet)} byte tokens "
                         f"and {len(special_tokens)} special tokens")
    backend = _qwen2_backend({}, [])
    # Specials are added after training, never passed to the trainer: they must not take base ids.
    trainer = trainers.BpeTrainer(vocab_size=base_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=sorted(alphabet), special_tokens=[])
    backend.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    learned = [s for s in special_tokens if s in vocab]
    if learned:
        raise ValueError(f"special tokens {learned} were learned as BPE tokens")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(vocab)
    added = {s: n + i for i, s in enumerate(special_tokens)}
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for s, i in added.items()}
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": special_tokens,
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "DreamTokenizer",
        "unk_token": None,
    }
    names = {}
    if "<|endoftext|>" in added:
        names.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if "<|beginoftext|>" in added:  # as the real Dream tokenizer_config names it
        names["bos_token"] = "<|beginoftext|>"
    if "<|mask|>" in added:
        names["mask_token"] = "<|mask|>"
    config.update(names)
    if "<|im_start|>" in added and "<|im_end|>" in added:
        config["chat_template"] = CHATML_TEMPLATE

    def write_json(name: str, data: Any) -> None:
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_json("vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    write_json("added_tokens.json", added)
    write_json("tokenizer_config.json", dict(sorted(config.items())))
    write_json("special_tokens_map.json", {"additional_special_tokens": special_tokens, **names})
    return Tokenizer.from_dir(out)
