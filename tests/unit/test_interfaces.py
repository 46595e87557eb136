"""Every implementation answers its interface in full, with the interface's own signatures.

The Protocols are not checked at run time (nor by a type checker in CI): this is what keeps a
tree or a store from missing a request, or taking its arguments in another order.
"""

from __future__ import annotations

import inspect

import pytest

from drekifs.cluster.storerpc import StoreClient
from drekifs.fs.localstores import LocalStores
from drekifs.fs.remotestores import RemoteStores
from drekifs.fs.tree import Tree
from drekifs.fs.worlddirs import WorldDirs
from drekifs.stores.base import Store
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.remote import RemoteStore
from drekifs.stores.replica import Replica


def members(proto: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(proto).items()
        if callable(fn) and not name.startswith("_")
    }


def check(impl: type, proto: type) -> None:
    for name, wanted in members(proto).items():
        fn = getattr(impl, name, None)
        assert fn is not None, f"{impl.__name__} lacks {name}"
        got = inspect.signature(fn)
        assert list(got.parameters) == list(wanted.parameters), (impl.__name__, name)
        assert inspect.iscoroutinefunction(fn) == inspect.iscoroutinefunction(
            getattr(proto, name)
        ), (impl.__name__, name, "async or not")
    source = inspect.getsource(impl)
    for attr in getattr(proto, "__annotations__", {}):  # data attributes, set in __init__
        assert f"self.{attr} =" in source, (impl.__name__, attr)


@pytest.mark.parametrize("tree", [WorldDirs, LocalStores, RemoteStores])
def test_every_tree_answers_every_request(tree: type) -> None:
    check(tree, Tree)


def test_the_rpc_client_is_a_remote_store() -> None:
    check(StoreClient, RemoteStore)


def test_the_lmdb_store_is_a_store_and_a_replica() -> None:
    check(LmdbStore, Store)
    check(LmdbStore, Replica)
