"""The package's import graph: no circle (module-level or inside functions) and the layering that
docs/design.md states (models, losses, ops and data know nothing of training or of each other).

The graph is read from the source (``ast``), so a lazy import inside a function counts as much as one
at the top: both tie the two modules together.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "detector"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports run only under a type checker
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_cycle_finder_sees_a_lazy_import_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LAYERS = {  # layer -> package modules it must not import (prefixes)
    "detector.ops": ["detector.data", "detector.models", "detector.losses", "detector.module", "detector.callbacks"],
    "detector.models": ["detector.data", "detector.losses", "detector.module", "detector.callbacks"],
    "detector.losses": ["detector.data", "detector.models", "detector.module", "detector.callbacks"],
    "detector.data": ["detector.models", "detector.losses", "detector.module", "detector.callbacks"],
    "detector.structures": ["detector."],
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layering(layer: str) -> None:
    bad = [
        f"{m} imports {t}"
        for m, ts in GRAPH.items()
        if m == layer or m.startswith(layer + ".")
        for t in ts
        if any(t == f or t.startswith(f) for f in LAYERS[layer])
    ]
    assert not bad, bad


@pytest.mark.parametrize("layer", ["detector.ops", "detector.models", "detector.losses", "detector.structures"])
def test_lightning_free(layer: str) -> None:
    """Models, losses and ops are plain torch: a fork can use them without Lightning."""
    bad = []
    for m, path in MODULES.items():
        if m == layer or m.startswith(layer + "."):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                bad += [f"{m}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not bad, bad
