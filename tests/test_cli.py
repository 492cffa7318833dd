"""The `diffucode` command in a subprocess, as a user or a script runs it."""

import hashlib
import json
import os
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
    proc = run("refine", "--model", tiny_dir, source, "--lines", "9-30", check=False)
    assert proc.returncode == 2 and "--lines 9-30 are outside the file, which has 10 lines" in proc.stderr


def test_every_command_explains_its_options():
    for command in ("generate", "infill", "refine", "pull"):
        out = run(command, "--help").stdout
        assert "usage: diffucode " + command in out
    assert "--alg-temp" in run("generate", "--help").stdout
    assert "1-based" in run("infill", "--help").stdout


def test_pull_rejects_a_bad_hub_id_without_network():
    proc = run("pull", "not a hub id", check=False)
    assert proc.returncode == 2 and "not a hub id" in proc.stderr


# --- rough edges (issue 19): every error one line naming the value and the limit, status 2 --------------------

def cli(capsys, *args):
    """The command in-process: (exit status, stdout, stderr)."""
    from diffucode.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, and the parser's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """A tiny checkpoint of 64 positions: the model's limit is smaller than the canvas limit (1024)."""
    from diffucode.daemon.engine.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("short"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def where(command):
    return ["--line", 1, "--column", 1] if command == "infill" else ["--lines", "1-2"]


@pytest.mark.parametrize("command", ["infill", "refine"])
def test_a_file_that_cannot_be_read_is_one_line(capsys, tmp_path, command):
    code, out, err = cli(capsys, command, tmp_path, *where(command))
    assert (code, out, err) == (2, "", f"diffucode {command}: error: {tmp_path} is a directory, not a file\n")
    binary = tmp_path / "latin1.py"
    binary.write_bytes(b"caf\xe9 = 1\n")
    code, out, err = cli(capsys, command, binary, *where(command))
    assert (code, err) == (2, f"diffucode {command}: error: {binary}: not UTF-8 text (byte 0xe9 at offset 3)\n")
    if os.path.exists("/proc/self/mem"):  # reading it at offset 0 fails with EIO: any other OSError
        code, out, err = cli(capsys, command, "/proc/self/mem", *where(command))
        assert code == 2 and err.startswith(f"diffucode {command}: error: /proc/self/mem: cannot read it (")
    if os.geteuid() != 0:  # root reads a 0000 file
        locked = tmp_path / "locked.py"
        locked.write_text("x = 1\n")
        locked.chmod(0)
        code, out, err = cli(capsys, command, locked, *where(command))
        assert (code, err) == (2, f"diffucode {command}: error: {locked}: permission denied (cannot read it)\n")


@pytest.mark.parametrize("args, line", [
    (["infill", "f.py", "--line", 0, "--column", 1], "diffucode infill: error: argument --line: must be >= 1, got 0"),
    (["infill", "f.py", "--line", "x", "--column", 1],
     "diffucode infill: error: argument --line: expected an integer, got 'x'"),
    (["refine", "f.py", "--lines", "1-2", "--fraction", "half"],
     "diffucode refine: error: argument --fraction: invalid float value: 'half'"),
    (["generate", "--input-ids", "1", "--max-new-tokens", 0],
     "diffucode generate: error: argument --max-new-tokens: must be >= 1, got 0"),
    (["serve", "--max-queue", -1], "diffucode serve: error: argument --max-queue: must be >= 1, got -1"),
    (["quantize", "--model", "m", "--scheme", "fp8", "--out", "o"],
     "diffucode quantize: error: argument --scheme: invalid choice: 'fp8'"),  # (then the choices)
    (["status", "--socket"], "diffucode status: error: argument --socket: expected one argument"),
    (["tune", "--out", "o"], "diffucode tune: error: the following arguments are required: --repo"),
    ([], "diffucode: error: the following arguments are required: COMMAND"),
])
def test_argument_errors_are_one_line_without_the_usage(capsys, args, line):
    code, out, err = cli(capsys, *args)
    command = " ".join(["diffucode", *args[:1]])
    assert code == 2 and out == "" and "usage:" not in err and err.count("\n") == 1
    assert err.startswith(line) and err.endswith(f" (see `{command} --help`)\n")
    if args[:1] != ["quantize"]:
        assert err == f"{line} (see `{command} --help`)\n"


def test_help_is_still_the_full_help_and_names_the_canvas_limits(capsys):
    code, out, err = cli(capsys, "infill", "--help")
    assert code == 0 and out.startswith("usage: diffucode infill") and err == ""
    text = " ".join(out.split())
    assert "at most the smaller of the canvas limit (1024) and the model's positions (256 for the bundled model)" in text
    code, out, err = cli(capsys, "generate", "--help")
    assert code == 0 and "the prompt and the canvas must fit the model's positions" in " ".join(out.split())


def test_reversed_lines_are_named_as_reversed(capsys, source):
    code, out, err = cli(capsys, "refine", source, "--lines", "12-9")
    assert (code, out) == (2, "")
    assert err == "diffucode refine: error: --lines 12-9: the first line is after the last (did you mean 9-12?)\n"


def test_the_model_positions_are_named_before_the_canvas_limit(capsys, short_dir, source):
    for n in (100, 5000):  # over the model's 64 positions; 5000 is over the canvas limit (1024) too
        code, out, err = cli(capsys, "infill", "--model", short_dir, source, "--line", 7, "--column", 9,
                             "--max-new-tokens", n)
        assert (code, out) == (2, "")
        assert err == (f"diffucode infill: error: --max-new-tokens {n}: the canvas alone is too long for this model: "
                       f"sequence of {n} tokens exceeds the model's 64 positions (at most 64 canvas tokens fit)\n")
    code, out, err = cli(capsys, "infill", "--model", short_dir, source, "--line", 7, "--column", 9,
                         "--lengths", "8,70")
    assert code == 2 and err.startswith("diffucode infill: error: --lengths holds 70: the canvas alone is too long")
    code, out, err = cli(capsys, "generate", "--model", short_dir, "--input-ids", "5,17,99", "--max-new-tokens", 62)
    assert (code, err) == (2, "diffucode generate: error: --max-new-tokens 62: the prompt's 3 ids and the canvas exceed "
                              "this model's 64 positions (at most 61 canvas tokens fit)\n")


def test_engine_errors_name_the_flag_value_and_limit(capsys, tiny_dir, source):
    at = [source, "--line", 7, "--column", 9]
    code, out, err = cli(capsys, "infill", "--model", tiny_dir, *at, "--max-new-tokens", 100000)
    assert (code, out) == (2, "")
    assert err == ("diffucode infill: error: --max-new-tokens 100000: a canvas of 100000 tokens exceeds the limit "
                   "of 1024\n")
    code, out, err = cli(capsys, "infill", "--model", tiny_dir, *at, "--max-new-tokens", 8, "--steps", 9)
    assert err.startswith("diffucode infill: error: --steps must be in [1, --max-new-tokens = 8]") and code == 2
    code, out, err = cli(capsys, "infill", "--model", tiny_dir, *at, "--top-p", 2)
    assert (code, err) == (2, "diffucode infill: error: --top-p must be in (0, 1], got 2.0\n")


def test_flags_replace_field_names_only_where_they_are_names():
    from diffucode.cli_options import with_flags

    flags = {"max_new_tokens": "--max-new-tokens", "steps": "--steps", "lines": "--lines"}
    assert with_flags("steps must be in [1, max_new_tokens = 8]", flags) == "--steps must be in [1, --max-new-tokens = 8]"
    assert with_flags("lines 9-30 are outside the file", flags) == "--lines 9-30 are outside the file"
    for kept in ("steps: no such file", "/x/max_new_tokens/m: text tasks need tokenizer files",
                 "seed must be in [0, 2**64)", "the max_new_tokens.py file"):
        assert with_flags(kept, flags) == kept
