"""Run a repository's tests on a throwaway copy, cut off from the network and under limits.

`diffucode tune` writes every sampled completion into the user's repository and runs the user's
tests to score it. Doing that on the real checkout would be unacceptable (a half-written file left
behind after a crash, `__pycache__` and cache folders, tests that talk to the network), so this
module copies the repository once into a temp dir, writes completions only into that copy, runs
the test command there in a user+network namespace (`unshare -rn`) with resource limits, a
wall-clock timeout and a clean environment, and restores the copy's files after each run.

It knows nothing of models, tokens or rewards: it takes file texts and a shell command and returns
test counts. No torch here: the module must import fast and be testable alone.

What it does not do: confine the filesystem. A test that writes to an absolute path outside the
copy can still do so; the sandbox only guarantees that *we* never write the user's repository.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from diffucode.daemon.errors import InputError

# Folders never copied (nor scanned for targets): VCS data, caches, virtual environments.
SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "venv", "node_modules", ".tox", ".mypy_cache",
                       ".pytest_cache", ".hg", ".svn", ".ruff_cache", ".nox"})
MAX_REPO_BYTES = 200 * 1024 * 1024
MAX_REPO_FILES = 20_000
MAX_TIMEOUT_S = 3600.0
MIN_MEMORY_MB = 64
FSIZE_LIMIT = 256 * 1024 * 1024  # the largest file a test may write (RLIMIT_FSIZE)
OUTPUT_TAIL_BYTES = 1024 * 1024  # how much of the test output is kept (the tail)
CPU_SLACK_S = 5.0  # RLIMIT_CPU = timeout + this: the wall clock is the real limit

# The launcher: a python started with `-I -S` (nothing of the repository, no sitecustomize) that
# sets the resource limits (argv[1]: "resource=value,..."), brings the loopback interface up when
# argv[2] is "lo" (inside the new network namespace: tests that start a local server still work,
# nothing else is reachable), then execs `sh -c CMD` (argv[3]). Limits are set here rather than in
# a `preexec_fn`, which is not safe in a process with threads (the trainer has many).
_LAUNCHER = """\
import fcntl, os, resource, socket, struct, sys
for item in sys.argv[1].split(","):
    which, value = (int(v) for v in item.split("="))
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))  # hard too: the tests cannot raise it back
if sys.argv[2] == "lo":
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
        s.close()
    except OSError:
        pass
os.execv("/bin/sh", ["sh", "-c", sys.argv[3]])
"""


@functools.lru_cache(maxsize=1)
def network_isolation() -> str | None:
    """None when `unshare -rn` (a user+network namespace) works here, else why it does not.
    Checked once per process."""
    exe = shutil.which("unshare")
    if exe is None:
        return "the `unshare` program (util-linux) is not installed"
    try:
        r = subprocess.run([exe, "-rn", "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -rn true` could not run: {e}"
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
        return f"`unshare -rn true` failed ({why}); unprivileged user namespaces may be disabled"
    return None


@dataclass
class TestRun:
    """The outcome of one run of the test command. Counts are 0 when they could not be read
    (no junit report, no unittest summary); `pass_rate` then falls back to the return code."""

    __test__ = False  # not a pytest test class

    passed: int
    failed: int
    errors: int
    total: int
    returncode: int
    timed_out: bool
    seconds: float
    output_tail: str

    @property
    def pass_rate(self) -> float:
        """passed / total; without counts 1.0 when the command succeeded, else 0.0."""
        if self.timed_out and self.total == 0:
            return 0.0
        if self.total > 0:
            return self.passed / self.total
        return 1.0 if self.returncode == 0 else 0.0


def parse_junit(path: Path) -> tuple[int, int, int, int] | None:
    """(passed, failed, errors, total) from a junit XML report, skipped tests left out of total;
    None when the file is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    tests = failures = errors = skipped = 0
    found = False
    for s in suites:
        found = True
        try:
            tests += int(s.get("tests", 0))
            failures += int(s.get("failures", 0))
            errors += int(s.get("errors", 0))
            skipped += int(s.get("skipped", 0))
        except ValueError:
            return None
    if not found:
        return None
    total = max(0, tests - skipped)
    passed = max(0, total - failures - errors)
    return passed, failures, errors, total


_RAN = re.compile(r"^Ran (\d+) tests? in ", re.M)
_SUMMARY = re.compile(r"^(OK|FAILED)(?: \(([^)]*)\))?\s*$", re.M)


def parse_unittest(output: str) -> tuple[int, int, int, int] | None:
    """(passed, failed, errors, total) from unittest's summary lines ("Ran N tests", then "OK" or
    "FAILED (failures=a, errors=b)"), summed over several runs; None when there are none."""
    runs = _RAN.findall(output)
    summaries = _SUMMARY.findall(output)
    if not runs or not summaries:
        return None
    ran = sum(int(n) for n in runs)
    counts: dict[str, int] = {}
    for _, detail in summaries:
        for part in detail.split(","):
            key, _, value = part.strip().partition("=")
            if value.strip().isdigit():
                counts[key.strip()] = counts.get(key.strip(), 0) + int(value)
    total = max(0, ran - counts.get("skipped", 0))
    failed = counts.get("failures", 0) + counts.get("unexpected successes", 0)
    errors = counts.get("errors", 0)
    return max(0, total - failed - errors), failed, errors, total


def _check_relative(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel.replace("\\", "/"))
    if not rel or p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        raise InputError(f"replacement path {rel!r} must be relative to the repository and stay inside "
                         f"it (no absolute path, no '..')")
    return p


class Sandbox:
    """A throwaway copy of a repository where its test command runs (context manager).

    >>> with Sandbox(Path("repo"), "pytest -q", timeout=60) as sb:
    ...     sb.run({"pkg/mod.py": new_text}).pass_rate

    Layout of the temp dir: `repo/` (the copy, the tests' cwd), `home/` (HOME), `tmp/` (TMPDIR,
    emptied before each run), `scratch/` (for callers, e.g. the coverage tracer), `report.xml`
    (pytest's junit report) and `output.log` (the command's stdout and stderr).
    Not thread-safe: one run at a time.
    """

    def __init__(self, repo: Path, tests: str, timeout: float = 60.0, memory_mb: int = 2048, *,
                 allow_network: bool = False, max_files: int = MAX_REPO_FILES,
                 max_bytes: int = MAX_REPO_BYTES):
        self.repo = Path(repo).expanduser()
        if not self.repo.is_dir():
            raise InputError(f"--repo {str(repo)!r} is not a directory")
        if not isinstance(tests, str) or not tests.strip():
            raise InputError("--tests must be a non-empty shell command, e.g. \"pytest -q\"")
        if not 0 < float(timeout) <= MAX_TIMEOUT_S:
            raise InputError(f"test timeout {timeout} s must be > 0 and at most {MAX_TIMEOUT_S:g} s")
        if int(memory_mb) < MIN_MEMORY_MB:
            raise InputError(f"memory limit {memory_mb} MB is below the minimum of {MIN_MEMORY_MB} MB")
        if not allow_network:
            why = network_isolation()
            if why is not None:
                raise InputError(f"no network isolation available for the tests: {why}. "
                                 f"Pass --allow-network to run them with the network reachable")
        self.tests = tests
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.allow_network = allow_network
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.root: Path | None = None

    # -- lifetime -----------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self._check_size()
        self.root = Path(tempfile.mkdtemp(prefix="diffucode-tune-")).resolve()
        try:
            _copy_tree(self.repo, self.copy)
            for d in ("home", "tmp", "scratch"):
                (self.root / d).mkdir()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temp dir (idempotent)."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _check_size(self) -> None:
        files = size = 0
        for dirpath, dirnames, filenames in os.walk(self.repo):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for name in filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    continue
                files += 1
                try:
                    size += os.path.getsize(p)
                except OSError:
                    pass
                if files > self.max_files:
                    raise InputError(f"repository {str(self.repo)!r} has more than {self.max_files:,} files, "
                                     f"the limit (caches and virtual environments not counted)")
                if size > self.max_bytes:
                    raise InputError(f"repository {str(self.repo)!r} holds over {_size(size)}, "
                                     f"the limit is {_size(self.max_bytes)}")

    @property
    def copy(self) -> Path:
        """The copy of the repository (the tests' working directory)."""
        if self.root is None:
            raise RuntimeError("the sandbox is not open: use `with Sandbox(...) as sb:`")
        return self.root / "repo"

    @property
    def scratch(self) -> Path:
        """A folder in the sandbox, outside the copy, for the caller's own files."""
        if self.root is None:
            raise RuntimeError("the sandbox is not open: use `with Sandbox(...) as sb:`")
        return self.root / "scratch"

    # -- running ------------------------------------------------------------------------------

    def resolve(self, rel: str) -> Path:
        """The path in the copy of a repository-relative path; InputError when it would escape."""
        p = self.copy.joinpath(*_check_relative(rel).parts)
        real = Path(os.path.realpath(p))
        if real != self.copy and self.copy not in real.parents:
            raise InputError(f"replacement path {rel!r} leads outside the repository copy (a symlink?)")
        if real.is_dir():
            raise InputError(f"replacement path {rel!r} is a directory, not a file")
        return real

    def run(self, replacements: Mapping[str, str] | None = None, *, pythonpath: Sequence[Path | str] = (),
            extra_env: Mapping[str, str] | None = None) -> TestRun:
        """Write `replacements` (repository-relative path -> new file text) into the copy, run the
        test command, restore those files, return the counts.

        `pythonpath`: folders put first on PYTHONPATH for this run (before the copy's root);
        `extra_env`: variables added to the clean environment for this run (the coverage tracer
        uses both to load its sitecustomize)."""
        replacements = dict(replacements or {})
        targets = {self.resolve(rel): text for rel, text in replacements.items()}
        saved: dict[Path, bytes | None] = {}
        try:
            for path, text in targets.items():
                saved[path] = path.read_bytes() if path.exists() else None
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(text.encode("utf-8"))
            return self._execute(pythonpath, extra_env or {})
        finally:
            for path, original in saved.items():
                if original is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(original)

    def _env(self, pythonpath: Sequence[Path | str], extra: Mapping[str, str]) -> dict[str, str]:
        assert self.root is not None
        path_dirs = [os.path.dirname(sys.executable)]
        path_dirs += (os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
        py = [str(p) for p in pythonpath] + [str(self.copy)]
        if (self.copy / "src").is_dir():  # src layout: import the copy's package, not an installed one
            py.append(str(self.copy / "src"))
        env = {
            "PATH": os.pathsep.join(dict.fromkeys(d for d in path_dirs if d)),
            "LANG": "C.UTF-8",
            "HOME": str(self.root / "home"),
            "TMPDIR": str(self.root / "tmp"), "TMP": str(self.root / "tmp"), "TEMP": str(self.root / "tmp"),
            "PYTHONPATH": os.pathsep.join(py),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "PYTEST_ADDOPTS": f"-p no:cacheprovider --junitxml={shlex.quote(str(self.root / 'report.xml'))}",
            "NO_COLOR": "1",
        }
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.update(extra)
        return env

    def _argv(self) -> list[str]:
        """unshare -rn -- python -I -S -c LAUNCHER LIMITS lo CMD (without unshare with the network)."""
        limits = {resource.RLIMIT_AS: self.memory_mb * 1024 * 1024,
                  resource.RLIMIT_CPU: int(self.timeout + CPU_SLACK_S),
                  resource.RLIMIT_FSIZE: FSIZE_LIMIT, resource.RLIMIT_CORE: 0}
        launch = [sys.executable, "-I", "-S", "-c", _LAUNCHER, ",".join(f"{k}={v}" for k, v in limits.items()),
                  "-" if self.allow_network else "lo", self.tests]
        if self.allow_network:
            return launch
        return [shutil.which("unshare") or "unshare", "-rn", "--", *launch]

    def _execute(self, pythonpath: Sequence[Path | str], extra: Mapping[str, str]) -> TestRun:
        assert self.root is not None
        report = self.root / "report.xml"
        log = self.root / "output.log"
        report.unlink(missing_ok=True)
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        env = self._env(pythonpath, extra)
        start = time.monotonic()
        timed_out = False
        with open(log, "wb") as out:
            proc = subprocess.Popen(self._argv(), cwd=self.copy, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # the whole group: also whatever the tests left running in the background
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        tail = _tail(log, OUTPUT_TAIL_BYTES)
        counts = None if timed_out else parse_junit(report)
        if counts is None and not timed_out:
            counts = parse_unittest(tail)
        passed, failed, errors, total = counts or (0, 0, 0, 0)
        return TestRun(passed=passed, failed=failed, errors=errors, total=total, returncode=proc.returncode,
                       timed_out=timed_out, seconds=round(seconds, 3), output_tail=tail)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` without the SKIP_DIRS folders; symlinks are copied as symlinks (the
    sandbox refuses to write through one that leads outside the copy)."""
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP_DIRS}

    shutil.copytree(src, dst, symlinks=True, ignore=ignore, ignore_dangling_symlinks=True)
