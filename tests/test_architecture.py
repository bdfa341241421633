"""The layout's two rules, read from the source: no import loop between cxrdiff's modules, and no module
importing another module's private (`_name`) names. Imports inside functions count as well."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cxrdiff"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module → [(imported cxrdiff module, name or '')] for every import statement in it."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, str]]] = {m: [] for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxrdiff"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found[name].append((sub, "") if sub in modules else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                found[name] += [(a.name, "") for a in node.names if a.name.startswith("cxrdiff")]
    return found


def test_no_private_name_is_imported_from_another_module():
    taken = [f"{m} takes {target}.{name}" for m, items in _imports().items() for target, name in items
             if name.startswith("_") and not name.startswith("__") and target != m]  # fmt: skip
    assert not taken, taken


def test_no_import_loops():
    """A module never reaches itself through the modules it imports (a package's __init__, which only
    re-exports its submodules, counts only as the target of an import, not as importing them)."""
    graph = {m: {t for t, _ in items if t != m} for m, items in _imports().items() if not _is_package(m)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loops.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, loops


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()
