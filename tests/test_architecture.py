"""The import graph, computed from the source: no cycle, and layers import only downwards.

The layer order is written once, here (docs/architecture.md draws it). Every
import counts: module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pushsvc"

#: Lowest first. A module may import its own layer's modules and any lower layer's.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("version", "config"),
    ("protocol",),
    ("store", "broker", "cluster"),
    ("ops",),
    ("auth",),
    ("delivery", "push"),
    ("plugin",),
    ("core",),
    ("transport", "http"),
    ("app", "cli", "client", "__main__", "api", "__init__", "scaffold"),
    ("testing", "pytest_plugin"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """Every pushsvc module ``path`` imports (``from pushsvc.x import y`` counts y if a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pushsvc"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("pushsvc"):
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def test_every_package_has_a_layer() -> None:
    assert {layer(m) for m in MODULES} <= set(RANK), set(map(layer, MODULES)) - set(RANK)


def test_no_import_reaches_a_higher_layer() -> None:
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if target in MODULES and RANK[layer(target)] > RANK[layer(module)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("plugin", sorted((ROOT / "plugins").glob("*.py")))
def test_built_in_plugins_use_only_the_public_api(plugin: Path) -> None:
    private = sorted(target for target in imports(plugin) if target != "pushsvc")
    assert not private, f"{plugin.name} imports {private}: use `from pushsvc import ...`"
