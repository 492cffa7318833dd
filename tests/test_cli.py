"""The `diffucode` command in a subprocess, as a user or a script runs it."""

import hashlib
import json
import subprocess
import sys

import pytest

SOURCE = '''def add(a, b):
    return a + b


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "diffucode", *map(str, args)], capture_output=True,
                          timeout=300)
    # decoded by hand: text=True would turn a generated "\r" into "\n"
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_json_matches_the_sampler(tiny_dir, tmp_path):
    import torch

    from diffucode.daemon.engine.checkpoint import load_checkpoint
    from diffucode.daemon.engine.sampler import SamplerConfig, generate
    from diffucode.daemon.engine.tiny import write_tiny_checkpoint

    bare = write_tiny_checkpoint(tmp_path / "bare", tokenizer_files=False)  # ids only: no tokenizer
    out = json.loads(run("generate", "--model", bare, "--input-ids", "5,17,99", "--max-new-tokens", 8,
                         "--steps", 8, "--alg", "entropy", "--temperature", 0, "--json").stdout)
    assert len(out["history"]) == 8 and all(len(h) == 11 for h in out["history"])
    assert out["output_ids"][:3] == [5, 17, 99] and out["history"][-1] == out["output_ids"]
    ckpt = load_checkpoint(bare, device="cpu", require_tokenizer=False)
    ref = generate(ckpt.network, torch.tensor([[5, 17, 99]]), 8, ckpt.mask_id,
                   SamplerConfig(steps=8, alg="entropy"))
    assert out["output_ids"] == ref.x[0].tolist()
    plain = run("generate", "--model", bare, "--input-ids", "5,17,99", "--max-new-tokens", 8,
                "--steps", 8, "--alg", "entropy").stdout.strip()
    assert plain == ",".join(map(str, out["output_ids"]))


def test_infill_prints_a_middle_and_leaves_the_file_alone(tiny_dir, source):
    before = digest(source)
    proc = run("infill", "--model", tiny_dir, source, "--line", 7, "--column", 9, "--max-new-tokens", 10,
               "--json")
    out = json.loads(proc.stdout)
    assert out["middle"] == "".join(out["tokens"]) and len(out["tokens"]) <= 10
    assert len(out["order"]) == len(out["tokens"]) and set(out["ar_ness"]) == {"local", "global"}
    assert digest(source) == before
    text = run("infill", "--model", tiny_dir, source, "--line", 7, "--column", 9,
               "--max-new-tokens", 10).stdout
    assert text.rstrip("\n") == out["middle"].rstrip("\n")


def test_refine_prints_a_diff_inside_the_lines(tiny_dir, source, tmp_path):
    before = digest(source)
    out = json.loads(run("refine", "--model", tiny_dir, source, "--lines", "6-8", "--fraction", 0.5,
                         "--json").stdout)
    assert digest(source) == before
    diff = run("refine", "--model", tiny_dir, source, "--lines", "6-8", "--fraction", 0.5).stdout
    assert diff == out["diff"]
    # apply the printed diff to a copy: everything outside lines 6-8 is unchanged
    copy = tmp_path / "copy.py"
    copy.write_bytes(SOURCE.encode())
    if diff:
        subprocess.run(["patch", "-s", str(copy)], input=diff.encode(), check=True)
    lines, new = SOURCE.split("\n"), copy.read_bytes().decode().split("\n")
    assert new[:5] == lines[:5] and new[len(new) - len(lines[8:]):] == lines[8:]
    assert "\n".join(new[5:len(new) - len(lines[8:])]) == out["text"]


@pytest.mark.parametrize("args,message", [
    (["--line", 40, "--column", 1], "line 40 is outside the file, which has 10 lines"),
    (["--line", 2, "--column", 30], "column 30 is outside line 2, which has 16 characters"),
    (["--line", 2, "--column", 1, "--max-new-tokens", 5000], "canvas of 5000 tokens exceeds the limit of 1024"),
])
def test_bad_input_is_a_clear_error(tiny_dir, source, args, message):
    proc = run("infill", "--model", tiny_dir, source, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_missing_model_and_file(tiny_dir, source, tmp_path):
    proc = run("infill", "--model", tmp_path / "none", source, "--line", 1, "--column", 1, check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    proc = run("infill", "--model", tiny_dir, tmp_path / "missing.py", "--line", 1, "--column", 1, check=False)
    assert proc.returncode == 2 and "missing.py: no such file" in proc.stderr
    proc = run("refine", "--model", tiny_dir, source, "--lines", "9-3", check=False)
    assert proc.returncode == 2 and "lines 9-3 are outside" in proc.stderr


def test_every_command_explains_its_options():
    for command in ("generate", "infill", "refine", "pull"):
        out = run(command, "--help").stdout
        assert "usage: diffucode " + command in out
    assert "--alg-temp" in run("generate", "--help").stdout
    assert "1-based" in run("infill", "--help").stdout


def test_pull_rejects_a_bad_hub_id_without_network():
    proc = run("pull", "not a hub id", check=False)
    assert proc.returncode == 2 and "not a hub id" in proc.stderr
