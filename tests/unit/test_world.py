"""From zone files to worlds: the resolver, world errors, snapshots and rendering."""

from __future__ import annotations

import json
from pathlib import Path

import dns.zone
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.app.cli import demo_zone
from drekifs.world import model, snapshot
from drekifs.world.render import render_errors, render_json, render_tree
from drekifs.world.resolve import SourceError, resolve_sync
from drekifs.world.sources import ZoneAnswers, world_from_zone

from ..worlds import BROKEN_VALID_PATHS, Zone, broken_world, small_world


def world_of(zone: Zone, **kw) -> model.World:
    z = dns.zone.from_text(zone.text(), origin=zone.origin, relativize=False, check_origin=False)
    return resolve_sync(zone.origin, ZoneAnswers(z), **kw)


def paths(world: model.World) -> set[str]:
    return {"/".join(loc.segments) for loc in world.locations() if loc.segments}


def kinds(world: model.World) -> list[str]:
    return sorted(e.kind for e in world.errors)


def test_demo_world_is_the_drawing() -> None:
    world = world_from_zone(demo_zone())
    assert world.domain == "inf.random.sh"
    assert world.errors == []
    nodes = {"/".join(loc.segments) for loc in world.locations() if loc.is_node}
    assert nodes == {
        "eu/fr/ovh/sbg1/node1",
        "eu/fr/ovh/rbx1/node2",
        "eu/fr/scw/dc2/node3",
        "eu/fr/scw/dc5/node4",
        "eu/de/hzn/fsn1/node6",
        "eu/ch/exo/gnv/node5",
    }
    node3 = world.nodes["node3.dc2.scw.fr.eu.inf.random.sh"]
    assert str(node3.address) == "localhost:7103"
    assert node3.peer_id == node3.name
    assert world.friendly("eu.inf.random.sh") == "Europe"


def test_node_listed_by_two_regions_appears_under_both() -> None:
    world = world_of(small_world())
    assert {"eu/shared", "eu/fr/shared"} <= paths(world)
    assert world.paths_of("shared.w.test") == [("eu", "fr", "shared"), ("eu", "shared")]
    assert world.errors == []


def test_every_world_error_is_named_and_the_rest_served() -> None:
    world = world_of(broken_world())
    assert paths(world) == BROKEN_VALID_PATHS
    assert kinds(world) == sorted(
        [
            "cycle",
            "dangling",
            "reserved-name",
            "dot-name",
            "sibling-clash",
            "contradictory",
            "malformed",
        ]
    )
    text = render_errors(world)
    for expected in [
        "cycle eu.b.test -> fr.eu.b.test -> eu.b.test",
        "ghost.eu.b.test (listed by eu.b.test) has no drekifs records",
        "member global.fr.eu.b.test of fr.eu.b.test",
        "'.hidden' starts with '.'",
        "web1.a.us.b.test, web1.b.us.b.test",
        "both.us.b.test is both a node",
        "nameonly.us.b.test has _name._dreki records but no _node._dreki SRV",
    ]:
        assert expected in text, text


def test_self_loop_and_root_in_a_cycle() -> None:
    zone = Zone("c.test").region("@", ["a"]).region("a", ["a", "@", "n"]).node("n")
    world = world_of(zone)
    assert paths(world) == {"a", "a/n"}
    assert kinds(world) == ["cycle", "cycle"]


def test_contradictory_and_malformed_records() -> None:
    zone = (
        Zone("m.test")
        .region("@", ["n1", "n2", "n3", "r"])
        .node("n1", peer_id="same")
        .node("n2", peer_id="same")
        .raw('_name._dreki.n1 IN TXT "one"')
        .raw('_name._dreki.n1 IN TXT "uno"')
        .raw("_node._dreki.n3 IN SRV 0 0 0 localhost.")
        .raw("_dreki.r IN SRV 0 0 1 .")
    )
    world = world_of(zone)
    text = render_errors(world)
    assert "n1.m.test has 2 different _name._dreki TXT records" in text
    assert "share the peer id 'same'" in text
    assert "_node._dreki SRV of n3.m.test has port 0" in text
    assert "_dreki SRV of r.m.test has target '.'" in text
    assert world.nodes["n1.m.test"].friendly == "one"
    assert paths(world) == {"n1", "n2", "n3", "r"}


def test_empty_or_missing_world_root() -> None:
    world = world_of(Zone("e.test"))
    assert world.nodes == {} and kinds(world) == ["dangling"]
    assert "world root e.test has no _dreki" in render_errors(world)


def test_too_many_names_is_an_error_not_a_hang() -> None:
    zone = Zone("big.test").region("@", [f"n{i}" for i in range(50)])
    for i in range(50):
        zone.node(f"n{i}")
    world = world_of(zone, max_names=20)
    assert len(world.nodes) == 19
    assert "too-large" in kinds(world)


def test_multiple_srv_targets_best_first() -> None:
    zone = (
        Zone("s.test")
        .region("@", ["n"])
        .raw("_node._dreki.n IN SRV 20 0 7001 b.example.")
        .raw("_node._dreki.n IN SRV 10 5 7002 a.example.")
    )
    node = world_of(zone).nodes["n.s.test"]
    assert [str(a) for a in node.addresses] == ["a.example:7002", "b.example:7001"]


def test_uppercase_and_cname() -> None:
    zone = (
        Zone("u.test")
        .raw("_dreki IN SRV 0 0 1 WEB.u.test.")
        .raw("_node._dreki.web IN CNAME real.u.test.")
        .raw("real IN SRV 0 0 7009 host.example.")
    )
    world = world_of(zone)
    assert paths(world) == {"web"}
    assert str(world.nodes["web.u.test"].address) == "host.example:7009"


def test_zone_file_errors_are_source_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zone"
    bad.write_text("$ORIGIN x.test.\n@ IN SOA broken\n")
    for path, world, expected in [
        (bad, None, "bad.zone"),
        (tmp_path / "missing.zone", None, "does not exist"),
    ]:
        try:
            world_from_zone(path, world)
        except SourceError as e:
            assert expected in str(e)
        else:
            raise AssertionError("no SourceError")
    no_origin = tmp_path / "noorigin.zone"
    no_origin.write_text("@ 60 IN TXT hello\n")
    try:
        world_from_zone(no_origin)
    except SourceError as e:
        assert "--world" in str(e)
    assert world_from_zone(no_origin, "given.test").domain == "given.test"


def test_json_round_trip_and_render() -> None:
    world = world_of(small_world())
    again = model.World.from_json(json.loads(json.dumps(world.to_json())))
    assert again.same_shape(world) and again.errors == world.errors
    tree = render_tree(world)
    assert '└── shared  "Listed twice"  localhost:7004  [shared.w.test]' in tree
    data = json.loads(render_json(world))
    assert {"path": "eu/fr/web1", "name": "web1.fr.eu.w.test", "node": True} in data["paths"]


def test_snapshot_mtimes_move_only_where_entries_change(tmp_path: Path) -> None:
    w1 = world_of(small_world())
    s1 = snapshot.advance(None, w1, 1000.0)
    assert set(s1.changed_ns.values()) == {1000 * 10**9}
    w2 = world_of(small_world().region("de.eu", ["db9.de.eu"]).node("db9.de.eu"))
    s2 = snapshot.advance(s1, w2, 2000.0)
    changed = {p for p, t in s2.changed_ns.items() if t == 2000 * 10**9}
    assert changed == {"eu/de", "eu/de/db9"}
    snapshot.save(tmp_path, s2)
    loaded = snapshot.load(tmp_path)
    assert loaded is not None and loaded.changed_ns == s2.changed_ns
    assert loaded.world.same_shape(w2)
    (tmp_path / "world.json").write_text("{not json")
    assert snapshot.load(tmp_path) is None


# -- a property: any graph of records resolves to a servable tree --------------------------------

names = st.sampled_from([f"m{i}" for i in range(8)] + ["global", "\\.x", "bad!", "M3"])


@st.composite
def random_zones(draw) -> Zone:
    zone = Zone("p.test")
    zone.region("@", draw(st.lists(names, max_size=4)))
    for i in range(8):
        what = draw(st.sampled_from(["region", "node", "both", "none", "name-only"]))
        name = f"m{i}"
        if what in ("region", "both"):
            zone.region(name, draw(st.lists(names, max_size=4)), draw(st.none() | st.just("R")))
        if what in ("node", "both"):
            zone.node(name, draw(st.integers(0, 3)))
        if what == "name-only":
            zone.raw(f'_name._dreki.{name} IN TXT "x"')
    return zone


@settings(max_examples=150, deadline=None)
@given(random_zones())
def test_any_zone_resolves_to_a_servable_tree(zone: Zone) -> None:
    world = world_of(zone)
    # Every directory name is valid, siblings are unique, and the walk ends (no cycle).
    for loc in world.locations(limit=10_000):
        dirnames = [d for d, _ in world.children(loc.name)]
        assert len(dirnames) == len(set(dirnames))
        for d in dirnames:
            assert d not in ("global", "local") and not d.startswith(".")
        assert len(loc.segments) <= 10
    again = model.World.from_json(json.loads(json.dumps(world.to_json())))
    assert again.same_shape(world)


def test_clash_with_an_invalid_full_name_and_root_node_records() -> None:
    zone = (
        Zone("k.test")
        .raw("_dreki IN SRV 0 0 1 web.a.k.test.")
        .raw("_dreki IN SRV 0 0 1 web.b\\032c.k.test.")
        .raw("_node._dreki IN SRV 0 0 7000 localhost.")
        .node("web.a")
        .node("web.b\\032c")
    )
    world = world_of(zone)
    assert paths(world) == {"web.a.k.test"}
    assert kinds(world) == ["bad-name", "contradictory", "sibling-clash"]
    assert "the world root k.test has node records" in render_errors(world)


def test_too_large_is_reported_once() -> None:
    zone = Zone("t.test").region("@", [f"n{i}" for i in range(30)])
    for i in range(30):
        zone.node(f"n{i}")
    assert kinds(world_of(zone, max_names=10)) == ["too-large"]
