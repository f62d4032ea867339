"""Canonical CBOR: one encoding per value, and a clear refusal of what has none."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medchain.canonical import canonical_bytes, check_encodable, decode, is_plain
from medchain.errors import EncodingError

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=40) | st.floats(allow_nan=False, allow_infinity=False)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_round_trip_and_reencoding_is_stable(value):
    data = canonical_bytes(value)
    assert canonical_bytes(decode(data)) == data


@given(st.dictionaries(st.text(max_size=8), st.integers(), min_size=2, max_size=8), st.randoms())
def test_map_order_does_not_change_bytes(mapping, rnd):
    items = list(mapping.items())
    rnd.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(mapping)


def test_known_encoding():
    # length-first key order: "b" < "aa"; ints in shortest form; bytes as a byte string
    assert canonical_bytes({"aa": 1, "b": b"\x01"}).hex() == "a261624101626161" + "01"


@pytest.mark.parametrize("bad", [math.nan, math.inf, {1: "int key"}, {"s": {1, 2}}, object()])
def test_values_without_canonical_form_are_refused(bad):
    with pytest.raises(EncodingError):
        canonical_bytes(bad)


def test_malformed_cbor_is_an_encoding_error():
    with pytest.raises(EncodingError):
        decode(b"\xa2\x61")


@given(values)
def test_plain_values_are_encodable_and_what_decoding_gives(value):
    assert is_plain(decode(canonical_bytes(value)))
    if is_plain(value):
        check_encodable(value)  # the fast walk never lets through what the full one refuses


def test_the_fast_walk_leaves_tuples_and_mappings_to_the_full_one():
    from types import MappingProxyType

    assert not is_plain((1,)) and not is_plain(MappingProxyType({"a": 1}))
    assert canonical_bytes((1,)) == canonical_bytes([1])
    assert canonical_bytes(MappingProxyType({"a": 1})) == canonical_bytes({"a": 1})
    for bad in (math.nan, {1: 2}, [{"a": {1, 2}}]):
        assert not is_plain(bad)
        with pytest.raises(EncodingError):
            canonical_bytes(bad)
