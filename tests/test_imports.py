"""The package's import graph: no cycles, and no import against the layering.

Read with `ast` only (nothing is imported), so every import counts, the ones
inside functions included: a cycle hidden behind a function-local import is
still a cycle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "insightv_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# importer prefix -> imported prefixes it must not reach
FORBIDDEN = {
    f"{PACKAGE}.models": ("data", "train", "sample", "pipeline", "eval"),
    f"{PACKAGE}.data": ("models",),
    f"{PACKAGE}.sample": ("train",),
}
# no module of the package imports these
NOBODY_IMPORTS = (f"{PACKAGE}.cli",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` refers to: itself, or the nearest enclosing
    module (`pkg.mod.attr` -> `pkg.mod`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import submodule` imports the submodule; `from mod import
            # attr` imports mod.
            names = [f"{stem}.{alias.name}" for alias in node.names] or [stem]
            names = [n if n in modules else stem for n in names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_graph_is_read(tmp_path):
    graph = _graph()
    assert f"{PACKAGE}.checkpoint" in graph
    assert f"{PACKAGE}.models.llava" in graph[f"{PACKAGE}.models.factory"]
    # relative and function-local imports count; `pkg.mod.attr` is `pkg.mod`
    sub = tmp_path / PACKAGE / "sub"
    sub.mkdir(parents=True)
    files = {
        f"{PACKAGE}": (tmp_path / PACKAGE / "__init__.py", ""),
        f"{PACKAGE}.top": (tmp_path / PACKAGE / "top.py", "import json\n"),
        f"{PACKAGE}.sub": (sub / "__init__.py", "from . import a\n"),
        f"{PACKAGE}.sub.a": (
            sub / "a.py",
            "def f():\n    from .b import g\n    from .. import top\n",
        ),
        f"{PACKAGE}.sub.b": (sub / "b.py", f"import {PACKAGE}.top.x\n"),
    }
    for path, text in files.values():
        path.write_text(text)
    modules = {name: path for name, (path, _) in files.items()}
    toy = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert toy[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.a"}
    assert toy[f"{PACKAGE}.sub.a"] == {f"{PACKAGE}.sub.b", f"{PACKAGE}.top"}
    assert toy[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.top"}
    assert _cycles(toy) == []
    assert _cycles({**toy, f"{PACKAGE}.top": {f"{PACKAGE}.sub.a"}}) == [
        [f"{PACKAGE}.sub.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.top"]
    ]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_layering():
    bad = []
    for module, targets in sorted(_graph().items()):
        for target in sorted(targets):
            for importer, banned in FORBIDDEN.items():
                if _within(module, importer) and any(
                    _within(target, f"{PACKAGE}.{b}") for b in banned
                ):
                    bad.append(f"{module} -> {target}")
            if any(_within(target, n) for n in NOBODY_IMPORTS):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
