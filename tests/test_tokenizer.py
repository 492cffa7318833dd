"""The checkpoint tokenizer: training in the real file layout, loading, and parity with transformers."""

import inspect
import json
import shutil
import textwrap

import pytest

from diffucode.daemon.errors import CheckpointError
from diffucode.daemon.engine.tokenizer import SPECIAL_TOKENS, Tokenizer, train_byte_level_bpe

CORPUS_EXTRA = '''\
def grüße(name: str) -> str:
    """Say hello — in German."""
    return f"Grüß dich, {name}! 👋"

CONSTANTS = {"pi": 3.14159, "e": 2.71828, "π": "pi"}
it's = "we're", "they'll", "I'd"
labels = [f'LLama {n}', f'Stop {n}', b'VEry', r'Data', f'LLama', f'Stop', f'LLama', f'Stop']
'''

SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "if x:\r\n\treturn y\r\n",  # CRLF and tabs
    "s = 'héllo wörld'  # ünïcödé, 日本語, Ελληνικά\n",
    "emoji = \"🙂👩‍💻🎉\"\n",
    "    \n\n\n   trailing spaces   \t\n",
    "x=1234567890;y=x**2//3 if x>=0 else -x\n",
    "It's what they'll DO, and I'D say WE'RE done; f'LLama', b'Stop', r'VEry'\n",
    "class A(B, metaclass=M):\n    pass\n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok = train_byte_level_bpe([inspect.getsource(textwrap), CORPUS_EXTRA], out, vocab_size=600)
    return out, tok


def test_writes_the_real_checkpoint_layout(trained):
    out, tok = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "added_tokens.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert not set(SPECIAL_TOKENS) & set(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert (out / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    added = json.loads((out / "added_tokens.json").read_text())
    assert added == {s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == [len(vocab) + i for i in range(len(SPECIAL_TOKENS))]
    assert tok.vocab_size == len(vocab) + len(SPECIAL_TOKENS) == 600
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "DreamTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    assert config["mask_token"] == "<|mask|>" and config["eos_token"] == "<|endoftext|>"
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        i: s for s, i in added.items()}
    assert "<|im_start|>" in config["chat_template"]  # for other tools; tasks.py lays out ChatML itself


def test_training_is_deterministic(trained, tmp_path):
    out, _ = trained
    train_byte_level_bpe([inspect.getsource(textwrap), CORPUS_EXTRA], tmp_path, vocab_size=600)
    for f in out.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_round_trip(trained):
    _, tok = trained
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("def f():") != [], "merges are used"
    assert len(tok.encode("    return")) < len("    return")


def test_special_strings_in_user_text_stay_text(trained):
    _, tok = trained
    eot = tok.token_id("<|endoftext|>")
    text = "x = '<|endoftext|>'  # <|mask|>"
    ids = tok.encode(text)
    assert eot not in ids and tok.token_id("<|mask|>") not in ids
    assert tok.decode(ids) == text
    with_special = tok.encode_with_special(text)
    assert with_special.count(eot) == 1 and tok.token_id("<|mask|>") in with_special
    assert tok.decode(with_special) == text
    assert tok.decode(with_special, skip_special=True) == "x = ''  # "
    assert tok.encode_with_special("<|im_start|>") == [tok.token_id("<|im_start|>")]
    assert tok.token_id("no such token") is None


def test_tokenizer_json_is_loaded_when_present(trained, tmp_path):
    _, tok = trained
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab_size == tok.vocab_size
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
        assert again.encode_with_special(text) == tok.encode_with_special(text)


def test_added_tokens_from_config_alone(trained, tmp_path):
    out, tok = trained
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(out / f, tmp_path / f)
    again = Tokenizer.from_dir(tmp_path)
    assert [again.token_id(s) for s in SPECIAL_TOKENS] == [tok.token_id(s) for s in SPECIAL_TOKENS]


def test_matches_transformers_qwen2(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, tok = trained
    # The concrete class, never AutoTokenizer: the config's auto_map points at remote code.
    # (In transformers 5, Qwen2TokenizerFast(vocab_file=..., merges_file=...) silently builds a
    # one-token vocabulary; from_pretrained is what reads the files, in 4.x and 5.x alike.)
    hf = transformers.Qwen2TokenizerFast.from_pretrained(str(out))
    hf_split = transformers.Qwen2TokenizerFast.from_pretrained(str(out), split_special_tokens=True)
    assert len(hf) == tok.vocab_size
    assert [hf.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [tok.token_id(s) for s in SPECIAL_TOKENS]
    texts = SAMPLES + [CORPUS_EXTRA, inspect.getsource(json), "cafe\u0301 <|endoftext|>x"]  # NFD input
    # The pipeline itself, piece by piece: merges alone could hide a pre-tokenizer difference.
    theirs = hf.backend_tokenizer
    for text in texts + ["x=1234567890; f'LLama' I'D've 's\r\n\r\n  \t\n y"]:
        normal = theirs.normalizer.normalize_str(text)
        assert tok.backend.normalizer.normalize_str(text) == normal
        assert tok.backend.pre_tokenizer.pre_tokenize_str(normal) == theirs.pre_tokenizer.pre_tokenize_str(normal)
    for text in texts:
        assert tok.encode_with_special(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text) == hf_split.encode(text, add_special_tokens=False), text
        ids = tok.encode_with_special(text)
        assert tok.decode(ids) == hf.decode(ids)
    # And what transformers writes as tokenizer.json loads to the same ids.
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    saved = Tokenizer.from_dir(tmp_path)
    for text in texts:
        assert saved.encode_with_special(text) == tok.encode_with_special(text)
        assert saved.encode(text) == tok.encode(text)


def test_missing_files_are_named(trained, tmp_path):
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_dir(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and all(f in msg for f in ("tokenizer.json", "vocab.json", "merges.txt"))

    out, _ = trained
    shutil.copy(out / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt") as err:
        Tokenizer.from_dir(tmp_path)
    assert "vocab.json" not in str(err.value).split("missing:")[1]


def test_corrupt_files_are_named(trained, tmp_path):
    out, _ = trained
    for f in out.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "added_tokens.json").write_text('{"<|endoftext|>": 5')
    with pytest.raises(CheckpointError, match="added_tokens.json"):
        Tokenizer.from_dir(tmp_path)

    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_added_token_ids_must_line_up(trained, tmp_path):
    out, tok = trained
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(out / f, tmp_path / f)
    first = tok.token_id("<|endoftext|>")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": first + 3}))
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_dir(tmp_path)
    msg = str(err.value)
    assert "added_tokens.json" in msg and "<|endoftext|>" in msg
    assert str(first + 3) in msg and str(first) in msg
