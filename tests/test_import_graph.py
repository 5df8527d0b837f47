"""No import cycle among rlx's modules.

The graph: one node per module of rlx/ (a package is its `__init__.py`), and an edge A -> B for every
`import B` / `from B import x` in A's source that names an rlx module, **wherever it stands**: top level,
inside a function, or in a try block. Function-level imports count because a deferred import is the usual
way a cycle is hidden rather than removed (`rlx/instruments/base.py` once imported the instrument catalog
inside `registered_instruments`, while every instrument imports base): the modules still depend on each
other. Not counted: imports under `if TYPE_CHECKING:` (never executed), and the implicit import of a parent
package that Python performs before a submodule (`import rlx.a.b` runs `rlx/a/__init__.py`; every package
re-exporting its submodules would otherwise be a cycle). `from P import x` is an edge to module `P.x` when
that is a module of rlx, else to `P`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Known cycles, tolerated until broken: one import edge (importer, imported) per cycle, the one that runs
# against the layering, left out of the graph. Delete an entry when its import goes; the test fails on an
# entry whose import no longer exists, so the list cannot outlive the cycles.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, this: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement outside `if TYPE_CHECKING:` blocks."""
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = this.split(".") if is_package else this.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "rlx").rglob("*.py"))
    modules = {module_name(f): f for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, names in _imports(tree, name, path.name == "__init__.py"):
            for dep in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                if dep in modules and dep != name:
                    graph[name].add(dep)
    # The instrument catalog imports every module of its package at run time (importlib), invisible to `ast`.
    from rlx.instruments.catalog import instrument_modules

    graph["rlx.instruments.catalog"].update(instrument_modules())
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    return comps


def test_the_graph_sees_function_level_and_relative_imports():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import rlx.a\n"
        "from . import b\n"
        "from .c import d\n"
        "if TYPE_CHECKING:\n"
        "    import rlx.hidden\n"
        "def f():\n"
        "    from rlx.e import g\n"
    )
    got = _imports(tree, "rlx.pkg.mod", is_package=False)
    assert [m for m, _ in got] == ["typing", "rlx.a", "rlx.pkg", "rlx.pkg.c", "rlx.e"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_rlx_has_no_import_cycle():
    graph = import_graph()
    stale = [e for e in ALLOWED_EDGES if e[1] not in graph.get(e[0], set())]
    assert not stale, f"ALLOWED_EDGES lists imports that no longer exist (delete them): {stale}"
    for a, b in ALLOWED_EDGES:
        graph[a].discard(b)
    cycles = strongly_connected(graph)
    assert not cycles, (
        "import cycles among rlx modules (each set imports itself through the others): "
        + "; ".join(", ".join(sorted(c)) for c in cycles)
    )


def test_the_instrument_base_does_not_reach_the_catalog():
    """Every instrument imports the seam (rlx/instruments/base.py), so the seam reaches neither the catalog that
    lists them nor any of them; the factory (`rlx.run`) imports the catalog."""
    graph = import_graph()
    seen, todo = set(), ["rlx.instruments.base"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert "rlx.instruments.catalog" not in seen
    assert "rlx.instruments.catalog" in graph["rlx.run"]


PURE_MATH = ("rlx.algorithms", "rlx.regularizers")
"""Packages of pure functions over tensors: they reach no trainer, instrument or TRL (docs/design.md)."""


def test_the_math_packages_reach_no_trainer_instrument_or_trl():
    graph = import_graph()
    pure = [m for m in graph if m.split(".")[:2] in [p.split(".") for p in PURE_MATH]]
    assert pure, "no module found under the pure-math packages"
    for start in pure:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        bad = sorted(m for m in seen if m.startswith(("rlx.trainers", "rlx.instruments")))
        assert not bad, (
            f"{start} (pure math) imports {bad}: move the code that needs them to rlx/instruments/"
        )
        for m in seen:
            path = ROOT / (m.replace(".", "/") + ".py")
            if not path.exists():
                path = ROOT / m.replace(".", "/") / "__init__.py"
            deps = {
                t.split(".")[0]
                for t, _ in _imports(ast.parse(path.read_text()), m, path.name == "__init__.py")
            }
            assert not deps & {"trl", "transformers"}, (
                f"{m}, reached from {start}, imports {deps & {'trl', 'transformers'}}"
            )


def test_the_instrument_catalog_imports_every_module_of_its_package():
    """A new instrument is a module or subpackage under rlx/instruments/ and nothing else: the catalog finds it.
    Every registered built-in instrument comes from a module the catalog lists."""
    import sys

    from rlx.instruments.catalog import NOT_INSTRUMENT_MODULES, instrument_modules, registered_instruments

    here = ROOT / "rlx" / "instruments"
    on_disk = {p.stem for p in here.glob("*.py")} | {p.parent.name for p in here.glob("*/__init__.py")}
    on_disk -= {"__init__", *NOT_INSTRUMENT_MODULES}
    listed = instrument_modules()
    assert sorted(m.rsplit(".", 1)[1] for m in listed) == sorted(on_disk)
    assert all(m in sys.modules for m in listed)
    registry = registered_instruments()
    assert {"grad_alignment", "relax", "entropy_cov", "activations"} <= set(registry)
    for cls in registry.values():
        if cls.__module__.startswith("rlx.instruments"):
            assert any(cls.__module__ == m or cls.__module__.startswith(m + ".") for m in listed), cls
