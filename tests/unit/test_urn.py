"""URN grammar: parsing, formatting, escaping, paths — examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drekifs.urn import (
    STATUS_STORE,
    URN,
    URNError,
    check_key_part,
    escape_key_part,
    unescape_key_part,
)

EXAMPLES = {
    "inf.random.sh": URN("inf.random.sh"),
    "inf.random.sh:eu:fr": URN("inf.random.sh", ("eu", "fr")),
    "inf.random.sh::global::motd": URN("inf.random.sh", (), "global", (b"motd",)),
    "inf.random.sh:eu:fr:scw:dc2:node3::local::facts/cpu": URN(
        "inf.random.sh", ("eu", "fr", "scw", "dc2", "node3"), "local", (b"facts", b"cpu")
    ),
    "inf.random.sh:eu::global": URN("inf.random.sh", ("eu",), "global"),
    "inf.random.sh::.dreki::pid": URN("inf.random.sh", (), STATUS_STORE, (b"pid",)),
}


@pytest.mark.parametrize("text", sorted(EXAMPLES))
def test_examples_parse_and_format(text: str) -> None:
    assert URN.parse(text) == EXAMPLES[text]
    assert str(EXAMPLES[text]) == text


def test_key_may_hold_colons() -> None:
    urn = URN.parse("w.test:eu::global::a:b::c/d")
    assert urn.store == "global"
    assert urn.key == (b"a:b::c", b"d")
    assert str(urn) == "w.test:eu::global::a:b::c/d"


def test_escaping() -> None:
    assert escape_key_part(b"100%") == "100%25"
    assert escape_key_part(b"a b") == "a b"
    assert escape_key_part(b"tab\there") == "tab%09here"
    assert escape_key_part("café".encode()) == "café"
    assert escape_key_part(b"\xff\xfe") == "%FF%FE"
    assert escape_key_part(b"caf\xc3") == "caf%C3"  # a cut UTF-8 sequence
    assert escape_key_part("\u200b".encode()) == "%E2%80%8B"  # not printable
    assert unescape_key_part("%41%2f") == b"A/"
    urn = URN.parse("w.test::global::x%0Ay")
    assert urn.key == (b"x\ny",)


def test_paths() -> None:
    urn = URN.parse("inf.random.sh:eu:fr:scw:dc2:node3::local::facts/cpu")
    assert urn.to_path("/dreki") == b"/dreki/eu/fr/scw/dc2/node3/local/facts/cpu"
    assert URN.parse("inf.random.sh").to_path("/dreki") == b"/dreki"
    parts = urn.path_parts()
    assert URN.from_path_parts("inf.random.sh", parts, {"global", "local"}) == urn
    status = URN.from_path_parts("inf.random.sh", [b".dreki", b"pid"], {"global", "local"})
    assert str(status) == "inf.random.sh::.dreki::pid"


BAD = [
    ("", "URN", "is empty"),
    ("Inf.random.sh", "world", "lower case"),
    ("inf.random.sh.", "world", "must not end with a dot"),
    ("inf..sh", "world", "not a DNS name"),
    ("inf.random.sh:eu:", "segment 2", "is empty"),
    ("inf.random.sh:eu:Fr", "segment 2", "not a member name"),
    ("inf.random.sh:.hidden", "segment 1", "starts with '.'"),
    ("inf.random.sh:eu::", "store", "is empty"),
    ("inf.random.sh:eu::Global", "store", "not a store name"),
    ("inf.random.sh:eu::.dreki", "store", "only at the world root"),
    ("inf.random.sh::global::", "key", "is empty"),
    ("inf.random.sh::global::a//b", "key part 2", "is empty"),
    ("inf.random.sh::global::a/../b", "key part 2", "relative path component"),
    ("inf.random.sh::global::a%2Fb", "key part 1", "contains '/'"),
    ("inf.random.sh::global::a%00", "key part 1", "NUL"),
    ("inf.random.sh::global::a%zz", "key part 1", "two hex digits"),
    ("inf.random.sh::global::" + "x" * 256, "key part 1", "256 bytes"),
]


@pytest.mark.parametrize("text,part,why", BAD)
def test_bad_urns_name_the_part_and_why(text: str, part: str, why: str) -> None:
    with pytest.raises(URNError) as info:
        URN.parse(text)
    assert info.value.part == part
    assert why in str(info.value)
    assert part in str(info.value)


# -- properties ----------------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9_](?:[a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
worlds = st.lists(labels, min_size=1, max_size=4).map(".".join)
segments = st.lists(labels, max_size=5).map(tuple)
stores = st.sampled_from(["global", "local", "facts", "x_1-2"])
key_parts = st.binary(min_size=1, max_size=40).filter(lambda b: check_key_part(b) is None)
keys = st.lists(key_parts, min_size=1, max_size=5).map(tuple)


@st.composite
def urns(draw) -> URN:
    world, segs = draw(worlds), draw(segments)
    if draw(st.booleans()):
        return URN(world, segs)
    store = draw(stores)
    return URN(world, segs, store, draw(keys) if draw(st.booleans()) else ())


@given(urns())
def test_text_round_trip(urn: URN) -> None:
    text = str(urn)
    assert URN.parse(text) == urn
    assert text.isprintable()


@given(urns())
def test_path_round_trip(urn: URN) -> None:
    stores_set = {"global", "local", "facts", "x_1-2"}
    assert URN.from_path_parts(urn.world, urn.path_parts(), stores_set) == urn


@given(st.binary(max_size=60))
def test_escape_round_trip(raw: bytes) -> None:
    text = escape_key_part(raw)
    assert unescape_key_part(text) == raw
    assert "/" not in text or b"/" in raw


@given(st.text(max_size=80))
def test_parse_never_crashes(text: str) -> None:
    try:
        urn = URN.parse(text)
    except URNError as e:
        assert e.part and e.reason
    else:
        assert URN.parse(str(urn)) == urn


def test_a_segment_is_never_a_store_name() -> None:
    with pytest.raises(URNError) as info:
        URN.parse("inf.random.sh:global")
    assert info.value.part == "segment 1" and "store name" in info.value.reason
