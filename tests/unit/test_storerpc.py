"""The store.* RPC service and client, over an in-process network (the wire is tested in
test_transport and test_cluster): errnos as locally, paged listings, staged large values."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from drekifs.cluster.net import PeerUnreachable, RemoteError
from drekifs.cluster.storerpc import CHUNK, PAGE, StoreClient, StoreService
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import DIR, FILE, StoreError

NODE = "b.w.test"
OWNER = ("127.0.0.2", 7000)


class DirectNet:
    """Calls go straight to the registered handlers, through msgpack like the real thing."""

    def __init__(self) -> None:
        self.addr = ("127.0.0.1", 7000)
        self.handlers: dict[str, Any] = {}
        self.up = True

    def register(self, method: str, handler: Any, *, inline: bool = False) -> None:
        self.handlers[method] = handler

    async def call(self, to: Any, method: str, args: Any, *, timeout: float) -> Any:
        import msgpack

        if not self.up:
            raise PeerUnreachable("down")
        args = msgpack.unpackb(msgpack.packb(args), raw=False)
        handler = self.handlers.get(method)
        if handler is None:
            raise RemoteError(errno.ENOSYS, method)
        reply = await handler(self.addr, args)
        return msgpack.unpackb(msgpack.packb(reply), raw=False)


@pytest.fixture
def remote(tmp_path: Path):
    store = LmdbStore("local", tmp_path / "local", peer="b", replicated=False, max_value=8 << 20)
    net = DirectNet()
    StoreService(NODE, {"local": store}).register(net)  # type: ignore[arg-type]
    client = StoreClient(net, NODE, "local", lambda: OWNER)  # type: ignore[arg-type]
    return store, net, client


async def code_of(coro) -> int:
    with pytest.raises(StoreError) as info:
        await coro
    return info.value.errno


async def test_errnos_as_locally(remote) -> None:
    store, net, client = remote
    await client.create((b"d",), DIR, 0o755, 0, 0)
    rec = await client.create((b"d", b"f"), FILE, 0o644, 0, 0)
    assert await code_of(client.create((b"d", b"f"), FILE, 0o644, 0, 0)) == errno.EEXIST
    assert await code_of(client.stat((b"nope",))) == errno.ENOENT
    assert await code_of(client.remove((b"d",), is_dir=True)) == errno.ENOTEMPTY
    assert await code_of(client.children((b"d", b"f"))) == errno.ENOTDIR
    put = await client.put((b"d", b"f"), rec.eid, b"hello")
    assert put is not None and put.size == 5
    assert store.read(rec.eid) == b"hello"
    assert await client.read(rec.eid, 1, 3) == b"ell"
    assert await code_of(client.put((b"d", b"f"), rec.eid, bytes(9 << 20))) == errno.EFBIG
    parts, again = await client.locate(rec.eid)
    assert parts == (b"d", b"f") and again.eid == rec.eid
    net.up = False
    assert await code_of(client.stat((b"d",))) == errno.EHOSTDOWN
    dead = StoreClient(net, NODE, "local", lambda: None)  # type: ignore[arg-type]
    assert await code_of(dead.stat(())) == errno.EHOSTDOWN


async def test_a_durable_put_is_on_disk_when_answered(remote) -> None:
    """What a close() of another node's file waits for: the bytes in a committed LMDB
    transaction on the owner, with the create before them."""
    store, _, client = remote
    rec = await client.create((b"f",), FILE, 0o644, 0, 0)
    await client.put((b"f",), rec.eid, b"in memory")
    assert store.committed < store.changes  # the group commit would take it later
    await client.put((b"f",), rec.eid, b"on disk", durable=True)
    assert store.committed == store.changes  # (a SIGKILL of the owner: test_remote_writes)


async def test_paged_listing_and_staged_value(remote) -> None:
    store, _, client = remote
    for i in range(PAGE * 2 + 5):
        store.create(NODE, (f"k{i:05}".encode(),), FILE, 0o644, 0, 0)
    names = [name for name, _ in await client.children(())]
    assert len(names) == PAGE * 2 + 5 and names == sorted(names)
    rec = store.get(NODE, (b"k00000",))
    assert rec is not None
    big = bytes(range(256)) * (3 * CHUNK // 256 + 7)
    await client.put((b"k00000",), rec.eid, big)
    assert await client.read(rec.eid, 0, len(big)) == big


async def test_bad_arguments_are_einval(remote) -> None:
    _, net, _ = remote
    cases = [
        ({"s": "local", "k": "notalist"}, errno.EINVAL),
        ({"s": "local", "k": [b".."]}, errno.EINVAL),
        ("x", errno.EINVAL),
        ({"s": 3}, errno.ENOENT),  # no store of that name
        ({"s": "local", "kind": 7, "k": [b"f"], "perm": 0, "uid": 0, "gid": 0}, errno.EINVAL),
    ]
    for args, code in cases:
        method = "store.create" if isinstance(args, dict) and "kind" in args else "store.stat"
        with pytest.raises(RemoteError) as info:
            await net.call(OWNER, method, args, timeout=1)
        assert info.value.code == code, args
    with pytest.raises(RemoteError) as info:
        await net.call(OWNER, "store.stat", {"s": "global", "k": []}, timeout=1)
    assert info.value.code == errno.ENOENT
