"""`diffucode tune`'s non-ML pieces on tiny real repositories: the sandbox (copy, limits, no
network, timeout, restore), the coverage tracer and the targets it selects, and the rewards."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import textwrap
import time
from pathlib import Path

import pytest

from diffucode.daemon.errors import InputError
from diffucode.tune.repo import Target, covered_functions, find_targets, scan_repo, split_targets
from diffucode.tune.reward import (CODE_WEIGHT, FORMAT_WEIGHT, ReconstructionReward, TestReward,
                                   edit_similarity, levenshtein)
from diffucode.tune.sandbox import Sandbox, TestRun, network_isolation, parse_unittest

OPS = '''\
"""Small operations."""
import functools


def add(a, b):
    """Add two numbers."""
    return a + b


@functools.lru_cache(maxsize=None)
def square(x):
    y = x * x
    return y


def unused(x):
    # nobody calls this
    return x - 1


class Stack:
    def __init__(self):
        self.items = []

    async def apush(self, x):
        return self.push(x)

    def push(self, x):
        """Push x, return the new size."""
        self.items.append(x)
        return len(self.items)
'''

PYTEST_TESTS = '''\
from ops import Stack, add, square


def test_add():
    assert add(2, 3) == 5


def test_add_negative():
    assert add(-2, -3) == -5


def test_square():
    assert square(4) == 16


def test_push():
    s = Stack()
    assert s.push(1) == 1
    assert s.push(2) == 2
'''

UNITTEST_TESTS = '''\
import unittest

from ops import add, square


class T(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_add_zero(self):
        self.assertEqual(add(0, 7), 7)

    def test_square(self):
        self.assertEqual(square(3), 9)

    @unittest.skip("not today")
    def test_skipped(self):
        pass
'''


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (folders too) -> sha256 of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def pyrepo(tmp_path_factory):
    root = write(tmp_path_factory.mktemp("pyrepo"), {
        "ops.py": OPS, "tests/test_ops.py": PYTEST_TESTS, "tests/conftest.py": "",
        "legacy.py": "print 'python 2'\n", "pkg/__init__.py": "", "pkg/util.py": "def helper():\n    return 1\n"})
    return root, snapshot(root)


@pytest.fixture(scope="module")
def sandbox(pyrepo):
    with Sandbox(pyrepo[0], "python -m pytest -q tests", timeout=60, allow_network=network_isolation() is not None) as sb:
        yield sb


def ops_target(targets: list[Target], name: str) -> Target:
    return next(t for t in targets if t.name == name)


def test_targets_are_the_covered_functions(pyrepo, sandbox):
    repo, _ = pyrepo
    covered = covered_functions(sandbox)
    assert ("ops.py", 5) in covered and ("ops.py", 10) in covered  # square: its decorator's line
    assert ("ops.py", 16) not in covered and all(not p.startswith("<") for p, _ in covered)
    targets = find_targets(repo, covered)
    assert [t.name for t in targets] == ["add", "square", "Stack.__init__", "Stack.push"]  # not unused, apush
    text = (repo / "ops.py").read_text()
    for t in targets:
        assert t.before + t.body + t.after == text and t.path == "ops.py"
    add = ops_target(targets, "add")
    assert add.body == "    return a + b\n" and add.before.endswith('"""Add two numbers."""\n')
    assert (add.first_line, add.last_line) == (7, 7)
    push = ops_target(targets, "Stack.push")
    assert push.body == "        self.items.append(x)\n        return len(self.items)\n"

    scan = scan_repo(repo, None)  # everything, tests and conftest left out; legacy.py does not parse
    assert scan.unparsable == ["legacy.py"] and scan.files == 4
    assert {t.name for t in scan.targets} == {"add", "square", "unused", "Stack.__init__", "Stack.apush",
                                             "Stack.push", "helper"}
    unused = ops_target(scan.targets, "unused")  # the body starts at the first statement
    assert unused.body == "    return x - 1\n" and unused.before.endswith("    # nobody calls this\n")
    assert [t.name for t in find_targets(repo, covered, max_lines=1)] == ["add", "Stack.__init__"]

    lines = find_targets(repo, covered, mode="lines", seed=3)
    assert lines == find_targets(repo, covered, mode="lines", seed=3)  # deterministic
    for t in lines:
        assert t.body.count("\n") == 1 and t.body.strip() and not t.body.strip().startswith("#")
        assert t.before + t.body + t.after == text and t.first_line == t.last_line
    with pytest.raises(InputError, match="mode"):
        find_targets(repo, covered, mode="words")


def test_test_reward(pyrepo, sandbox):
    repo, _ = pyrepo
    targets = find_targets(repo, covered_functions(sandbox))
    add = ops_target(targets, "add")
    reward = TestReward(sandbox)
    good, wrong, broken = "    return a + b\n", "    return a - b", "    return a +\n"
    r = reward(add, [good, wrong, broken, good])
    assert r[0].tests.total == 4 and r[0].code == 1.0 and r[0].format == 1.0
    assert r[0].total == CODE_WEIGHT + FORMAT_WEIGHT
    assert r[1].tests.failed == 2 and r[1].code == 0.5 and r[1].format == 1.0  # add(0-ish) tests fail
    assert r[2].format == 0.0 and r[2].code == 0.0 and r[2].tests is None and r[2].total == 0.0
    assert r[3] is r[0]  # identical completions run once
    # a body that makes the module fail to import: a collection error is pass rate 0, not a crash
    bad = sandbox.run({"ops.py": add.before + "    return undefined_name(\n" + add.after})
    assert bad.pass_rate == 0.0 and bad.errors >= 1
    # the copy is restored after each run
    assert (sandbox.copy / "ops.py").read_text() == (repo / "ops.py").read_text()
    assert not (sandbox.copy / "new.py").exists()
    sandbox.run({"new.py": "x = 1\n"})
    assert not (sandbox.copy / "new.py").exists()


def test_unittest_counts(tmp_path):
    repo = write(tmp_path / "r", {"ops.py": OPS, "test_ops.py": UNITTEST_TESTS})
    with Sandbox(repo, "python -m unittest", timeout=60, allow_network=network_isolation() is not None) as sb:
        ok = sb.run({})
        assert (ok.passed, ok.failed, ok.errors, ok.total, ok.pass_rate) == (3, 0, 0, 3, 1.0)
        targets = find_targets(repo, covered_functions(sb))
        assert [t.name for t in targets] == ["add", "square"]
        add = targets[0]
        r = TestReward(sb)(add, ["    return a * b\n"])[0]
        assert (r.tests.passed, r.tests.failed, r.tests.total) == (1, 2, 3) and abs(r.code - 1 / 3) < 1e-9
    assert parse_unittest("Ran 5 tests in 0.1s\n\nFAILED (failures=1, errors=2, skipped=1)\n") == (1, 1, 2, 4)
    assert TestRun(0, 0, 0, 0, 0, False, 0.1, "").pass_rate == 1.0
    assert TestRun(0, 0, 0, 0, 3, False, 0.1, "").pass_rate == 0.0


def test_network_is_cut_off(tmp_path):
    why = network_isolation()
    if why is not None:
        pytest.skip(f"no network isolation on this machine: {why}")
    repo = write(tmp_path / "r", {"test_net.py": '''\
        import os, socket

        def test_netns():
            print("NETNS=" + os.readlink("/proc/self/ns/net"))

        def test_internet():
            socket.create_connection(("1.1.1.1", 80), timeout=3).close()

        def test_loopback():
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            socket.create_connection(srv.getsockname(), timeout=3).close()
        '''})
    ours = os.readlink("/proc/self/ns/net")
    with Sandbox(repo, "python -m pytest -q -s", timeout=30) as sb:
        run = sb.run({})
    assert (run.passed, run.failed, run.total) == (2, 1, 3), run.output_tail
    assert "Network is unreachable" in run.output_tail
    assert re.search(r"NETNS=(\S+)", run.output_tail).group(1) != ours  # a network namespace of its own
    with Sandbox(repo, "python -m pytest -q -s -k netns", timeout=30, allow_network=True) as sb:
        outside = sb.run({})
    assert re.search(r"NETNS=(\S+)", outside.output_tail).group(1) == ours  # not blocked by us there
    try:
        socket.create_connection(("1.1.1.1", 80), timeout=3).close()
    except OSError:
        return  # this machine has no route out anyway
    with Sandbox(repo, "python -m pytest -q -k internet", timeout=30, allow_network=True) as sb:
        assert sb.run({}).passed == 1


def test_timeout_kills_the_tests(tmp_path):
    repo = write(tmp_path / "r", {"test_slow.py": '''\
        import subprocess, time

        def test_forever():
            subprocess.Popen(["sleep", "1000"])
            time.sleep(1000)
        '''})
    with Sandbox(repo, "python -m pytest -q", timeout=3, allow_network=network_isolation() is not None) as sb:
        start = time.monotonic()
        run = sb.run({})
    assert run.timed_out and run.pass_rate == 0.0 and run.returncode != 0
    assert 3 <= run.seconds < 8 and time.monotonic() - start < 10


def test_memory_limit(tmp_path):
    repo = write(tmp_path / "r", {"test_mem.py": '''\
        def test_small():
            assert len(bytearray(10 * 2**20)) == 10 * 2**20

        def test_huge():
            b = bytearray(4 * 2**30)
            assert len(b) == 4 * 2**30
        '''})
    with Sandbox(repo, "python -m pytest -q", timeout=30, memory_mb=512,
                 allow_network=network_isolation() is not None) as sb:
        run = sb.run({})
    assert (run.passed, run.failed, run.total) == (1, 1, 2) and "MemoryError" in run.output_tail


def test_bad_input_is_refused(tmp_path, pyrepo):
    outside = tmp_path / "outside.py"
    outside.write_text("secret = 1\n")
    repo = write(tmp_path / "r", {"a.py": "x = 1\n"})
    (repo / "link.py").symlink_to(outside)
    with Sandbox(repo, "true", allow_network=True) as sb:
        root = sb.root
        for bad in ("../x.py", "/etc/passwd", "a/../../x.py", "", "link.py"):
            with pytest.raises(InputError, match="replacement path"):
                sb.run({bad: "x = 2\n"})
        assert sb.copy.joinpath("a.py").read_text() == "x = 1\n"
    assert not root.exists()  # removed on exit
    assert outside.read_text() == "secret = 1\n"

    big = write(tmp_path / "big", {f"m{i}.py": "x = 1\n" for i in range(12)})
    with pytest.raises(InputError, match=r"more than 10 files, the limit"):
        Sandbox(big, "true", allow_network=True, max_files=10).__enter__()
    (big / "data.bin").write_bytes(b"0" * 5000)
    with pytest.raises(InputError, match=r"the limit is 4,000 bytes"):
        with Sandbox(big, "true", allow_network=True, max_bytes=4000):
            pass
    for kwargs, match in (({"timeout": 0}, "timeout"), ({"memory_mb": 10}, "memory limit"),
                          ({"tests": " "}, "--tests")):
        with pytest.raises(InputError, match=match):
            Sandbox(**{"repo": repo, "tests": "true", "allow_network": True, **kwargs})
    with pytest.raises(InputError, match="not a directory"):
        Sandbox(tmp_path / "missing", "true", allow_network=True)


def test_split_and_reconstruction(pyrepo):
    repo, _ = pyrepo
    targets = find_targets(repo, None)
    train, held = split_targets(targets, 0.25, seed=0)
    assert train and held and len(train) + len(held) == len(targets)
    assert not {t.path for t in train} & {t.path for t in held}  # by file
    assert split_targets(targets, 0.25, seed=0) == (train, held)
    assert split_targets(targets, 0.0) == (targets, [])
    with pytest.raises(InputError, match="held-out fraction"):
        split_targets(targets, 1.5)

    assert levenshtein("kitten", "sitting") == 3 and edit_similarity("", "") == 1.0
    add = ops_target(targets, "add")
    r = ReconstructionReward()(add, ["    return a + b", "    return a - b\n", "    return a +\n"])
    assert r[0].exact and r[0].code == 1.0 and r[0].total == CODE_WEIGHT + FORMAT_WEIGHT
    assert not r[1].exact and 0.9 < r[1].code < 1.0 and r[1].format == 1.0
    assert r[2].format == 0.0 and r[2].tests is None


def test_user_repository_unchanged(pyrepo):
    """Runs last: after every sandbox run above, the user's repository is byte-identical."""
    repo, before = pyrepo
    assert snapshot(repo) == before
