"""Models that ship with diffucode.

`tiny-stdlib`: a 6.5 M-parameter Dream network trained by training/train.py on the Python
standard library (see its training.json), so that every command works right after install,
without a download or a GPU. It is small: expect plausible Python, not DiffuCoder-7B.
"""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "tiny-stdlib"


def default_model() -> Path:
    """The checkpoint used when no --model is given."""
    return BUNDLED
