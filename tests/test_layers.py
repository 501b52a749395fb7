"""The package's layers point one way (docs/architecture.md), checked on the source of every module.

A module may import its own package and any package of a lower layer, never one of its own layer or
above: at module top and inside functions alike. A function-local `jaxem` import is allowed only to
defer a heavy dependency, and says so with a comment containing 'deferred' on the line before (or on
the import line). No two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxem"

# Lowest first. Inside the middle layer (metrics ... plan) the order is what keeps it acyclic.
LAYERS = (
    {"__init__", "errors", "xla"},              # utilities
    {"config"},                                 # experiment configs
    {"data", "models"},                         # volumes and networks
    {"metrics"},                                # pure scoring
    {"segment"},                                # probabilities -> instances
    {"semi"},                                   # loss add-ons for unlabelled data
    {"train"},                                  # steps, the loop, checkpoints
    {"ssl", "infer", "plan"},                   # built on training
    {"protocols"},                              # experiment drivers: predict -> segment -> score -> report
    {"commands", "cli"},                        # the command line
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """'jaxem.train.loop' -> 'train'; 'jaxem.cli' -> 'cli'; 'jaxem' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def jaxem_imports(path: Path):
    """(imported module, line, is function-local) for every import of a jaxem module in `path`."""
    tree = ast.parse(path.read_text())
    module = module_name(path)
    is_package = path.name == "__init__.py"
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "jaxem"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix.split(".")[0] != "jaxem":
                continue
            targets = [resolve(prefix, alias.name) for alias in node.names]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in local


def resolve(prefix: str, name: str) -> str:
    """`from prefix import name`: the submodule prefix.name when it is one, else prefix."""
    candidate = f"{prefix}.{name}"
    relative = Path(*candidate.split(".")[1:])
    if (ROOT / relative).with_suffix(".py").exists() or (ROOT / relative / "__init__.py").exists():
        return candidate
    return prefix


def modules():
    return sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {package_of(module_name(p)) for p in modules()}
    assert packages <= set(RANK), f"packages without a layer in LAYERS: {packages - set(RANK)}"


def test_no_import_points_up_or_sideways():
    wrong = []
    for path in modules():
        here = package_of(module_name(path))
        for target, line, _ in jaxem_imports(path):
            there = package_of(target)
            if there != here and there != "__init__" and RANK[there] >= RANK[here]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}, layer {RANK[here]}) imports {target} "
                             f"({there}, layer {RANK[there]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_function_local_imports_say_why():
    unexplained = []
    for path in modules():
        lines = path.read_text().splitlines()
        for target, line, is_local in jaxem_imports(path):
            if is_local and not says_deferred(lines, line - 1):
                unexplained.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} inside a function")
    assert not unexplained, ("function-local imports without a '# deferred: <why>' comment (import at module "
                             "top instead):\n" + "\n".join(unexplained))


def says_deferred(lines: list[str], index: int) -> bool:
    """Whether line `index` (0-based), or the comment heading its block of imports, says 'deferred'."""
    if "deferred" in lines[index].lower():
        return True
    i = index - 1
    while i >= 0 and lines[i].strip().startswith(("from ", "import ", "#", ")")) or (i >= 0 and lines[i].startswith(" " * 8)
                                                                                      and lines[i].rstrip().endswith(",")):
        if lines[i].strip().startswith("#") and "deferred" in lines[i].lower():
            return True
        i -= 1
    return False


def test_no_import_cycles():
    graph = {module_name(p): set() for p in modules()}
    for path in modules():
        for target, _, _ in jaxem_imports(path):
            if target in graph and target != module_name(path):
                graph[module_name(path)].add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("source,check,expected", [
    ("def f():\n    from jaxem.data import volume\n", "test_function_local_imports_say_why", "inside a function"),
    ("from jaxem.protocols import isbi2012\n", "test_no_import_points_up_or_sideways", "imports against the layers"),
    ("from jaxem.metrics import wrong_way\n", "test_no_import_cycles", "import cycle"),
])
def test_the_checks_catch_a_wrong_way_import(tmp_path, monkeypatch, source, check, expected):
    """A metrics module with an unexplained local import, an upward import or a self-import fails."""
    fake_root = tmp_path / "jaxem"
    for path in modules():
        target = fake_root / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake_root / "metrics" / "wrong_way.py").write_text(source)
    (fake_root / "metrics" / "other_way.py").write_text("from jaxem.metrics import wrong_way\n")
    if "wrong_way" in source:  # a two-module cycle
        (fake_root / "metrics" / "wrong_way.py").write_text("from jaxem.metrics import other_way\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    with pytest.raises(AssertionError, match=expected):
        globals()[check]()


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
