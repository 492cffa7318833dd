"""One distribution, `diffucode`, whose subpackages are the repository's top-level folders."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("diffucode.daemon", "diffucode.daemon.engine", "diffucode.daemon.rpc", "diffucode.daemon.serve",
               "diffucode.lsp", "diffucode.quantization")


def imported_from(pythonpath: str | None) -> dict[str, str]:
    code = ("import importlib, json, sys; print(json.dumps({m: importlib.import_module(m).__file__ "
            f"for m in {SUBPACKAGES!r} + ('diffucode.cli',)}}))")
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, **env}, cwd="/")
    import json
    return json.loads(out.stdout)


def test_installed_package_maps_the_folders():
    files = imported_from(None)
    assert Path(files["diffucode.daemon"]).name == "__init__.py"
    assert all(Path(f).exists() for f in files.values())


def test_a_regular_wheel_holds_and_imports_the_subpackages(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available in this environment")
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "dist").glob("diffucode-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("daemon/engine/network.py", "daemon/rpc/protocol.py", "daemon/serve/server.py", "lsp/__init__.py", "quantization/__init__.py", "cli.py"):
        assert f"diffucode/{module}" in names
    assert not any(n.startswith("tests/") for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    files = imported_from(str(tmp_path / "site"))
    assert all(f.startswith(str(tmp_path / "site")) for f in files.values()), files
