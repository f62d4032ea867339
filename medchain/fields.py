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

from medchain.canonical import MAX_DEPTH, is_plain

__all__ = ["Invalid", "Codec", "Int", "Bool", "Text", "Choice", "Bytes", "Hex", "Const",
           "Optional", "ListOf", "TupleOf", "MapOf", "Value", "Map", "Record", "Schema", "wire",
           "schema", "VALUE", "MAP", "BOOL", "BYTES", "TEXT", "MAX_DEPTH"]

T = TypeVar("T")
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

    def encode_all(self, values: Iterable) -> list:
        """:meth:`encode` of every item of a list."""
        encode = self.encode
        return [encode(value) for value in values]

    def inline(self, var: str) -> str | None:
        """A Python expression, true when the value in ``var`` is invalid, that a compiled
        :class:`Schema` runs instead of calling :meth:`decode`; ``None``: call it."""
        return None


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

    def inline(self, var: str) -> str:
        lo = "" if self.lo is None else f"{self.lo!r} <= "
        hi = "" if self.hi is None else f" <= {self.hi!r}"
        return f"type({var}) is not int" + (f" or not {lo}{var}{hi}" if lo or hi else "")


class Bool(Codec):
    def decode(self, value: Any) -> bool:
        if type(value) is not bool:
            raise Invalid("must be a bool")
        return value

    def inline(self, var: str) -> str:
        return f"type({var}) is not bool"


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

    def inline(self, var: str) -> str:
        if not self.min_len and self.max_len is None:
            return f"type({var}) is not str"
        hi = "" if self.max_len is None else f" <= {self.max_len!r}"
        return f"type({var}) is not str or not {self.min_len!r} <= len({var}){hi}"


class Choice(Codec):
    """One of a closed set of texts."""

    def __init__(self, *choices: str):
        self.choices = frozenset(choices)
        self.problem = "must be one of " + ", ".join(repr(c) for c in choices)

    def decode(self, value: Any) -> str:
        if type(value) is not str or value not in self.choices:
            raise Invalid(self.problem)
        return value

    def inline(self, var: str) -> str:
        return f"type({var}) is not str or {var} not in {tuple(sorted(self.choices))!r}"


class Bytes(Codec):
    """A byte string, of exactly ``size`` bytes when given."""

    def __init__(self, size: int | None = None):
        self.size = size
        self.problem = f"must be {size} bytes" if size is not None else "must be a byte string"

    def decode(self, value: Any) -> bytes:
        if type(value) is not bytes or (self.size is not None and len(value) != self.size):
            raise Invalid(self.problem)
        return value

    def inline(self, var: str) -> str:
        size = "" if self.size is None else f" or len({var}) != {self.size!r}"
        return f"type({var}) is not bytes{size}"

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
        return self.item.encode_all(value)


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

    def encode_all(self, values: Iterable) -> list:
        if self._plain_items:
            return [list(value) for value in values]
        return super().encode_all(values)


class MapOf(Codec):
    """A map whose keys are ``key`` values and whose values are ``value`` values (a dict in
    Python), at most ``limit`` entries."""

    def __init__(self, key: Codec, value: Codec, limit: int | None = None):
        self.key, self.value, self.limit = key, value, limit
        self.plain = key.plain and value.plain
        self.problem = f"must be a map of at most {limit} entries" if limit else "must be a map"

    def decode(self, value: Any) -> dict:
        if type(value) is not dict or (self.limit is not None and len(value) > self.limit):
            raise Invalid(self.problem)
        out = {}
        for k, v in value.items():
            try:
                k = self.key.decode(k)
            except Invalid as exc:
                raise Invalid(f"has a bad key: {exc.problem}") from None
            try:
                out[k] = self.value.decode(v)
            except Invalid as exc:
                raise exc.within(f"[{k!r}]") from None
        return out

    def encode(self, value: dict) -> dict:
        return {self.key.encode(k): self.value.encode(v) for k, v in value.items()}


class Value(Codec):
    """Any value with a canonical encoding (:func:`medchain.canonical.is_plain`): what decoded
    CBOR holds minus tags, non-text map keys, undefined and non-finite floats, nested at most
    :data:`MAX_DEPTH` deep."""

    problem = "must be a plain CBOR value"

    def decode(self, value: Any) -> Any:
        if not is_plain(value):
            raise Invalid(self.problem)
        return value


class Map(Value):
    """A text-keyed map of plain values (kept as the decoded dict)."""

    problem = "must be a map of plain CBOR values"

    def decode(self, value: Any) -> dict:
        if type(value) is not dict or not is_plain(value):
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
    omit: bool = False


def wire(key: str, codec: Codec, *, default: Any = dataclasses.MISSING,
         default_factory: Any = dataclasses.MISSING, if_absent: Any = _ABSENT,
         signed: bool = True, compare: bool = True, omit: bool = False) -> Any:
    """Declare a dataclass field as the wire field ``key`` checked by ``codec``.

    ``default``/``default_factory`` are for building the message; on the wire the key is
    always written, and a decoder requires it unless ``if_absent`` gives the value to take
    (for files written before the field existed). ``omit=True`` (which needs ``if_absent``)
    leaves the key out while the value equals ``if_absent``, so a field added later does not
    change the bytes (or the signed body) of a message that does not use it.
    ``signed=False`` leaves it out of ``Schema.encode_signed`` (bulk data bound by a signed
    hash, or the signature itself)."""
    if omit and if_absent is _ABSENT:
        raise TypeError(f"wire field {key!r}: omit=True needs if_absent (the value left out)")
    return dataclasses.field(default=default, default_factory=default_factory, compare=compare,
                             metadata={_META: _Wire(key, codec, signed, if_absent, omit)})


class Schema:
    """The wire form of one dataclass, derived from its :func:`wire` fields.

    ``tags`` are constant entries of the map (a body's kind); ``tolerate`` names keys a
    caller checks itself (a protocol message's ``v`` and ``type``); ``check`` is called with
    each decoded message for rules across fields; it raises :class:`Invalid` (or the
    caller's error type).

    ``encode``, ``encode_signed`` and ``parse`` are compiled from the table once, as
    dataclasses compiles ``__init__``: a message is encoded and checked at the speed of
    hand-written code (its source is in ``source``)."""

    def __init__(self, cls: type, name: str, error: type[Exception], *,
                 tags: dict[str, str | int] | None = None, tolerate: Iterable[str] = (),
                 check: Callable[[Any], None] | None = None):
        self.cls, self.name, self.error = cls, name, error
        params = [f for f in dataclasses.fields(cls) if f.init]
        specs = [(f.name, f.metadata[_META]) for f in params if _META in f.metadata]
        self._specs = specs
        self.tags = tuple((tags or {}).items())
        self.keys = frozenset(w.key for _, w in specs) | {k for k, _ in self.tags}
        self._tolerate = frozenset(tolerate)
        if len(self.keys) != len(specs) + len(self.tags):
            raise TypeError(f"{name}: two fields share a wire key")
        if tuple(f.name for f in params[:len(specs)]) != tuple(a for a, _ in specs):
            raise TypeError(f"{name}: wire fields must come before the others")  # by position
        self.source = self._compile(check)

    def decode(self, d: Any, *rest: Any) -> Any:
        """``parse(d, *rest)`` (check the map ``d`` and build the message; ``rest`` are the
        attributes after the wire fields that are not on the wire, a frame's signature), with
        a failure raised as the schema's error type."""
        try:
            return self.parse(d, *rest)
        except Invalid as exc:
            raise self.error(f"{self.name}: {exc}") from None

    def _compile(self, check: Callable[[Any], None] | None) -> str:
        ns: dict[str, Any] = {"Invalid": Invalid, "ABSENT": _ABSENT, "cls": self.cls,
                              "check": check, "problem": self._problem,
                              "unknown": self._unknown}
        out, out_signed, body = [], [], []
        omitted, omitted_signed = [], []  # lines writing an ``omit`` field unless it is absent
        for key, tag in self.tags:
            out.append(f"{key!r}: {tag!r}")
            body += [f"    t = d.get({key!r})",
                     f"    if type(t) is not {type(tag).__name__} or t != {tag!r}:",
                     f"        raise Invalid({'must be ' + repr(tag)!r}, {key!r})"]
        out_signed += out
        fields = []
        for i, (attr, w) in enumerate(self._specs):
            ns.update({f"dec{i}": w.codec.decode, f"enc{i}": w.codec.encode,
                       f"absent{i}": w.if_absent})
            value = f"obj.{attr}" if w.codec.plain else f"enc{i}(obj.{attr})"
            if w.omit:
                lines = [f"    if obj.{attr} != absent{i}:", f"        d[{w.key!r}] = {value}"]
                omitted += lines
                if w.signed:
                    omitted_signed += lines
            else:
                out.append(f"{w.key!r}: {value}")
                if w.signed:
                    out_signed.append(f"{w.key!r}: {value}")
            test = w.codec.inline(f"v{i}")
            if w.if_absent is not _ABSENT:
                fields += [f"        v{i} = d.get({w.key!r}, ABSENT)",
                           f"        if v{i} is ABSENT:",
                           f"            v{i} = absent{i}; absent += 1",
                           "        else:",
                           f"            v{i} = dec{i}(v{i})"]
                if w.omit:  # written only when not absent: one encoding per message
                    fields += [f"            if v{i} == absent{i}:",
                               "                raise Invalid('')"]
            elif test is None:
                fields.append(f"        v{i} = dec{i}(d[{w.key!r}])")
            else:
                fields += [f"        v{i} = d[{w.key!r}]",
                           f"        if {test}:",
                           "            raise Invalid('')"]
        values = "".join(f"v{i}, " for i in range(len(self._specs)))
        source = "\n".join([
            "def encode(obj):", f"    d = {{{', '.join(out)}}}", *omitted, "    return d",
            "def encode_signed(obj):", f"    d = {{{', '.join(out_signed)}}}", *omitted_signed,
            "    return d",
            "def parse(d, *rest):",
            "    if type(d) is not dict:",
            "        raise Invalid('must be a map')",
            "    absent = 0",
            "    try:", *(fields or ["        pass"]),
            "    except (KeyError, Invalid):",  # located and named by the slow path
            "        raise problem(d) from None",
            *body,
            f"    if len(d) != {len(self.keys)} - absent:",
            "        unknown(d)",
            f"    obj = cls({values}*rest)",
            *(["    check(obj)"] if check is not None else []),
            "    return obj", ""])
        exec(compile(source, f"<schema {self.name}>", "exec"), ns)  # noqa: S102 - our table
        self.encode: Callable[[Any], dict] = ns["encode"]
        self.encode_signed: Callable[[Any], dict] = ns["encode_signed"]
        self.parse: Callable[..., Any] = ns["parse"]
        return source

    def _problem(self, d: dict) -> Invalid:
        """The first field of ``d`` that is missing or malformed, located."""
        for _, w in self._specs:
            if w.key not in d:
                if w.if_absent is _ABSENT:
                    return Invalid("is missing", w.key)
                continue
            try:
                value = w.codec.decode(d[w.key])
            except Invalid as exc:
                return exc.within(w.key)
            if w.omit and value == w.if_absent:
                return Invalid(f"must be left out when it is {w.if_absent!r}", w.key)
        return Invalid("is malformed")  # pragma: no cover - a codec that fails only once

    def _unknown(self, d: dict) -> None:
        unknown = [k for k in d if k not in self.keys and k not in self._tolerate]
        if unknown:
            names = ", ".join(repr(k)[:40] for k in unknown[:3])
            raise Invalid(f"has unknown field(s) {names}")


def schema(name: str, error: type[Exception], **options: Any) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass``): attach the class's :class:`Schema` as
    ``SCHEMA``."""

    def attach(cls: type[T]) -> type[T]:
        cls.SCHEMA = Schema(cls, name, error, **options)
        return cls

    return attach
