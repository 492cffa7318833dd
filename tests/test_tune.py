"""`diffucode tune` (tune/): the coupled-GRPO estimate and loss, a training step on a tiny real
checkpoint, the command end to end on a tiny repository with real tests in the sandbox (the
repository untouched, the adapter served back), Ctrl-C saving, and data parallel over two
processes on gloo giving the update of one process holding the whole batch."""

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffucode import Engine
from diffucode.daemon.engine import lora
from diffucode.daemon.engine.coupled import Pass, complementary, pass_logps
from diffucode.tune.grpo import Completion, coupled_token_logps, grpo_loss, leave_one_out
from diffucode.tune.repo import find_targets
from diffucode.tune.reward import ReconstructionReward
from diffucode.tune.settings import TuneSettings
from diffucode.tune.trainer import Tuner

CALC = '''def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def double(x):
    """Twice x."""
    return x * 2
'''
SHAPES = '''def area(w, h):
    return w * h


def perimeter(w, h):
    return 2 * (w + h)
'''
TESTS = '''from calc import add, sub, double
from shapes import area, perimeter


def test_calc():
    assert add(2, 3) == 5 and sub(5, 3) == 2 and double(4) == 8


def test_shapes():
    assert area(2, 3) == 6 and perimeter(2, 3) == 10
'''


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    (root / "calc.py").write_text(CALC)
    (root / "shapes.py").write_text(SHAPES)
    (root / "tests" / "test_it.py").write_text(TESTS)
    return root


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tune(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffucode", "tune", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, **kw)


SMALL = ["--canvas", "16", "--context", "48", "--group", "2", "--prompts", "2"]


def test_leave_one_out_advantages():
    assert leave_one_out([1.0, 0.0, 0.0]) == [1.0, -0.5, -0.5]
    assert sum(leave_one_out([0.3, 2.0, 1.1, 0.7])) == pytest.approx(0.0)
    assert leave_one_out([2.0]) == [0.0]


def test_coupled_estimate_is_the_reference_formula_and_ignores_its_batch(tiny_dir):
    engine = Engine.load(tiny_dir, device="cpu")
    net, mask = engine.checkpoint.network, engine.checkpoint.mask_id
    ids = engine.tasks.tok.encode("def add(a, b):\n    return a + b\n\nx = 1\n")
    c = Completion(ids, 5, 6, 4, "k")
    other = Completion(ids[:-2], 3, 5, 5, "other")
    with torch.no_grad():
        (alone,) = coupled_token_logps(net, [c], mask, 0, seed=7)
        together = coupled_token_logps(net, [other, c], mask, 0, seed=7)[1]
        first, second, t = complementary(6, random.Random("7:k"))
        full, a, b = pass_logps(net, [Pass(ids, 5, list(range(6))), Pass(ids, 5, first), Pass(ids, 5, second)], mask, 0)
    pair = torch.empty(6)
    pair[first], pair[second] = a / t, b / (1 - t)
    assert sorted(first + second) == list(range(6)) and first and second
    assert torch.allclose(alone, ((full + pair) / 2)[:4], atol=1e-5)
    assert torch.allclose(alone, together, atol=1e-5)  # left padding and companions change nothing


def test_grpo_loss_gradients():
    new = torch.zeros(3, requires_grad=True)
    parts = grpo_loss([new], [torch.zeros(3)], [torch.zeros(3)], [2.0], clip=0.5, beta=0.0)
    parts.loss_sum.backward()
    assert torch.allclose(new.grad, torch.full((3,), -2.0))  # ratio 1: the policy gradient, -A per token
    assert parts.tokens == 3 and parts.clipped == 0
    for adv, grad, clipped in ((1.0, 0.0, 3), (-1.0, 2.0, 0)):  # ratio 2: clipped for A > 0 only
        new = torch.full((3,), float(torch.log(torch.tensor(2.0))), requires_grad=True)
        parts = grpo_loss([new], [torch.zeros(3)], [new.detach()], [adv], clip=0.5, beta=0.0)
        parts.loss_sum.backward()
        assert torch.allclose(new.grad, torch.full((3,), grad)) and parts.clipped == clipped
    new = torch.zeros(2, requires_grad=True)  # the KL term pulls towards the reference
    grpo_loss([new], [torch.zeros(2)], [torch.full((2,), -1.0)], [0.0], clip=0.5, beta=1.0).loss_sum.backward()
    assert (new.grad > 0).all()


def test_a_grpo_step_trains_only_the_adapter(tiny_dir, repo):
    engine = Engine.load(tiny_dir, device="cpu")
    net = engine.checkpoint.network
    lora.attach(net, lora.LoraSettings(rank=4))
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    targets = find_targets(repo, None)
    tuner = Tuner(engine, targets, ReconstructionReward(), TuneSettings(canvas=16, context=48, group=3, prompts=2, lr=1e-2))
    stats = [tuner.step(s) for s in range(2)]
    assert set(stats[0]) >= {"reward", "code", "format", "loss", "kl", "clipped", "seconds"}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in base.items())
    assert any(float(p.detach().abs().sum()) > 0 for n, p in net.named_parameters() if "lora_B" in n)
    assert stats[1]["kl"] > 0  # the second step's policy has moved away from the base


def test_sft_baseline_lowers_its_loss(tiny_dir, repo):
    engine = Engine.load(tiny_dir, device="cpu")
    lora.attach(engine.checkpoint.network, lora.LoraSettings(rank=4))
    targets = find_targets(repo, None)[:1]
    tuner = Tuner(engine, targets, ReconstructionReward(),
                  TuneSettings(canvas=16, context=48, prompts=1, lr=1e-2, objective="sft"))
    losses = [tuner.step(s)["loss"] for s in range(12)]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_tune_end_to_end_with_the_repositorys_tests(tiny_dir, repo, tmp_path):
    before = _digest(repo)
    out = tmp_path / "adapter"
    args = ["--repo", repo, "--tests", "python -m pytest -q", "--out", out, "--model", tiny_dir, *SMALL]
    done = _tune(*args, "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert "functions the tests cover" in done.stderr and "Traceback" not in done.stderr
    record = json.loads((out / "tune.json").read_text())
    assert len(record["steps"]) == 2 and record["base_sha256"] == lora.weights_sha256(tiny_dir)
    assert record["tests"] == "python -m pytest -q" and record["targets"]["train"] >= 1
    assert _digest(repo) == before  # the user's repository is never written
    engine = Engine.load(tiny_dir, device="cpu", adapter=out)
    assert engine.adapter.summary()["steps"] == 2

    again = _tune(*args, "--steps", "1")  # an adapter already there is not overwritten silently
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = _tune(*args, "--steps", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "tune.json").read_text())["steps"]) == 3


def test_tune_refuses_tests_that_fail_as_they_are(tiny_dir, repo, tmp_path):
    (repo / "tests" / "test_it.py").write_text(TESTS + "\n\ndef test_broken():\n    assert False\n")
    done = _tune("--repo", repo, "--tests", "python -m pytest -q", "--out", tmp_path / "a", "--model", tiny_dir)
    assert done.returncode == 2 and "tests do not pass on the repository as it is (2 of 3 passed" in done.stderr
    assert "Traceback" not in done.stderr.split("Its output ends")[0]
    assert not (tmp_path / "a").exists()


def test_ctrl_c_saves_the_adapter_so_far(tiny_dir, repo, tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.Popen([sys.executable, "-m", "diffucode", "tune", "--repo", str(repo), "--out", str(out),
                             "--model", str(tiny_dir), "--steps", "10000", *SMALL], stderr=subprocess.PIPE, text=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "s/step" not in "".join(seen) and time.monotonic() < deadline:  # the first step is done
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=5)
    record = json.loads((out / "tune.json").read_text())
    assert record["note"] == "interrupted" and len(record["steps"]) >= 1
    assert "interrupted: the adapter after" in "".join(seen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_gloo_make_the_update_of_one(tiny_dir, repo, tmp_path):
    """torchrun with 2 CPU processes, each taking half the step's prompts, against 1 process with
    all of them: the same adapter after two steps (up to float summation order)."""
    common = ["--repo", repo, "--model", tiny_dir, "--steps", "2", "--held-out", "0", "--lr", "0.01", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = _tune(*common, "--out", tmp_path / "one", env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffucode", "tune",
                          *map(str, common), "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / lora.WEIGHTS_FILE)), load_file(str(tmp_path / "two" / lora.WEIGHTS_FILE))
    assert a.keys() == b.keys()
    assert any(float(t.abs().sum()) > 0 for k, t in a.items() if "lora_B" in k)  # it did train
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rec_one, rec_two = (json.loads((tmp_path / d / "tune.json").read_text()) for d in ("one", "two"))
    assert rec_two["world_size"] == 2 and rec_one["world_size"] == 1
    assert [s["reward"] for s in rec_one["steps"]] == pytest.approx([s["reward"] for s in rec_two["steps"]])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_a_grpo_step_on_cuda_matches_the_cpu_estimate(tiny_dir, repo):
    """The adapter, the coupled estimate and an update on a GPU (bf16 base, fp32 adapter)."""
    targets = find_targets(repo, None)
    settings = TuneSettings(canvas=16, context=48, group=2, prompts=1)
    tuners = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        engine = Engine.load(tiny_dir, device=device, dtype=dtype)
        lora.attach(engine.checkpoint.network, lora.LoraSettings(rank=4), seed=0)
        tuners[device] = Tuner(engine, targets, ReconstructionReward(), settings)
    c = tuners["cpu"].completion(targets[0], tuners["cpu"].tasks.tok.encode(targets[0].body), "k")
    with torch.no_grad():
        est = {d: coupled_token_logps(t.network, [c], t.tasks.ckpt.mask_id, t.pad_id, seed=1)[0].float().cpu()
               for d, t in tuners.items()}
    assert torch.allclose(est["cpu"], est["cuda"], atol=0.1, rtol=0.05)  # bf16 against fp32
    stats = tuners["cuda"].step(0)
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in tuners["cuda"].params)
    assert stats["seconds"] > 0
