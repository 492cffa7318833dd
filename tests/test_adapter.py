"""`--adapter`: a LoRA adapter (daemon/engine/lora.py) on infill, refine and serve, with real parts.

The adapters are made here on the tiny checkpoint (attached, their weights randomised with a
fixed seed so that the answers change, saved for the checkpoint's weights), then used through
the Engine, the CLI and a real daemon on a real socket, whose adapter is rewritten on disk while
it serves: the daemon reloads it in place, `status` says so, and the answers follow.
"""

import json
import subprocess
import sys
import time

import pytest
import torch
from daemon_helpers import Daemon

from diffucode import Engine
from diffucode.daemon.engine import lora
from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.engine.options import DEFAULT_DECODING
from diffucode.daemon.engine.tiny import write_tiny_checkpoint
from diffucode.daemon.errors import InputError

BEFORE, AFTER = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("adapter-model"))


def make_adapter(model_dir, folder, seed: int, reward: float, base_sha256: str | None = None):
    """An adapter for `model_dir`'s weights (or those `base_sha256` names) with random LoRA weights."""
    net = load_checkpoint(model_dir, device="cpu").network
    settings = lora.LoraSettings(rank=4)
    lora.attach(net, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(net):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    sha = base_sha256 if base_sha256 is not None else lora.weights_sha256(model_dir)
    return lora.save_adapter(net, folder, settings, sha, str(model_dir), {"steps": [{"reward": reward}]})


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(model_dir, root / "one", 1, 0.25), make_adapter(model_dir, root / "two", 2, 0.75)


def middle(engine, **kw):
    return engine.infill(BEFORE, AFTER, max_new_tokens=8, **kw).text


def test_engine_loads_swaps_and_removes_an_adapter(model_dir, adapters):
    one, two = adapters
    plain = Engine.load(model_dir, "cpu", decoding="exact")
    engine = Engine.load(model_dir, "cpu", decoding="exact", adapter=one)
    summary = engine.adapter.summary()
    assert summary["path"] == str(one) and summary["rank"] == 4 and summary["last_reward"] == 0.25
    assert summary["layers"] == 7 * plain.checkpoint.config.num_hidden_layers and plain.adapter is None
    base, with_one = middle(plain), middle(engine)
    assert with_one != base
    engine.load_adapter(two)
    assert middle(engine) == middle(Engine.load(model_dir, "cpu", decoding="exact", adapter=two)) != with_one
    assert engine.load_adapter(None) is None and engine.adapter is None and middle(engine) == base


def test_a_swap_drops_the_keys_and_values_computed_with_the_old_adapter(model_dir, adapters):
    """Fast decoding with the prefix cache keeps a document's far-context K/V between requests:
    after a swap the next request of that document must compute them with the new adapter."""
    one, two = adapters
    before = "".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n" for i in range(40)) + BEFORE
    kw = dict(max_new_tokens=8, decoding="fast", prefix_cache=True)
    engine = Engine.load(model_dir, "cpu", prefix_cache=True, adapter=one)
    engine.infill(before, AFTER, group="doc", **kw)
    assert engine.tasks._prefixes.entries  # far context kept for "doc"
    engine.load_adapter(two)
    fresh = Engine.load(model_dir, "cpu", prefix_cache=True, adapter=two)
    assert engine.infill(before, AFTER, group="doc", **kw).text == fresh.infill(before, AFTER, group="doc", **kw).text


def test_int8_layers_carry_an_adapter(model_dir, adapters):
    one, _ = adapters
    plain = Engine.load(model_dir, "cpu", quantize="int8", decoding="exact")
    engine = Engine.load(model_dir, "cpu", quantize="int8", decoding="exact", adapter=one)
    wrapped = [m for m in engine.checkpoint.network.modules() if isinstance(m, lora.LoraLinear)]
    assert engine.checkpoint.quantization == "int8" and len(wrapped) == engine.adapter.layers
    assert all(type(m.base).__name__ == "DynamicInt8Linear" for m in wrapped)
    assert middle(engine) != middle(plain)
    # the same adapter on the full-precision layers lands near: the first tokens agree
    full = Engine.load(model_dir, "cpu", decoding="exact", adapter=one)
    assert middle(engine)[:2] == middle(full)[:2]


def test_an_adapter_for_other_weights_or_no_adapter_is_refused(model_dir, tmp_path):
    other = make_adapter(model_dir, tmp_path / "other", 1, 0.0, base_sha256="0" * 64)
    with pytest.raises(InputError, match="trained on base weights sha256 000000000000"):
        Engine.load(model_dir, "cpu", adapter=other)
    with pytest.raises(InputError, match="not a LoRA adapter folder"):
        Engine.load(model_dir, "cpu", adapter=tmp_path)


def test_cli_infill_and_refine_with_an_adapter(model_dir, adapters, tmp_path, capsys):
    from diffucode.cli import main

    one, _ = adapters
    path = tmp_path / "add.py"
    path.write_text(BEFORE + AFTER)
    cursor = ["--line", "2", "--column", str(len("    return ") + 1), "--max-new-tokens", "8", "--json"]
    assert main(["infill", "--model", str(model_dir), str(path), *cursor]) == 0
    without = json.loads(capsys.readouterr().out)["middle"]
    assert main(["infill", "--model", str(model_dir), "--adapter", str(one), str(path), *cursor]) == 0
    with_one = json.loads(capsys.readouterr().out)["middle"]
    assert with_one != without
    assert with_one == middle(Engine.load(model_dir, "cpu", decoding="exact", adapter=one))
    refine = ["refine", "--model", str(model_dir), str(path), "--lines", "1-2", "--json"]
    assert main(refine) == 0
    plain_refine = json.loads(capsys.readouterr().out)["text"]
    assert main(refine + ["--adapter", str(one)]) == 0
    assert json.loads(capsys.readouterr().out)["text"] != plain_refine
    assert main(["infill", "--model", str(model_dir), "--adapter", str(tmp_path / "none"), str(path), *cursor]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffucode infill: error: ") and "not a LoRA adapter folder (missing" in err


def test_cli_refuses_an_adapter_trained_on_other_weights_in_one_line(model_dir, tmp_path):
    other = make_adapter(model_dir, tmp_path / "other", 1, 0.0, base_sha256="ab" * 32)
    path = tmp_path / "add.py"
    path.write_text(BEFORE + AFTER)
    proc = subprocess.run([sys.executable, "-m", "diffucode", "infill", "--model", str(model_dir), "--adapter",
                           str(other), str(path), "--line", "2", "--column", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"diffucode infill: error: {other}: the adapter was trained on base weights sha256 abababababab" in proc.stderr


def wait_for(conn, check, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        status = conn.call("status")
        if check(status):
            return status
        assert time.monotonic() < deadline, status["reload"]
        time.sleep(0.1)


def test_serve_with_an_adapter_reloads_it_when_it_changes(model_dir, tmp_path):
    folder = make_adapter(model_dir, tmp_path / "adapter", 1, 0.25)
    d = Daemon(model_dir, tmp_path, "--adapter", str(folder))
    try:
        conn = d.connect()
        status = conn.call("status")
        assert status["adapter"]["path"] == str(folder) and status["adapter"]["last_reward"] == 0.25
        out = subprocess.run([sys.executable, "-m", "diffucode", "status", "--socket", str(d.socket)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"adapter: {folder} (LoRA rank 4, 1 steps, last reward 0.25)" in out.stdout
        params = {"before": BEFORE, "after": AFTER, "sampling": {"max_new_tokens": 8}}
        first = conn.call("infill", params)["text"]

        # `diffucode tune` writes the folder again: the daemon swaps the adapter in place
        make_adapter(model_dir, folder, 2, 0.75)
        status = wait_for(conn, lambda s: s["reload"]["adapter_reloads"] == 1)
        assert status["reload"]["state"] == "ok" and status["adapter"]["last_reward"] == 0.75
        assert status["reload"]["reloads"] == 0  # the base weights were not read again
        second = conn.call("infill", params)["text"]
        expected = Engine.load(model_dir, "cpu", decoding=DEFAULT_DECODING, adapter=folder)
        assert second != first and second == middle(expected)

        # an adapter for other weights lands: refused, the running one keeps serving
        make_adapter(model_dir, folder, 3, 0.5, base_sha256="cd" * 32)
        status = wait_for(conn, lambda s: s["reload"]["state"] == "failed")
        assert "adapter: " in status["reload"]["error"] and "cdcdcdcdcdcd" in status["reload"]["error"]
        assert status["adapter"]["last_reward"] == 0.75 and conn.call("infill", params)["text"] == second
    finally:
        d.stop()


def test_serve_refuses_a_bad_adapter_at_start_in_one_line(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffucode", "serve", "--model", str(model_dir), "--socket",
                           str(tmp_path / "d.sock"), "--adapter", str(tmp_path / "missing"), "--no-watch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"diffucode serve: error: {tmp_path / 'missing'}: not a LoRA adapter folder" in proc.stderr
