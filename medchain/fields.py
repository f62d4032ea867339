"""Field tables for wire messages: each field declared once; encoding, decoding and checks
follow from the declaration.

A message is a frozen dataclass whose wire fields are declared with :func:`wire`::

    @schema("prepare", MessageInvalid)
    @dataclass(frozen=True, slots=True)
    class Prepare:
        view: int = wire("v", UINT)
        digest: bytes = wire("d", Bytes(32))

:class:`Schema` reads the declarations once per class. ``encode`` gives the wire map;
``decode`` checks a decoded CBOR map (every field present, of its kind, no unknown key) and
builds the message. A codec checks and converts one value: lists become tuples, nested maps
become records (:class:`Record`), records become maps again on the way out. Whatever a peer
sends, decoding raises the schema's error type (``MessageInvalid`` for the ledger,
``ProtocolError`` for the protocol) naming the field and the problem, never the value, and
nothing else: no ``KeyError``, ``TypeError`` or ``ValueError`` escapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["Invalid", "Codec", "Int", "Bool", "Text", "Choice", "Bytes", "Hex", "Const",
           "Optional", "ListOf", "TupleOf", "Value", "Map", "Record", "Schema", "wire",
           "schema", "VALUE", "MAP", "BOOL", "BYTES", "TEXT", "MAX_DEPTH"]

T = TypeVar("T")
MAX_DEPTH = 64  # nesting a free-form value may have (cbor2 itself stops at 400)
_META = "medchain.wire"
_ABSENT = object()


class Invalid(Exception):
    """One value is not what its field declares; ``path`` locates it (``P[0].d``)."""

    def __init__(self, problem: str, path: str = ""):
        super().__init__(problem)
        self.problem, self.path = problem, path

    def within(self, prefix: str) -> Invalid:
        """The same problem, seen from the field or item ``prefix``."""
        path = self.path
        return Invalid(self.problem, prefix + ("." + path if path and path[0] != "[" else path))

    def __str__(self) -> str:
        return f"field '{self.path}' {self.problem}" if self.path else self.problem


class Codec:
    """Checks and converts one field's value. ``plain``: the wire value is the value itself,
    so encoding can skip :meth:`encode`."""

    plain: bool = True

    def decode(self, value: Any) -> Any:  # pragma: no cover - every codec overrides
        raise NotImplementedError

    def decode_all(self, values: list) -> tuple:
        """:meth:`decode` of every item of a list (codecs of small values loop faster)."""
        return tuple(map(self.decode, values))

    def encode(self, value: Any) -> Any:
        return value


class Int(Codec):
    """An integer (never a bool) in ``[lo, hi]``; ``None`` leaves that side open."""

    def __init__(self, lo: int | None = 0, hi: int | None = None):
        self.lo, self.hi = lo, hi
        self._lo = -math.inf if lo is None else lo  # ints compare exactly with infinities
        self._hi = math.inf if hi is None else hi
        bounds = ([f">= {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else [])
        self.problem = " ".join(["must be an integer", " and ".join(bounds)]).strip()

    def decode(self, value: Any) -> int:
        if type(value) is not int or not self._lo <= value <= self._hi:
            raise Invalid(self.problem)
        return value


class Bool(Codec):
    def decode(self, value: Any) -> bool:
        if type(value) is not bool:
            raise Invalid("must be a bool")
        return value


class Text(Codec):
    """A text string of ``min_len`` to ``max_len`` characters."""

    def __init__(self, min_len: int = 0, max_len: int | None = None):
        self.min_len, self.max_len = min_len, max_len
        self.problem = (f"must be a text of {min_len} to {max_len} characters" if max_len
                        else f"must be a text of at least {min_len} characters" if min_len
                        else "must be a text")

    def decode(self, value: Any) -> str:
        if (type(value) is not str or len(value) < self.min_len
                or (self.max_len is not None and len(value) > self.max_len)):
            raise Invalid(self.problem)
        return value


class Choice(Codec):
    """One of a closed set of texts."""

    def __init__(self, *choices: str):
        self.choices = frozenset(choices)
        self.problem = "must be one of " + ", ".join(repr(c) for c in choices)

    def decode(self, value: Any) -> str:
        if type(value) is not str or value not in self.choices:
            raise Invalid(self.problem)
        return value


class Bytes(Codec):
    """A byte string, of exactly ``size`` bytes when given."""

    def __init__(self, size: int | None = None):
        self.size = size
        self.problem = f"must be {size} bytes" if size is not None else "must be a byte string"

    def decode(self, value: Any) -> bytes:
        if type(value) is not bytes or (self.size is not None and len(value) != self.size):
            raise Invalid(self.problem)
        return value

    def decode_all(self, values: list) -> tuple:
        size = self.size
        for value in values:
            if type(value) is not bytes or (size is not None and len(value) != size):
                raise Invalid(self.problem)
        return tuple(values)


class Hex(Codec):
    """Bytes carried as lower-case hex text (for JSON files)."""

    plain = False

    def __init__(self, size: int):
        self.size = size
        self.problem = f"must be {size} bytes of hex"

    def decode(self, value: Any) -> bytes:
        if type(value) is not str or len(value) != 2 * self.size:
            raise Invalid(self.problem)
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise Invalid(self.problem) from None
        if len(raw) != self.size:  # fromhex skips spaces
            raise Invalid(self.problem)
        return raw

    def encode(self, value: bytes) -> str:
        return value.hex()


class Const(Codec):
    """A fixed value (a message's tag inside its body)."""

    def __init__(self, value: str | int):
        self.value = value
        self.problem = f"must be {value!r}"

    def decode(self, value: Any) -> Any:
        if type(value) is not type(self.value) or value != self.value:
            raise Invalid(self.problem)
        return value


class Optional(Codec):
    """``None`` or a value of ``inner``."""

    def __init__(self, inner: Codec):
        self.inner = inner
        self.plain = inner.plain

    def decode(self, value: Any) -> Any:
        return None if value is None else self.inner.decode(value)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


class ListOf(Codec):
    """A list of ``item`` values (a tuple in Python), at most ``limit`` long."""

    def __init__(self, item: Codec, limit: int | None = None):
        self.item, self.limit = item, limit
        self.plain = False
        self.problem = f"must be a list of at most {limit} items" if limit else "must be a list"

    def decode(self, value: Any) -> tuple:
        if type(value) is not list or (self.limit is not None and len(value) > self.limit):
            raise Invalid(self.problem)
        try:
            return self.item.decode_all(value)
        except Invalid:
            for i, item in enumerate(value):  # again, one by one, to say which item
                try:
                    self.item.decode(item)
                except Invalid as exc:
                    raise exc.within(f"[{i}]") from None
            raise  # pragma: no cover - a codec that fails only once

    def encode(self, value: Iterable) -> list:
        if self.item.plain:
            return list(value)
        encode = self.item.encode
        return [encode(x) for x in value]


class TupleOf(Codec):
    """A fixed-length list of values of different kinds (``[replica, signature]``)."""

    def __init__(self, *items: Codec):
        self.items = items
        self.plain = False
        self._plain_items = all(c.plain for c in items)
        self._decoders = tuple(c.decode for c in items)
        self._pair = self._decoders if len(items) == 2 else None
        self.problem = f"must be a list of {len(items)} items"

    def decode(self, value: Any) -> tuple:
        if type(value) is not list or len(value) != len(self.items):
            raise Invalid(self.problem)
        try:
            if self._pair is not None:  # [replica, signature], [rid, result]: the common case
                first, second = self._pair
                return first(value[0]), second(value[1])
            return tuple([decode(item) for decode, item in zip(self._decoders, value)])
        except Invalid:
            for i, (codec, item) in enumerate(zip(self.items, value)):  # say which item
                try:
                    codec.decode(item)
                except Invalid as exc:
                    raise exc.within(f"[{i}]") from None
            raise  # pragma: no cover - a codec that fails only once

    def decode_all(self, values: list) -> tuple:
        if self._pair is None:
            return super().decode_all(values)
        first, second = self._pair
        out = []
        for value in values:  # pairs inline: lists of them are long (results, signatures)
            if type(value) is not list or len(value) != 2:
                raise Invalid(self.problem)
            out.append((first(value[0]), second(value[1])))
        return tuple(out)

    def encode(self, value: Iterable) -> list:
        if self._plain_items:
            return list(value)
        return [c.encode(x) for c, x in zip(self.items, value)]


_LEAVES = frozenset({type(None), bool, int, str, bytes})


def _plain(value: Any, depth: int) -> bool:
    """True iff ``value`` has a canonical encoding (see :mod:`medchain.canonical`)."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            return False
        for key, item in value.items():  # leaves inline: most items are
            if type(key) is not str or (type(item) not in _LEAVES
                                        and not _plain(item, depth + 1)):
                return False
        return True
    if kind is list:
        if depth >= MAX_DEPTH:
            return False
        for item in value:
            if type(item) not in _LEAVES and not _plain(item, depth + 1):
                return False
        return True
    if kind in _LEAVES:
        return True
    return kind is float and math.isfinite(value)


class Value(Codec):
    """Any value with a canonical encoding: what decoded CBOR holds minus tags, non-text map
    keys, undefined and non-finite floats, nested at most :data:`MAX_DEPTH` deep."""

    problem = "must be a plain CBOR value"

    def decode(self, value: Any) -> Any:
        if not _plain(value, 0):
            raise Invalid(self.problem)
        return value


class Map(Value):
    """A text-keyed map of plain values (kept as the decoded dict)."""

    problem = "must be a map of plain CBOR values"

    def decode(self, value: Any) -> dict:
        if type(value) is not dict or not _plain(value, 0):
            raise Invalid(self.problem)
        return value


class Record(Codec):
    """A nested message with its own schema, as a map on the wire."""

    plain = False

    def __init__(self, cls: type):
        self.cls = cls

    def decode(self, value: Any) -> Any:
        return self.cls.SCHEMA.parse(value)

    def encode(self, value: Any) -> dict:
        return value.SCHEMA.encode(value)


VALUE, MAP, BOOL, BYTES, TEXT = Value(), Map(), Bool(), Bytes(), Text()


@dataclasses.dataclass(frozen=True, slots=True)
class _Wire:
    key: str
    codec: Codec
    signed: bool
    if_absent: Any


def wire(key: str, codec: Codec, *, default: Any = dataclasses.MISSING,
         default_factory: Any = dataclasses.MISSING, if_absent: Any = _ABSENT,
         signed: bool = True, compare: bool = True) -> Any:
    """Declare a dataclass field as the wire field ``key`` checked by ``codec``.

    ``default``/``default_factory`` are for building the message; on the wire the key is
    always written, and a decoder requires it unless ``if_absent`` gives the value to take
    (for files written before the field existed). ``signed=False`` leaves it out of
    :meth:`Schema.encode` with ``signed_only`` (bulk data bound by a signed hash, or the
    signature itself)."""
    return dataclasses.field(default=default, default_factory=default_factory, compare=compare,
                             metadata={_META: _Wire(key, codec, signed, if_absent)})


class Schema:
    """The wire form of one dataclass, derived from its :func:`wire` fields.

    ``tags`` are constant entries of the map (a body's kind); ``tolerate`` names keys a
    caller checks itself (a protocol message's ``v`` and ``type``); ``check`` is called with
    each decoded message for rules across fields; it raises :class:`Invalid` (or the
    caller's error type)."""

    def __init__(self, cls: type, name: str, error: type[Exception], *,
                 tags: dict[str, str | int] | None = None, tolerate: Iterable[str] = (),
                 check: Callable[[Any], None] | None = None):
        self.cls, self.name, self.error, self.check = cls, name, error, check
        params = [f for f in dataclasses.fields(cls) if f.init]
        specs = [(f.name, f.metadata[_META]) for f in params if _META in f.metadata]
        self._keys = tuple(w.key for _, w in specs)
        self._attrs = tuple(attr for attr, _ in specs)
        self._decoders = tuple(w.codec.decode for _, w in specs)
        self._fields = tuple(zip(self._keys, self._decoders))
        self._if_absent = tuple(w.if_absent for _, w in specs)
        self._all_required = all(a is _ABSENT for a in self._if_absent)
        self._encoders = tuple((w.key, attr, None if w.codec.plain else w.codec.encode)
                               for attr, w in specs)
        self._signed = tuple(e for e, (_, w) in zip(self._encoders, specs) if w.signed)
        self.tags = tuple((tags or {}).items())
        self.keys = frozenset(self._keys) | {k for k, _ in self.tags}
        self._tolerate = frozenset(tolerate)
        if len(self.keys) != len(specs) + len(self.tags):
            raise TypeError(f"{name}: two fields share a wire key")
        if tuple(f.name for f in params[:len(specs)]) != self._attrs:  # built by position
            raise TypeError(f"{name}: wire fields must come before the others")

    def encode(self, obj: Any, *, signed_only: bool = False) -> dict:
        """The wire map of ``obj`` (with ``signed_only``, of its signed fields)."""
        out = dict(self.tags)
        for key, attr, encode in (self._signed if signed_only else self._encoders):
            value = getattr(obj, attr)
            out[key] = value if encode is None else encode(value)
        return out

    def parse(self, d: Any, *rest: Any) -> Any:
        """Check the map ``d`` and build the message; ``rest`` are the values of the
        attributes after the wire fields that are not on the wire (a frame's signature).
        Raise :class:`Invalid`."""
        if type(d) is not dict:
            raise Invalid("must be a map")
        if self._all_required:
            values = []
            try:  # the common case in one loop; a failure is located below
                for key, decode in self._fields:
                    values.append(decode(d[key]))
            except (KeyError, Invalid):
                raise self._first_problem(d) from None
            present = len(values)
        else:
            values, present = self._with_absent(d)
        for key, tag in self.tags:
            value = d.get(key)
            if type(value) is not type(tag) or value != tag:
                raise Invalid(f"must be {tag!r}", key)
        if len(d) != present + len(self.tags):
            unknown = [k for k in d if k not in self.keys and k not in self._tolerate]
            if unknown:
                names = ", ".join(repr(k)[:40] for k in unknown[:3])
                raise Invalid(f"has unknown field(s) {names}")
        obj = self.cls(*values, *rest)
        if self.check is not None:
            self.check(obj)
        return obj

    def decode(self, d: Any, *rest: Any) -> Any:
        """:meth:`parse`, with a failure raised as the schema's error type."""
        try:
            return self.parse(d, *rest)
        except Invalid as exc:
            raise self.error(f"{self.name}: {exc}") from None

    def _first_problem(self, d: dict) -> Invalid:
        for key, decode in zip(self._keys, self._decoders):
            if key not in d:
                return Invalid("is missing", key)
            try:
                decode(d[key])
            except Invalid as exc:
                return exc.within(key)
        return Invalid("is malformed")  # pragma: no cover - a codec that fails only once

    def _with_absent(self, d: dict) -> tuple[list, int]:
        values, present = [], 0
        for key, decode, if_absent in zip(self._keys, self._decoders, self._if_absent):
            if key in d:
                try:
                    values.append(decode(d[key]))
                except Invalid as exc:
                    raise exc.within(key) from None
                present += 1
            elif if_absent is _ABSENT:
                raise Invalid("is missing", key)
            else:
                values.append(if_absent)
        return values, present


def schema(name: str, error: type[Exception], **options: Any) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass``): attach the class's :class:`Schema` as
    ``SCHEMA``."""

    def attach(cls: type[T]) -> type[T]:
        cls.SCHEMA = Schema(cls, name, error, **options)
        return cls

    return attach
