"""The ground the wire protocol stands on: its version, topic prefix and sizes, the field
checks every message parser uses (each failure a :class:`ProtocolError` naming the field),
and the base of the small signed messages. :mod:`medchain.protocol` and its parts import it;
nothing else needs to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from medchain.errors import ProtocolError

__all__ = ["VERSION", "TOPIC_PREFIX", "DIGEST_SIZE", "MAX_CHUNKS", "get_field", "nonneg",
           "fixed_bytes", "bounded_list", "as_map", "Signed"]

VERSION = 1
TOPIC_PREFIX = f"medchain/v{VERSION}"
DIGEST_SIZE = 32
MAX_CHUNKS = 1 << 20  # far above any real object; bounds what a parser will allocate


# -- field checking -------------------------------------------------------------------------


def get_field(msg: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in msg:
        raise ProtocolError(f"{where}: missing field '{key}'")
    value = msg[key]
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(
            f"{where}: field '{key}' must be {names}, got {type(value).__name__}"
        )
    return value


def nonneg(msg: Mapping, key: str, where: str) -> int:
    value = get_field(msg, key, int, where)
    if value < 0:
        raise ProtocolError(f"{where}: field '{key}' must be >= 0, got {value}")
    return value


def fixed_bytes(msg: Mapping, key: str, size: int, where: str) -> bytes:
    value = get_field(msg, key, bytes, where)
    if len(value) != size:
        raise ProtocolError(f"{where}: field '{key}' must be {size} bytes, got {len(value)}")
    return value


def bounded_list(msg: Mapping, key: str, where: str, limit: int = MAX_CHUNKS) -> list:
    value = get_field(msg, key, list, where)
    if len(value) > limit:
        raise ProtocolError(f"{where}: field '{key}' has {len(value)} items, limit {limit}")
    return value


def as_map(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
    return value


# -- signed control messages ----------------------------------------------------------------


class Signed:
    """Shared by small messages that carry an Ed25519 signature over their other fields."""

    DOMAIN: ClassVar[str]

    def body(self) -> dict:
        raise NotImplementedError

    def to_wire(self) -> dict:
        return {**self.body(), "signature": self.signature}

    def signed(self, key) -> Any:
        """A copy signed with ``key`` (a :class:`medchain.identity.SigningKey`)."""
        return dataclasses.replace(self, signature=key.sign(self.DOMAIN, self.body()))

    def verify(self, public) -> None:
        """Raise :class:`VerificationError` unless signed by ``public`` (a ``VerifyKey``)."""
        public.verify(self.DOMAIN, self.body(), self.signature)
