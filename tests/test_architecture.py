"""The import contract of docs/architecture.md, checked on the source (no import is executed).

The layer list is read from the ``text`` block under "## Layers" in docs/architecture.md, so the
page and the check cannot disagree: each line names the rooms of one level, top to bottom. Every
``import`` in the package counts, at any depth (a function-level import is still a dependency,
and the usual way a circle is hidden), and:

* no room imports a room of a higher level;
* rooms (top-level modules and subpackages) form no circle, and neither do modules;
* no module imports the package root (``arrow_quant_v2/__init__``: it imports the facades);
* the core (everything outside ``ui/``) never imports Panel, HoloViews or Bokeh;
* every room is on the page: a new module gets a line (or a place on one) there.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "arrow_quant_v2"
UI_LIBRARIES = {"panel", "holoviews", "bokeh"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Everything ``name`` imports (package modules, or top-level names of other packages)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from . import kernels` imports the module arrow_quant_v2.kernels
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    """``arrow_quant_v2.kernels.packing`` -> ``kernels``; the package root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _levels() -> List[Set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"## Layers\n.*?```text\n(.*?)```", text, re.S).group(1)
    levels = []
    for line in block.splitlines():
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        rooms = {n.strip().removeprefix("arrow_quant_v2/").removesuffix("/").removesuffix(".py")
                 for n in names.split(",")}
        levels.append({r for r in rooms if "/" not in r})  # app/main.py lives outside the package
    return levels


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` (as a path that ends where it starts), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


@pytest.fixture(scope="module")
def graph():
    return _graph()


def _internal(graph):
    return {m: {t for t in targets if t in graph} for m, targets in graph.items()}


def test_every_room_is_on_the_layer_list(graph):
    placed = set().union(*_levels())
    rooms = {_room(m) for m in graph} - {""}
    assert rooms <= placed, (f"modules missing from the layer list in docs/architecture.md: {sorted(rooms - placed)}; "
                             "add each on the line of the level it belongs to")
    assert placed <= rooms, f"docs/architecture.md lists rooms that do not exist: {sorted(placed - rooms)}"


def test_no_room_imports_a_higher_level(graph):
    level = {room: i for i, rooms in enumerate(_levels()) for room in rooms}
    upward = sorted(f"{m} imports {t}" for m, targets in _internal(graph).items() for t in targets
                    if _room(m) in level and _room(t) in level and level[_room(t)] < level[_room(m)])
    assert not upward, "imports that point up the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_nothing_imports_the_package_root(graph):
    assert not [m for m, targets in graph.items() if "arrow_quant_v2" in targets and m != "arrow_quant_v2"]


def test_no_import_circles_between_rooms_or_modules(graph):
    internal = _internal(graph)
    assert not (c := _cycle(internal)), "an import circle between modules: " + " -> ".join(c)
    rooms: Dict[str, Set[str]] = {}
    for m, targets in internal.items():
        rooms.setdefault(_room(m), set()).update(_room(t) for t in targets if _room(t) != _room(m))
    assert not (c := _cycle(rooms)), "an import circle between rooms: " + " -> ".join(c)


def test_the_core_never_imports_a_ui_library(graph):
    core = {m: {t.split(".")[0] for t in targets} & UI_LIBRARIES for m, targets in graph.items() if _room(m) != "ui"}
    assert not {m: libs for m, libs in core.items() if libs}


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The contract is only as good as the parser: a lazy import inside a function counts."""
    pkg = tmp_path / "arrow_quant_v2"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import b\nfrom ..sub import c\n")
    (pkg / "sub" / "c.py").write_text("import numpy\n")
    global ROOT, PACKAGE
    saved = ROOT, PACKAGE
    ROOT, PACKAGE = tmp_path, pkg
    try:
        g = _graph()
    finally:
        ROOT, PACKAGE = saved
    assert g["arrow_quant_v2.a"] == {"arrow_quant_v2.b"}
    assert g["arrow_quant_v2.sub"] == {"arrow_quant_v2.b", "arrow_quant_v2.sub.c"}
    assert _cycle(_internal(g)) == ["arrow_quant_v2.a", "arrow_quant_v2.b", "arrow_quant_v2.a"]
