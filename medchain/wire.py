"""The ground the wire protocol stands on: its version, topic prefix and sizes, its field
codecs, and the bases of its messages (each declares its fields once with
:func:`medchain.fields.wire`; see :mod:`medchain.fields`). :mod:`medchain.protocol` and its
parts import it; nothing else needs to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from medchain.errors import ProtocolError
from medchain.fields import Bytes, Int, Schema

__all__ = ["VERSION", "TOPIC_PREFIX", "DIGEST_SIZE", "MAX_CHUNKS", "NONNEG", "INT", "DIGEST",
           "message", "record", "Wire", "Signed"]

VERSION = 1
TOPIC_PREFIX = f"medchain/v{VERSION}"
DIGEST_SIZE = 32
MAX_CHUNKS = 1 << 20  # far above any real object; bounds what a parser will allocate

NONNEG = Int(0)
INT = Int(None)
DIGEST = Bytes(DIGEST_SIZE)

W = TypeVar("W")


def record(name: str, **options: Any) -> Callable[[type[W]], type[W]]:
    """Class decorator (above ``@dataclass``): the schema of a map inside a message, named
    ``name`` in errors."""

    def attach(cls: type[W]) -> type[W]:
        cls.SCHEMA = Schema(cls, name, ProtocolError, **options)
        return cls

    return attach


def message(name: str, **options: Any) -> Callable[[type[W]], type[W]]:
    """:func:`record` for a whole message, whose map also holds ``v`` and ``type`` (checked
    by :func:`medchain.protocol.decode_message`)."""
    return record(name, tolerate=("v", "type"), **options)


class Wire:
    """A value with a field table: its wire map and its checked parse."""

    __slots__ = ()
    SCHEMA: ClassVar[Schema]

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls: type[W], msg: Any) -> W:
        """Parse a decoded map; :class:`ProtocolError` names the field and the problem."""
        return cls.SCHEMA.decode(msg)


class Signed(Wire):
    """A message that carries an Ed25519 signature over its signed fields (those declared
    without ``signed=False``) under its ``DOMAIN``."""

    __slots__ = ()
    DOMAIN: ClassVar[str]

    def body(self) -> dict:
        return self.SCHEMA.encode_signed(self)

    def signed(self, key) -> Any:
        """A copy signed with ``key`` (a :class:`medchain.identity.SigningKey`)."""
        return dataclasses.replace(self, signature=key.sign(self.DOMAIN, self.body()))

    def verify(self, public) -> None:
        """Raise :class:`VerificationError` unless signed by ``public`` (a ``VerifyKey``)."""
        public.verify(self.DOMAIN, self.body(), self.signature)
