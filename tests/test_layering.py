"""The package's import structure: no loops, no arrow back up, every module importable
alone (a loop shows up only in some import orders)."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastbn"

# The functional API is the top of the computing layers: only the package itself, the
# module class built on it, and the tools that drive every path import it.
API_IMPORTERS = {"fastbn", "fastbn.module", "fastbn._warmup", "fastbn._bench"}


def _modules():
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _import_graph():
    """``{module: modules it imports}`` inside fastbn, imports inside functions included."""
    mods = _modules()
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name].update(t for t in targets if t in mods and t != name)
    return edges


def _reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_loops():
    edges = _import_graph()
    loops = sorted(m for m in edges if m in _reachable(edges, m) and m != "fastbn")
    # the package's __init__ is imported by every submodule's import; it may import them
    assert not loops, f"modules that import themselves through others: {loops}"


def test_nothing_below_imports_the_api():
    edges = _import_graph()
    importers = {m for m, targets in edges.items() if "fastbn.api" in targets}
    assert importers <= API_IMPORTERS, importers - API_IMPORTERS


def test_dask_imports_the_scalers_never_the_reverse():
    edges = _import_graph()
    assert "fastbn.scalers" in edges["fastbn.dask"]
    assert "fastbn.dask" not in _reachable(edges, "fastbn.scalers")


ALONE = sorted(m for m in _modules() if not m.endswith("__main__"))


def test_every_module_imports_alone():
    """Each module first in a fresh interpreter (one process per module)."""
    failures = {}
    for name in ALONE:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode:
            failures[name] = proc.stderr.strip().splitlines()[-1:]
    assert not failures, failures


def test_graph_sees_imports_inside_functions():
    """The loop these tests guard against was a lazy import: the graph must see one."""
    source = (PACKAGE / "_dask_graph.py").read_text()
    assert "    from ._dispatch import host_backend" in source  # inside a function
    assert "fastbn._dispatch" in _import_graph()["fastbn._dask_graph"]
