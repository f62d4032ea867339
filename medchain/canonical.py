"""One deterministic encoding for everything that is signed or hashed.

We use CBOR (RFC 8949) in its canonical form: shortest-form integers and floats, definite
lengths, map keys sorted length-first then bytewise (the RFC 7049 §3.9 canonical order that
``cbor2`` implements). Why CBOR rather than JSON: byte strings are native (a chunk digest or a
public key is signed as itself, never as base64 text), integers have exactly one encoding, and
the same codec serves the wire, so what is signed is what is sent.

Only a small, closed set of types is accepted so that two honest implementations cannot
disagree: ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``bytes``, lists/tuples of
those, and maps with ``str`` keys. Anything else is an :class:`EncodingError`, not a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cbor2

from medchain.errors import EncodingError

__all__ = ["canonical_bytes", "decode", "check_encodable", "is_plain", "MAX_DEPTH"]

MAX_DEPTH = 64  # nesting :func:`is_plain` accepts (cbor2 itself stops decoding at 400)
_LEAVES = frozenset({type(None), bool, int, str, bytes})


def is_plain(value: Any, _depth: int = 0) -> bool:
    """Whether ``value`` is made only of exact ``None``/``bool``/``int``/``str``/``bytes``,
    finite floats, lists and text-keyed dicts, nested at most :data:`MAX_DEPTH` deep: what a
    decoder may pass on as it is. A strict subset of what :func:`check_encodable` accepts,
    and several times faster (leaves are checked without a call)."""
    kind = type(value)
    if kind is dict:
        if _depth >= MAX_DEPTH:
            return False
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _LEAVES
                                        and not is_plain(item, _depth + 1)):
                return False
        return True
    if kind is list:
        if _depth >= MAX_DEPTH:
            return False
        for item in value:
            if type(item) not in _LEAVES and not is_plain(item, _depth + 1):
                return False
        return True
    if kind in _LEAVES:
        return True
    return kind is float and math.isfinite(value)


def check_encodable(value: Any, _path: str = "$") -> None:
    """Raise :class:`EncodingError` naming the first value that has no canonical encoding."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncodingError(f"{_path}: non-finite float has no canonical encoding")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_encodable(item, f"{_path}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{_path}: map key {key!r} is not a str")
            check_encodable(item, f"{_path}.{key}")
        return
    raise EncodingError(f"{_path}: type {type(value).__name__} has no canonical encoding")


def canonical_bytes(value: Any, *, check: bool = True) -> bytes:
    """Encode ``value`` as canonical CBOR; equal values always give equal bytes.

    ``check=False`` skips the type walk for values the caller assembled itself from parts
    already checked (the walk costs more than the encoding on large nested values)."""
    if check and not is_plain(value):  # the fast walk; the full one accepts tuples, Mappings
        check_encodable(value)
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes) -> Any:
    """Decode CBOR bytes; raises :class:`EncodingError` on anything malformed."""
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError) as exc:
        raise EncodingError(f"malformed CBOR: {exc}") from None
