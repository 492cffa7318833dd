"""The model that ships with diffucode: present, small, unchanged, and working out of the box."""

import hashlib
import json
import subprocess
import sys

import pytest

from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.engine.tasks import Options, Tasks
from diffucode.models import default_model

MODEL = default_model()
# unittest/util.py, a held-out standard-library file (training/train.py's split): never trained on
HELD_OUT = '''def safe_repr(obj, short=False):
    try:
        result = repr(obj)
    except Exception:
        result = object.__repr__(obj)
    if not short or len(result) < _MAX_LENGTH:
        return result
    return result[:_MAX_LENGTH] + ' [truncated]...'
'''
GAP = HELD_OUT.replace("        result = repr(obj)\n", "        \n")  # line 3 emptied: fill it
CURSOR = GAP.index("        \n") + 8  # line 3, column 9


def test_files_match_the_recorded_checksums():
    sums = dict(reversed(line.split("  ", 1)) for line in (MODEL / "SHA256SUMS").read_text().splitlines())
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "training.json"} <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256((MODEL / name).read_bytes()).hexdigest() == digest, name


def test_small_enough_and_trained_as_recorded():
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size <= 30 * 2**20, f"{size} bytes"
    runs = [json.loads((MODEL / "training.json").read_text())]
    while runs[-1].get("init"):  # a run continued from an earlier one records it
        runs.append(runs[-1]["init"]["record"])
    for run in runs:
        assert run["command"].startswith("python training/train.py") and isinstance(run["seed"], int)
        assert run["data"]["sha256"] == runs[0]["data"]["sha256"]
    assert sum(run["minutes"] for run in runs) <= 120  # two hours of CPU at most, all runs together
    assert runs[0]["curve"][-1]["loss"] < runs[-1]["curve"][0]["loss"]


def test_loads_through_the_normal_loader_and_infills_held_out_code():
    tasks = Tasks(load_checkpoint(MODEL, device="cpu"))
    assert tasks.prompt_format == "raw"
    ans = tasks.infill(GAP[:CURSOR], GAP[CURSOR:], Options(max_new_tokens=16))
    assert ans.text.strip() and "<|" not in ans.text


@pytest.mark.parametrize("args", [["--line", 3, "--column", 9]])
def test_infill_without_model_uses_the_bundled_one(tmp_path, args):
    path = tmp_path / "split.py"
    path.write_text(GAP)
    proc = subprocess.run([sys.executable, "-m", "diffucode", "infill", str(path), *map(str, args)],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip()
    assert path.read_text() == GAP


def test_quality_script_scores_each_decoding_next_to_the_baselines():
    script = MODEL.parents[2] / "benchmarks" / "quality.py"
    proc = subprocess.run([sys.executable, str(script), "--set", "stdlib", "--samples", "3", "--multi-samples", "2",
                           "--decoding", "exact,fast"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    model = MODEL.name
    for kind, n in (("single", 3), ("multi", 2)):
        part = report["kinds"][kind]
        assert part["samples"] == n
        assert set(part["rows"]) == {f"{model}, exact", f"{model}, fast", "baseline: empty", "baseline: pass",
                                     "baseline: line above"}
        assert set(part["rows"]["baseline: empty"]) == {"exact_match", "edit_similarity", "parses", "token_accuracy"}
        assert part["rows"]["baseline: empty"]["token_accuracy"] == 0.0
        exact = part["timing"][f"{model}, exact"]
        assert exact["passes_per_case"] == part["canvas"]  # exact decoding: one pass per mask
    bad = subprocess.run([sys.executable, str(script), "--samples", "1", "--decoding", "greedy"],
                         capture_output=True, timeout=300)
    assert bad.returncode != 0 and b"'greedy' is unknown" in bad.stderr
