"""The package layout: one subpackage per idea, data flowing one way, no import cycles.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in
a function body fails here as surely as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "densenets"
SUBPACKAGES = {"models", "efficient", "weights", "training", "analysis", "deploy", "cli"}
# What each subpackage may import from the others: the architecture's layers, bottom up.
# ``constants`` and ``device`` (one spelling and one resolver of --device) sit below everything:
# any layer may read them. ``factory`` (create_model) sits on models and weights only, so the
# training run builds its model through it like every other caller.
ALLOWED = {
    "models": {"efficient", "constants", "device"},
    "efficient": {"constants", "device"},
    "weights": {"models", "digest", "constants", "device"},
    "training": {"models", "weights", "digest", "factory", "constants", "device"},
    "analysis": {"models", "weights", "efficient", "training", "factory", "constants", "device"},
    "deploy": {"models", "weights", "constants", "device"},
    "cli": SUBPACKAGES | {"factory", "digest", "constants", "device", "__init__"},
    "constants": set(),
    "device": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["densenets", *parts])


def imports_of(path: Path) -> set[str]:
    """Every densenets module ``path`` imports, resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("densenets")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if not src.startswith("densenets"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module itself
                sub = f"{src}.{alias.name}"
                found.add(sub if MODULES.get(sub) else src)
    return found - {name}


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {d for d in imports_of(p) if d in MODULES} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_between_modules():
    # __init__ files re-export; a package importing its own __init__ is not a cycle worth naming
    graph = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_are_counted():
    # models.densenet reaches the memory-efficient path only from inside forward()
    assert "densenets.efficient.dispatch" in GRAPH["densenets.models.densenet"]


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_data_flows_one_way(sub):
    wrong = sorted(
        f"{m} imports {d}" for m, ds in GRAPH.items() if area(m) == sub
        for d in ds if area(d) != sub and area(d) not in ALLOWED[sub]
    )
    assert not wrong, wrong


def test_few_flat_modules_and_every_subpackage_says_what_it_holds():
    flat = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    # factory, digest, constants and device: each is read by several layers that must not
    # import each other to share it.
    assert len(flat) <= 4, flat
    for sub in SUBPACKAGES:
        init = PKG / sub / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init}: one docstring line saying what lives here"
    assert {p.parent.name for p in PKG.glob("*/__init__.py")} == SUBPACKAGES


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
