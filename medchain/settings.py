"""Strict configuration files: TOML read into typed values with errors that name the place.

Shared by the edge's device profiles and the cloud's configuration, so both refuse a
misspelt key, a wrong type or an out-of-range value the same way.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

__all__ = ["Section", "ConfigFile", "read_toml"]


def read_toml(path: str | Path, error: type[Exception], what: str = "configuration") -> dict:
    """Parse a TOML file; a missing, unreadable or invalid file raises ``error``."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None


class Section:
    """Typed, strict access to one TOML table: every key must be read exactly once, so a
    misspelt key is an error rather than a silently ignored setting. Errors are raised as
    ``error`` (each package passes its own configuration error) and name file, table, key."""

    def __init__(self, origin: str, name: str, table: Any, base: Path,
                 error: type[Exception] = ValueError) -> None:
        if not isinstance(table, dict):
            raise error(f"{origin}: [{name}] must be a table")
        self.origin, self.name, self.table, self.base = origin, name, dict(table), base
        self.error = error

    def sub(self, key: str) -> Section:
        """The nested table ``key`` (empty when absent) as a section of its own."""
        return Section(self.origin, f"{self.name}.{key}", self._take(key, {}), self.base, self.error)

    def _fail(self, key: str, why: str) -> Exception:
        return self.error(f"{self.origin}: [{self.name}] {key}: {why}")

    def _take(self, key: str, default: Any = ...) -> Any:
        if key in self.table:
            return self.table.pop(key)
        if default is ...:
            raise self._fail(key, "missing")
        return default

    def str(self, key: str, default: Any = ..., *, choices: tuple[str, ...] = (), empty: bool = False) -> str:
        value = self._take(key, default)
        if not isinstance(value, str):
            raise self._fail(key, f"expected a string, got {type(value).__name__}")
        if not empty and not value.strip():
            raise self._fail(key, "must not be empty")
        if choices and value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def int(self, key: str, default: Any = ..., *, lo: int = 0, hi: int | None = None) -> int | None:
        value = self._take(key, default)
        if value is None and default is None:  # optional and absent (TOML has no null)
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"expected an integer, got {type(value).__name__}")
        if value < lo or (hi is not None and value > hi):
            raise self._fail(key, f"must be in [{lo}, {hi if hi is not None else 'inf'}]; got {value}")
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"expected true or false, got {type(value).__name__}")
        return value

    def num(self, key: str, default: Any = ...) -> float:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"expected a number, got {type(value).__name__}")
        return float(value)

    def list(self, key: str, kind: type, default: Any = ..., *, min_len: int = 0) -> list:
        value = self._take(key, default)
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise self._fail(key, f"expected a list of {kind.__name__}")
        if len(value) < min_len:
            raise self._fail(key, f"needs at least {min_len} entr{'y' if min_len == 1 else 'ies'}")
        return value

    def path(self, key: str, default: Any = ...) -> Path | None:
        value = self._take(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self._fail(key, "expected a non-empty path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def table_of(self, key: str) -> dict:
        return self._take(key, {})

    def done(self) -> None:
        if self.table:
            raise self.error(f"{self.origin}: [{self.name}] unknown key(s): {', '.join(sorted(self.table))}")


class ConfigFile:
    """A TOML file's tables, each taken once as a :class:`Section` (paths relative to the
    file's folder); ``done()`` refuses a table nobody took, as a section refuses a key."""

    def __init__(self, path: str | Path, error: type[Exception], what: str = "configuration") -> None:
        path = Path(path)
        self.raw, self.error = read_toml(path, error, what), error
        self.origin, self.base = str(path), path.resolve().parent

    def section(self, name: str) -> Section:
        if name not in self.raw:
            raise self.error(f"{self.origin}: section [{name}] missing")
        return Section(self.origin, name, self.raw.pop(name), self.base, self.error)

    def url(self, value: str) -> str:
        """A store URL: a scheme's as it is, a bare path relative to the file's folder."""
        return value if "://" in value else str(self.base / value)

    def done(self) -> None:
        if self.raw:
            raise self.error(f"{self.origin}: unknown section(s): {', '.join(sorted(self.raw))}")
