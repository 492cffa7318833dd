"""The rooms' boundaries, read from the source (an AST scan of every import, at the top of a module
or inside a function): the engine imports neither rpc nor serve; rpc and the language server
import no torch and no engine; and no two modules import each other, directly or round a loop."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# distribution package -> folder, as pyproject.toml maps them
FOLDERS = {"diffucode": REPO / "diffucode", "diffucode.daemon": REPO / "daemon", "diffucode.lsp": REPO / "lsp",
           "diffucode.quantization": REPO / "quantization", "diffucode.tune": REPO / "tune"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def walk(tree: ast.AST, runtime_only: bool):
    """ast.walk, leaving out `if TYPE_CHECKING:` blocks when runtime_only (they never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            typing_only = (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                           and child.test.id == "TYPE_CHECKING")
            if not (runtime_only and typing_only):
                todo.append(child)


def imports_of(name: str, path: Path, known: set[str], runtime_only: bool = False) -> set[str]:
    """Every module `name` imports (ours resolved to the module, others by their top name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in walk(ast.parse(path.read_text(), str(path)), runtime_only):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports a module; `from mod import name` the module itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            out.add(target if target.startswith("diffucode") else target.split(".")[0])
    return out


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}
RUNTIME = {name: imports_of(name, path, set(modules()), runtime_only=True) for name, path in modules().items()}


def in_room(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_the_scan_sees_the_rooms():
    assert "diffucode.daemon.engine.sampler" in GRAPH and "diffucode.daemon.rpc.protocol" in GRAPH
    # ranking.py names Tasks for its annotations only: in the full graph, not in what runs
    assert "diffucode.daemon.engine.tasks" in GRAPH["diffucode.daemon.engine.ranking"]
    assert "diffucode.daemon.engine.tasks" not in RUNTIME["diffucode.daemon.engine.ranking"]
    assert "torch" in GRAPH["diffucode.daemon.engine.network"]
    assert "diffucode.daemon.rpc.address" in GRAPH["diffucode.daemon.rpc.client"]


def test_engine_imports_neither_rpc_nor_serve():
    wrong = {(m, t) for m, ts in GRAPH.items() if in_room(m, "diffucode.daemon.engine") for t in ts
             if in_room(t, "diffucode.daemon.rpc") or in_room(t, "diffucode.daemon.serve")}
    assert not wrong


def test_rpc_and_lsp_import_no_torch_and_no_engine():
    for room in ("diffucode.daemon.rpc", "diffucode.lsp"):
        wrong = {(m, t) for m, ts in GRAPH.items() if in_room(m, room) for t in ts
                 if t == "torch" or in_room(t, "diffucode.daemon.engine") or in_room(t, "diffucode.daemon.serve")
                 or in_room(t, "diffucode.quantization")}
        assert not wrong, room


def test_tune_uses_the_engine_not_the_daemon_or_editor():
    """`diffucode tune` trains on the engine; it does not reach the sockets or the editor."""
    wrong = {(m, t) for m, ts in GRAPH.items() if in_room(m, "diffucode.tune") for t in ts
             if in_room(t, "diffucode.daemon.rpc") or in_room(t, "diffucode.daemon.serve") or in_room(t, "diffucode.lsp")}
    assert not wrong
    # and nothing the daemon serves with imports tune (its sandbox and trainer stay out of serving)
    assert not {m for m, ts in GRAPH.items() if in_room(m, "diffucode.daemon") for t in ts if in_room(t, "diffucode.tune")}


def test_no_import_cycles():
    # a package is imported before any of its modules, so a module's import of its own package
    # (`from diffucode import __version__`) cannot close a loop: those edges are left out
    # (imports under `if TYPE_CHECKING:` never run, so they cannot close a loop either)
    ours = {m: {t for t in ts if t in GRAPH and t != m and not m.startswith(t + ".")} for m, ts in RUNTIME.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(ours[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(ours):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_language_server_runs_without_torch():
    """What the scan says, at run time: starting the language server loads no torch."""
    code = "import sys, diffucode.lsp.handlers, diffucode.daemon.rpc.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
