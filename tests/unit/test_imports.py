"""The import graph of the drekifs package, read from the sources with ``ast``: no circle, and
the layers import only downwards.

Every import counts, wherever it is written: at the top, inside a function (a lazy import is
still a dependency, and a circle through one still breaks when the order changes) or under
``if TYPE_CHECKING``. An edge goes to the module named, or, for ``from package import name``, to
the submodule ``package.name`` when there is one. Importing ``a.b.c`` also runs ``a`` and
``a.b``; those implicit edges are left out (every package's ``__init__`` imports nothing of
drekifs), so a circle here is one written in the code.

To add a layering rule, add a :class:`Forbidden` to :data:`RULES`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "drekifs"


@dataclass(frozen=True)
class Forbidden:
    """``importer`` (a module or package: it and everything below it) imports nothing from
    ``imported`` (likewise), but for the modules in ``unless``."""

    importer: str
    imported: str
    why: str
    unless: tuple[str, ...] = ()

    def breaks(self, source: str, target: str) -> bool:
        return (
            within(source, self.importer)
            and within(target, self.imported)
            and not any(within(source, u) for u in self.unless)
        )


RULES = [
    Forbidden(
        PACKAGE,
        "drekifs.app",
        "the app shell sits on top of the rest: only it and `python -m drekifs` import it",
        unless=("drekifs.app", "drekifs.__main__"),
    ),
    Forbidden(
        "drekifs.fs",
        "drekifs.cluster",
        "the filesystem reaches other nodes' stores through stores.remote.RemoteStore only",
    ),
    Forbidden(
        "drekifs.fs",
        "drekifs.stores.lmdb",
        "the filesystem serves any store through the interfaces of stores/, never LMDB's own",
    ),
    Forbidden(
        "drekifs.cluster",
        "drekifs.stores.lmdb",
        "replication and RPC use the store and replica interfaces, never LMDB's own",
    ),
    Forbidden("drekifs.cluster", "drekifs.fs", "the cluster knows nothing of FUSE"),
    Forbidden("drekifs.stores", "drekifs.fs", "stores know nothing of FUSE"),
    Forbidden("drekifs.stores", "drekifs.cluster", "stores know nothing of the peers"),
    *(
        Forbidden("drekifs.world", other, "the world is DNS turned into data, nothing more")
        for other in ("drekifs.fs", "drekifs.stores", "drekifs.cluster")
    ),
    Forbidden("drekifs.urn", PACKAGE, "the URN grammar stands alone", unless=("drekifs.urn",)),
]

# Imports inside functions in the app shell: each one is measured start-up time of a command
# that does not need the module (the comment at the import gives the number).
APP_LAZY_IMPORTS = {
    ("drekifs.app.cli", "drekifs.world.watch"),  # trio and dnspython: world and mount only
    ("drekifs.app.cli", "trio"),  # drekifs world
    ("drekifs.app.cli", "drekifs.app.daemon"),  # pyfuse3, trio, LMDB, the cluster: mount only
    ("drekifs.app.control", "trio"),  # the server; get/put/rm/ls use the client
}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


@dataclass(frozen=True)
class Import:
    target: str  # the module imported, absolute
    line: int
    in_function: bool


def imports_of(module: str, path: Path, modules: set[str]) -> Iterator[Import]:
    """The imports in ``module``'s source, resolved to absolute module names (those of the
    package resolved to one of ``modules``; others as written)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name, child.lineno, in_function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base_name = ".".join([*base, child.module] if child.module else base)
                else:
                    base_name = child.module or ""
                for alias in child.names:
                    sub = f"{base_name}.{alias.name}"
                    target = sub if sub in modules else base_name
                    yield Import(target, child.lineno, in_function)
            yield from visit(child, nested)

    yield from visit(tree, False)


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[Import]]]:
    """Module -> the package's modules it imports -> where."""
    files = module_files(root)
    modules = set(files)
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in files}
    for module, path in files.items():
        for imp in imports_of(module, path, modules):
            if imp.target in modules and imp.target != module:
                graph[module].setdefault(imp.target, []).append(imp)
    return graph


def cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_the_graph_is_read() -> None:
    """The reader sees what is there: a known top-level, relative and lazy import each."""
    graph = import_graph()
    assert "drekifs.app.options" in graph["drekifs.app.config"]  # from .options import ...
    assert "drekifs.datadir" in graph["drekifs.app.service"]  # from .. import datadir
    assert any(imp.in_function for imp in graph["drekifs.app.cli"]["drekifs.world.watch"])


def test_no_import_circle() -> None:
    graph = import_graph()
    found = cycles(graph)
    described = [
        " <-> ".join(c)
        + ": "
        + "; ".join(
            f"{a} imports {b} (line {graph[a][b][0].line})" for a in c for b in graph[a] if b in c
        )
        for c in found
    ]
    assert not found, "\n".join(described)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.importer}-not-{r.imported}")
def test_layering(rule: Forbidden) -> None:
    broken = [
        f"{source}:{imp.line} imports {target}"
        for source, targets in import_graph().items()
        for target, imps in targets.items()
        for imp in imps
        if rule.breaks(source, target)
    ]
    assert not broken, f"{rule.why}:\n" + "\n".join(broken)


def test_app_imports_at_the_top() -> None:
    """An import inside a function in the app shell is one measured and listed."""
    files = module_files()
    lazy = {
        (module, imp.target): imp.line
        for module, path in files.items()
        if within(module, "drekifs.app")
        for imp in imports_of(module, path, set(files))
        if imp.in_function
    }
    unlisted = {k: line for k, line in lazy.items() if k not in APP_LAZY_IMPORTS}
    assert not unlisted, f"imports inside functions, not measured: {unlisted}"
    assert set(lazy) == APP_LAZY_IMPORTS, "listed, but no longer lazy"


def test_the_product_imports_no_test_harness() -> None:
    """The simulations (tests/harness/) and fixtures stay out of what the daemon runs."""
    files = module_files()
    found = [
        f"{module}:{imp.line} imports {imp.target}"
        for module, path in files.items()
        for imp in imports_of(module, path, set(files))
        if within(imp.target, "tests") or within(imp.target, "conftest")
    ]
    assert not found, found
