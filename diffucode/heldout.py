"""Which code the bundled model never trained on: the split rules shared by the training data
(training/data.py) and the quality measurements (diffucode.quality, `diffucode bench`).

A package's files all go to training or all to the held-out set, one package in ten by a hash of
its name; standard-library files one in ten by a hash of their path. The standard library needs
no download, so `diffucode bench` can always draw held-out cases from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("DIFFUCODE_DATA", Path.home() / ".cache" / "diffucode" / "training-data"))
STDLIB_SKIP = {"site-packages", "__pycache__", "idlelib", "lib2to3"}
HELD_OUT_EVERY = 10  # one package in ten (by hash of its name), one stdlib file in ten (by path)


@dataclass
class Doc:
    source: str  # "stdlib" or the package's name
    path: str  # inside the source
    text: str


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELD_OUT_EVERY


def package_held_out(name: str) -> bool:
    return _bucket("package:" + name.lower()) == 0


def stdlib_file_held_out(rel: str) -> bool:
    """The split the first bundled model used (a hash of the path relative to the stdlib)."""
    return _bucket(rel) == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_docs() -> list[tuple[bool, Doc]]:
    """(held out?, Doc) for every UTF-8 .py file of this interpreter's standard library."""
    root = stdlib_root()
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if STDLIB_SKIP & set(rel.parts):
            continue
        text = decode(f.read_bytes())
        if text is not None:
            out.append((stdlib_file_held_out(str(rel)), Doc("stdlib", str(rel), text)))
    return out


def read_split(corpus: Path, split: str) -> list[Doc]:
    """The docs of a built corpus' split (train or held_out; training/data.py writes them)."""
    path = corpus / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build the corpus first (python training/data.py build "
                                f"--out {corpus})")
    return [Doc(**json.loads(line)) for line in path.read_text().splitlines()]
