"""training/: the data manifest and corpus, the infill layout, the loss, and runs that resume exactly."""

import hashlib
import io
import json
import math
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))

import data
from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.engine.tokenizer import train_byte_level_bpe
from objective import autoregressive_loss, held_out_loss, unigram_logprobs
from train import Windows, diffusion_loss, lr_at

CODE = '''import os


def walk(top, depth=0):
    """Yield the files under top."""
    for name in sorted(os.listdir(top)):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path, depth + 1)
        else:
            yield path


class Counter:
    def __init__(self):
        self.total = 0

    def add(self, n=1):
        self.total += n
        return self.total
'''


# --- data.py ------------------------------------------------------------------------------------

def _sdist(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"pkg-1.0/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _manifest(tmp_path, packages: dict[str, bytes]) -> Path:
    entries = []
    for name, blob in packages.items():
        f = tmp_path / "pypi" / f"{name}-1.0.tar.gz"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(blob)
        entries.append({"name": name, "version": "1.0", "filename": f.name, "url": f.as_uri(),
                        "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob), "licence": "MIT"})
    path = tmp_path / "packages.json"
    path.write_text(json.dumps({"stdlib": {"python": "3.11.7", "licence": "PSF-2.0"}, "packages": entries}))
    return path


def _held_and_trained_names(n=40):
    names = [f"pkg{i}" for i in range(n)]
    return [x for x in names if data.package_held_out(x)], [x for x in names if not data.package_held_out(x)]


def test_build_splits_by_package_checks_sha256_and_drops_what_it_should(tmp_path):
    held, trained = _held_and_trained_names()
    a, b = trained[:2]
    h = held[0]
    shared = "def shared():\n    return 1\n"
    packages = {
        a: _sdist({"a/core.py": CODE, "a/_vendor/six.py": "x = 1\n", "a/data.py": "X = [" + "1, " * 600 + "]\n",
                   "a/shared.py": shared, "a/notes.txt": "not python"}),
        b: _sdist({"b/util.py": CODE.replace("walk", "stroll"), "b/copy.py": shared.replace(":\n", ":   \n")}),
        h: _sdist({"h/mod.py": "def held():\n    return 2\n", "h/shared.py": shared}),
    }
    manifest = _manifest(tmp_path, packages)
    summary = data.build(tmp_path / "cache", tmp_path / "corpus", manifest, stdlib=False)
    train = {(d.source, d.path) for d in data.read_split(tmp_path / "corpus", "train")}
    held_out = {(d.source, d.path) for d in data.read_split(tmp_path / "corpus", "held_out")}
    assert train == {(a, "a/core.py"), (b, "b/util.py")}, "vendored, data-like and duplicate files left out"
    assert held_out == {(h, "h/mod.py"), (h, "h/shared.py")}, "a duplicate stays only in the held-out set"
    assert summary["skipped"]["vendored"] == 1 and summary["skipped"]["data-like"] == 1
    assert summary["skipped"]["duplicate"] == 2
    assert summary["licences"][a].startswith("MIT")
    # the same manifest builds the same corpus
    again = data.build(tmp_path / "cache", tmp_path / "corpus2", manifest, stdlib=False)
    assert again["splits"] == summary["splits"]
    # an archive that is not the pinned one is refused, by name
    (tmp_path / "cache" / "archives" / f"{a}-1.0.tar.gz").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="is not the pinned"):
        data.build(tmp_path / "cache", tmp_path / "corpus3", manifest, stdlib=False)


def test_manifest_pins_every_package_with_a_permissive_licence():
    m = data.manifest()
    permissive = ("MIT", "BSD", "Apache", "PSF", "Python Software Foundation")
    assert len(m["packages"]) >= 20
    for e in m["packages"]:
        assert len(e["sha256"]) == 64 and e["url"].startswith("https://files.pythonhosted.org/")
        assert e["filename"] in e["url"] and e["version"] in e["filename"]
        assert any(p in e["licence"] for p in permissive), e
        assert "GPL" not in e["licence"]
    held = [e["name"] for e in m["packages"] if data.package_held_out(e["name"])]
    assert 0 < len(held) < len(m["packages"]) / 3


# --- windows and the loss -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    from train import SPECIALS

    return train_byte_level_bpe([CODE * 3], out, vocab_size=400, special_tokens=SPECIALS)


def _stream(tok, n_files=30):
    eos = tok.token_id("<|endoftext|>")
    ids = []
    for i in range(n_files):
        ids += tok.encode(CODE.replace("total", f"total{i}")) + [eos]
    import numpy as np

    return np.asarray(ids, dtype=np.int32)


def test_infill_examples_are_laid_out_as_the_infill_task_lays_out_a_request(tok):
    eos = tok.token_id("<|endoftext|>")
    w = Windows(_stream(tok), 256, 0, tok, eos, infill_prob=1.0)
    kinds = {"whole lines": 0, "rest of a line": 0, "several lines": 0}
    for k in range(200):
        ids, region = w.window(k)
        assert len(ids) == len(region) == 256
        if all(region):
            continue  # no room for a middle: a plain window
        lo = region.index(True)
        hi = lo + region[lo:].index(False) if False in region[lo:] else 256
        canvas = ids[lo:hi]
        n = canvas.index(eos) if eos in canvas else len(canvas)
        assert all(t == eos for t in canvas[n:]), "the middle, then only end tokens"
        assert hi - lo in (8, 16, 24, 32, 48, 64, 96, 128), "a canvas of a request's size"
        middle = tok.decode(canvas[:n])
        # the window's file, with the middle back in place, is the original code
        start = max((i + 1 for i in range(lo) if ids[i] == eos), default=0)
        end = next((i for i in range(hi, 256) if ids[i] == eos), 256)
        text = tok.decode(ids[start:lo]) + middle + tok.decode(ids[hi:end])
        assert any(text in CODE.replace("total", f"total{i}") for i in range(30))
        assert tok.encode(middle) == canvas[:n], "the middle is tokenized on its own, as at inference"
        if middle.endswith("\n"):
            kinds["several lines" if middle.count("\n") > 1 else "whole lines"] += 1
        else:
            kinds["rest of a line"] += 1
            assert tok.decode(ids[hi:hi + 1]).startswith("\n"), "the line's newline stays in the code after"
    assert all(v >= 10 for v in kinds.values()), kinds


def test_windows_are_a_pure_function_of_seed_and_index(tok):
    eos = tok.token_id("<|endoftext|>")
    a = Windows(_stream(tok), 128, 3, tok, eos, infill_prob=0.5)
    b = Windows(_stream(tok), 128, 3, tok, eos, infill_prob=0.5)
    order = list(range(40))
    random.Random(0).shuffle(order)
    assert {k: a.window(k) for k in range(40)} == {k: b.window(k) for k in order}
    # one epoch visits every slot once; the next one in another order
    base = a.stream.__array_interface__["data"][0]
    starts = [(a.slot(k).__array_interface__["data"][0] - base) // 4 for k in range(2 * a.slots)]
    assert sorted(starts[:a.slots]) == sorted(starts[a.slots:]) == [i * 128 for i in range(a.slots)]
    assert starts[:a.slots] != starts[a.slots:]


def test_loss_masks_only_the_region_and_predicts_only_masked_positions(tiny_dir):
    net = load_checkpoint(tiny_dir, device="cpu").network.float()
    x0 = torch.randint(5, 100, (2, 24))
    seen = []
    original = net.forward

    def forward(xt, *args, **kwargs):
        seen.append((xt.clone(), kwargs.get("predict_positions")))
        return original(xt, *args, **kwargs)

    net.forward = forward
    mask_id = net.config.mask_token_id
    region = torch.zeros(2, 24, dtype=torch.bool)
    region[:, 8:16] = True
    t = torch.full((2, 1), 0.999)
    loss = diffusion_loss(net, x0, region, mask_id, 0.999, torch.Generator().manual_seed(0), t=t)
    xt, positions = seen[0]
    masked = xt == mask_id
    assert masked[:, 8:16].all() and not masked[:, :8].any() and not masked[:, 16:].any()
    assert positions.shape == (2, 8) and sorted(positions[0].tolist()) == list(range(8, 16))
    # the same value as the full-logits formulation
    logits = original(xt).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    torch.testing.assert_close(loss, ((ce * masked / t).sum(1) / 8).mean(), rtol=1e-4, atol=1e-4)
    assert diffusion_loss(net, x0, torch.zeros_like(region), mask_id, 0.999, torch.Generator()) == 0


def test_the_autoregressive_warm_start_predicts_each_token_from_the_ones_before_it_only(tiny_dir):
    net = load_checkpoint(tiny_dir, device="cpu").network.float()
    x0 = torch.randint(5, 100, (2, 7))

    def from_prefix(x, p):  # position p read from the hidden state at p - 1 of a pass that lacks x[p:]
        causal = torch.ones(p, p, dtype=torch.bool).tril()[None, None].expand(2, 1, p, p)
        logits = net(x[:, :p], attention_mask=causal, predict_positions=torch.full((2, 1), p)).logits[:, 0]
        return torch.nn.functional.cross_entropy(logits, x[:, p], reduction="none")

    with torch.no_grad():
        expected = torch.stack([from_prefix(x0, p) for p in range(1, 7)]).mean()
        changed = x0.clone()
        changed[:, 3:] = 4  # what comes after position 2 changes nothing of the first two terms
        assert torch.allclose(from_prefix(changed, 1), from_prefix(x0, 1))
        assert torch.allclose(from_prefix(changed, 2), from_prefix(x0, 2))
        expected_changed = torch.stack([from_prefix(changed, p) for p in range(1, 7)]).mean()
    torch.testing.assert_close(autoregressive_loss(net, x0).detach(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(autoregressive_loss(net, changed).detach(), expected_changed, rtol=1e-4, atol=1e-4)


def test_held_out_loss_reports_the_unigram_baseline_and_the_models_gain_over_it(tiny_dir):
    net = load_checkpoint(tiny_dir, device="cpu").network.float()
    V = net.config.vocab_size
    with torch.no_grad():
        net.lm_head.weight.zero_()  # uniform logits: log V nats on every token, context or not
    stream = [5] * 1000 + [7] * 1000
    unigram = unigram_logprobs(stream, V)
    assert unigram.shape == (V,) and abs(float(unigram.exp().sum()) - 1) < 1e-5
    windows = [[5, 7] * 12, [7] * 24]
    h = held_out_loss(net, windows, net.config.mask_token_id, torch.ones(V), "cpu", unigram=unigram)
    expected_unigram = -math.log(1001 / (2000 + V))  # add-one smoothed, both tokens alike
    assert h["nats_per_token"] == pytest.approx(math.log(V), abs=1e-3)
    assert h["unigram_nats_per_token"] == pytest.approx(expected_unigram, abs=1e-3)
    assert h["context_gain"] == pytest.approx(expected_unigram - math.log(V), abs=1e-3)  # worse than unigram
    assert "context_gain" not in held_out_loss(net, windows, net.config.mask_token_id, torch.ones(V), "cpu")


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = {"lr": 1e-3, "warmup": 10, "total_steps": 100}
    assert lr_at(5, cfg) == pytest.approx(5e-4, rel=0.01)
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=0.03) and lr_at(50, cfg) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(200, cfg) == pytest.approx(1e-4)


# --- runs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus in the layout data.py writes, from a few standard-library files."""
    import inspect
    import json as json_mod
    import textwrap

    out = tmp_path_factory.mktemp("corpus")
    docs = {"train": [inspect.getsource(m) for m in (json_mod.decoder, json_mod.encoder, textwrap)],
            "held_out": [inspect.getsource(json_mod.scanner)]}
    summary = {"manifest_sha256": "0" * 64, "python": "3", "skipped": {}, "licences": {"stdlib": "PSF-2.0"},
               "splits": {}}
    for split, texts in docs.items():
        lines = [json.dumps({"source": "stdlib", "path": f"{split}{i}.py", "text": t}) for i, t in enumerate(texts)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        summary["splits"][split] = {"files": len(texts), "bytes": 0,
                                    "sha256": hashlib.sha256("".join(lines).encode()).hexdigest(), "sources": {}}
    (out / "corpus.json").write_text(json.dumps(summary))
    return out


def _train(run, corpus, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--run", str(run), "--corpus", str(corpus),
           "--vocab", "512", "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
           "--intermediate", "64", "--seq-len", "128", "--batch", "2", "--total-steps", "6", "--warmup", "2",
           "--eval-windows", "2", "--eval-every", "0", "--tokenizer-bytes", "100000", "--threads", "1", *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_stopped_run_continues_exactly_where_it_stopped(tmp_path, corpus):
    _train(tmp_path / "straight", corpus)
    _train(tmp_path / "halves", corpus, "--until-step", "3")
    progress = json.loads((tmp_path / "halves" / "state" / "progress.json").read_text())
    assert progress == {"step": 3, "windows_seen": 6, "tokens_seen": 768}
    _train(tmp_path / "halves", corpus)  # continue: the settings come from the run folder
    a = load_file(tmp_path / "straight" / "state" / "model.safetensors")
    b = load_file(tmp_path / "halves" / "state" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rec = json.loads((tmp_path / "halves" / "training.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in rec["segments"]] == [(0, 3), (3, 6)]
    assert rec["settings"]["ar_steps"] == 1  # a quarter of the 6 steps: step 1 autoregressive, then diffusion
    curve = {p["step"]: p for s in rec["segments"] for p in s["curve"]}
    assert curve[1].get("objective") == "ar" and "objective" not in curve[6]
    assert rec["tokens_seen"] == 6 * 2 * 128 == sum(s["tokens_seen"] for s in rec["segments"])
    assert rec["data"]["train_tokens"] > 1000 and rec["data"]["licences"] == {"stdlib": "PSF-2.0"}
    assert all(s["held_out"] and s["curve"] and s["hardware"] for s in rec["segments"])
    assert all("context_gain" in h and "unigram_nats_per_token" in h for s in rec["segments"] for h in s["held_out"])
    # the probe reads the same run: model and unigram at each mask ratio, on the same tokens
    probe = subprocess.run([sys.executable, str(ROOT / "training" / "probe.py"), "--run", str(tmp_path / "halves"),
                            "--corpus", str(corpus), "--windows", "2", "--threads", "1"],
                           check=True, capture_output=True, text=True, timeout=300)
    ratios = json.loads(probe.stdout.splitlines()[-1])["ratios"]
    assert list(ratios) == ["0.05", "0.25", "0.5", "0.75", "1.0"]
    for r in ratios.values():
        assert r["context_gain"] == pytest.approx(r["unigram_nats_per_token"] - r["nats_per_token"], abs=2e-4)
    # export: a bf16 checkpoint the normal loader reads, with its checksums
    out = tmp_path / "export"
    _train(tmp_path / "halves", corpus, "--export", str(out))
    ckpt = load_checkpoint(out, device="cpu")
    assert ckpt.config.max_position_embeddings == 128 and ckpt.tokenizer is not None
    sums = dict(reversed(l.split("  ", 1)) for l in (out / "SHA256SUMS").read_text().splitlines())
    assert {"config.json", "model.safetensors", "training.json", "vocab.json"} <= set(sums)


def test_an_autoregressive_phase_as_long_as_the_run_is_refused_before_anything_is_written(tmp_path, corpus):
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--run", str(tmp_path / "run"), "--corpus",
           str(corpus), "--total-steps", "6", "--ar-steps", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--ar-steps 6 must be at least 0 and below --total-steps 6" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_cuda_dry_run_runs_the_same_path_on_the_cpu_and_writes_nothing(tmp_path, corpus):
    run = tmp_path / "run"
    _train(run, corpus, "--until-step", "1")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = _train(run, corpus, "--device", "cuda", "--dry-run")
    assert "dry run: 2 steps" in proc.stderr
    if not torch.cuda.is_available():
        assert "without CUDA" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
