"""training/train.py: the infill examples and the masked-diffusion loss the bundled model learns from."""

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))

from train import Batches, diffusion_loss  # noqa: E402

from diffucode.daemon.checkpoint import load_checkpoint  # noqa: E402

EOS, NEWLINE = 0, 10


def docs(n=6, length=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append([NEWLINE if rng.random() < 0.1 else rng.randrange(20, 100) for _ in range(length)])
    return out


def test_plain_windows_are_open_to_masking_everywhere():
    b = Batches(docs(), 64, EOS, {NEWLINE}, 0.0, random.Random(1))
    for _ in range(20):
        w, region = b.window()
        assert len(w) == len(region) == 64 and all(region)


def test_end_token_runs_follow_a_line_break(tmp_path):
    b = Batches(docs(length=1000), 128, EOS, {NEWLINE}, 0.0, random.Random(3), pad_prob=1.0)
    for _ in range(50):
        w, region = b.window()
        assert all(region) and EOS in w
        at = w.index(EOS)
        assert w[at - 1] == NEWLINE


def test_infill_examples_are_a_middle_then_end_tokens_and_only_that_is_masked():
    source = docs(length=1000)
    b = Batches(source, 128, EOS, {NEWLINE}, 1.0, random.Random(2))
    padded = 0
    for _ in range(200):
        w, region = b.window()
        assert len(w) == len(region) == 128
        lo = region.index(True)
        hi = region.index(False, lo) if False in region[lo:] else 128
        assert lo >= 1, "position 0 is never in the canvas"
        tail = w[hi:]  # after the canvas: the document, then end tokens if the document ended
        if EOS in tail:
            assert all(t == EOS for t in tail[tail.index(EOS):]) and all(region[hi + tail.index(EOS):])
            tail = tail[:tail.index(EOS)]
        assert not any(region[hi:hi + len(tail)]), "after the canvas, the document's text is never masked"
        assert EOS not in w[:lo], "end tokens only inside the canvas"
        tokens = w[lo:hi]
        k = tokens.index(EOS) if EOS in tokens else len(tokens)
        assert all(t == EOS for t in tokens[k:]), "the end tokens come after the middle"
        padded += k < len(tokens)
        text = w[:lo] + tokens[:k] + tail  # the document's text, with the middle back in place
        assert any(_contains(d, text) for d in source)
    assert padded > 100


def _contains(doc, piece):
    return any(doc[i:i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))


def test_loss_masks_only_the_region(tiny_dir):
    net = load_checkpoint(tiny_dir, device="cpu").network.float()
    x0 = torch.randint(5, 100, (2, 24))
    seen = []
    original = net.forward

    def forward(xt, *args, **kwargs):
        seen.append(xt.clone())
        return original(xt, *args, **kwargs)

    net.forward = forward
    mask_id = net.config.mask_token_id
    region = torch.zeros(2, 24, dtype=torch.bool)
    region[:, 8:16] = True
    loss = diffusion_loss(net, x0, region, mask_id, 0.999, torch.Generator().manual_seed(0))
    masked = seen[0] == mask_id
    assert masked[:, 8:16].all() and not masked[:, :8].any() and not masked[:, 16:].any()
    assert torch.isfinite(loss) and loss > 0
    # no region, no loss: nothing is masked
    assert diffusion_loss(net, x0, torch.zeros_like(region), mask_id, 0.999, torch.Generator()) == 0
