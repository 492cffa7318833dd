"""The hardening suite's short versions (benchmarks/hardening/, issue 14).

Each script runs as it would from the command line, in a subprocess that starts its own daemon
and language servers; its last line (JSON) is checked for the goals that are behaviour - no crash,
no traceback, every fault answered with a clear error, one daemon after a respawn - never for
the timing ones, which depend on the machine and its load.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "hardening"


def run_script(name: str, *args: str, timeout: float = 300) -> dict:
    """Run a script of the suite (with one torch thread: on a loaded 2-core machine two make every
    denoising step many times slower, and these tests check behaviour, not speed); its JSON line."""
    proc = subprocess.run([sys.executable, str(SUITE / name), *args, "--threads", "1"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    out = proc.stdout.strip()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.splitlines()[-1])


def assert_goals(result: dict, *keys: str) -> None:
    """Each named goal is in the report and met (the report's figure in the message)."""
    for key in keys:
        goal = result["goals"].get(key)
        assert goal is not None, f"{result['script']} reported no goal {key!r}: {sorted(result['goals'])}"
        evidence = result.get("evidence", {}).get(key, "")
        assert goal["met"], f"{result['script']}: {key} = {result['figures'].get(key)!r}, goal {goal['goal']} {evidence}"


def test_fuzz_short_version():
    r = run_script("fuzz.py", "--frames", "1500", "--idle", "10", "--warmup-rounds", "1")
    assert_goals(r, "crashes", "tracebacks", "well_behaved_errors", "hung", "slowloris_timeouts",
                 "crowd_overloaded")
    assert r["figures"]["frames_sent"] >= 1500
    every_kind = {"random_bytes", "truncated", "bit_flips", "deep_nesting", "huge_headers", "wrong_shapes",
                  "wrong_types", "hostile_params", "huge_valid_frames", "many_connections", "slowloris"}
    assert every_kind <= set(r["categories"]), sorted(r["categories"])
    # the hostile values the issue names are refused, each with an error naming the field
    refused = {"sampling.steps = 1000000000": "steps", "sampling.steps = 18446744073709551615": "steps",
               "sampling.temperature = nan": "temperature", "sampling.temperature = inf": "temperature",
               "sampling.top_k = -1": "top_k", "sampling.alg_temp = 5e-324": "alg_temp",
               "lengths = 200 sizes": "lengths"}
    for label, field in refused.items():
        assert set(r["hostile"][label]) <= {"INVALID_PARAMS", "TOO_LARGE"}, (label, r["hostile"][label])
        assert field in r["hostile_messages"][label], (label, r["hostile_messages"][label])


def test_respawn_after_kill_9_under_three_language_servers():
    r = run_script("respawn.py", "--rounds", "1")
    assert_goals(r, "daemons_at_start", "never_served", "daemons_after", "lsp_tracebacks", "daemon_tracebacks")
    assert r["rounds"][0]["new_pid"] != r["rounds"][0]["old_pid"]


def test_typing_storm():
    r = run_script("typing_storm.py", "--keys", "60")
    assert_goals(r, "errors", "unanswered", "after_storm", "overloaded", "failed", "daemon_tracebacks",
                 "lsp_tracebacks")
    assert sum(r["outcomes"].values()) == 60


def test_checkpoint_faults_at_load():
    faults = ["truncated", "wrong_shape", "missing_tokenizer", "missing_shard", "nan_weight", "wrong_model_type",
              "pickle_only", "zero_layers", "zero_positions"]
    r = run_script("checkpoints.py", "--part", "load", "--faults", ",".join(faults))
    assert_goals(r, "intact_exit", "load_nonzero", "load_one_line", "load_named", "load_tracebacks")
    assert [row["fault"] for row in r["load"]] == faults


def test_checkpoint_changed_in_place_while_serving():
    r = run_script("checkpoints.py", "--part", "serving")
    assert_goals(r, "serving_alive", "serving_same", "serving_failed_state", "serving_restored", "serving_tracebacks")


def test_access_modes_other_users_and_the_tcp_token():
    r = run_script("access.py")
    keys = ["socket_mode", "dir_mode", "owner_served", "token_mode", "before_auth", "infill_before_auth",
            "wrong_token", "token_type", "empty_auth", "notify_before_auth", "token_served", "silent_closed",
            "half_auth_closed", "crowd_token_served", "crowd_waiting", "crowd_told"]
    if r["config"]["root"]:
        keys += ["other_user_unix", "other_user_token"]
    assert_goals(r, *keys)


@pytest.mark.parametrize("script", ["fuzz.py", "respawn.py", "typing_storm.py", "checkpoints.py", "access.py"])
def test_every_script_explains_itself(script):
    out = subprocess.run([sys.executable, str(SUITE / script), "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and "usage:" in out.stdout
