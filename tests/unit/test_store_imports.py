"""Which way the imports point: the filesystem and the cluster know the stores by their
interfaces (stores/base.py, remote.py, replica.py, keys.py and the data types), never the LMDB
package (stores/lmdb) that implements them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "drekifs"


def imported(path: Path) -> set[str]:
    """Modules ``path`` imports, absolute (``drekifs.stores.lmdb``), relative ones resolved."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, *(node.module or "").split("."))).strip(".")
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


# The stores' interfaces and data types: what the filesystem and the cluster may know.
INTERFACES = {"base", "remote", "replica", "keys", "record", "version", "conflicts"}


@pytest.mark.parametrize("part", ["cluster", "fs"])
def test_cluster_and_fs_know_the_stores_by_their_interfaces_only(part: str) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE.parent)}: {module}"
        for path in sorted((PACKAGE / part).rglob("*.py"))
        for module in imported(path)
        if module.startswith("drekifs.stores.") and module.split(".")[2] not in INTERFACES
    }
    assert not wrong, sorted(wrong)
