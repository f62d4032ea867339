"""Running a command line built from packages' ``register(subparsers)`` functions: the one
place for logging set-up, argument types that refuse bad values at parse time (before any
network wait), and turning every failure into one line on stderr and an exit status (never a
traceback). The ``medchain`` command registers every package; a package may run its own
commands alone (``python -m ledger``), as the local cluster starts its validators.

Exit statuses: 0 done, 1 the command ran but did not succeed (it says why on stdout), 2 bad
input or our error (one line on stderr, argparse's usage errors included), 130 interrupted,
141 stdout closed early (``medchain ... | head``), as a process killed by SIGPIPE reports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medchain.errors import MedChainError

__all__ = ["build_parser", "run", "UsageError", "integer", "number", "port", "folder", "hex_bytes"]

QUIET_LOGGERS = ("pynetdicom", "onnxscript", "onnx_ir")  # they narrate every association / pass at INFO
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141
log = logging.getLogger("medchain.commandline")


class UsageError(MedChainError):
    """An argument that parses but does not fit what it names (a validator id the genesis
    does not have, ports past 65535): reported like a usage error, in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (its default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: a bad value is a usage error before the command starts --------------------


def integer(minimum: int | None = None, maximum: int | None = None, what: str = "a whole number"
            ) -> Callable[[str], int]:
    """An ``int`` argument type within ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what} {_range(minimum, maximum)}, got {value}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           what: str = "a number") -> Callable[[str], float]:
    """A finite ``float`` argument type, ``>= minimum`` (``> minimum`` with ``above``) and
    ``<= maximum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        low_bad = minimum is not None and (value <= minimum if above else value < minimum)
        if not math.isfinite(value) or low_bad or (maximum is not None and value > maximum):
            low = "" if minimum is None else f"{'>' if above else '>='} {minimum:g}"
            high = "" if maximum is None else f"<= {maximum:g}"
            raise argparse.ArgumentTypeError(f"expected {what} {' and '.join(p for p in (low, high) if p)}, "
                                             f"got {text}")
        return value

    return parse


def port(*, any_free: bool = False) -> Callable[[str], int]:
    """A TCP port, 1-65535 (or 0, meaning any free port, with ``any_free``)."""
    return integer(0 if any_free else 1, 65535, "a TCP port")


def folder(text: str) -> Path:
    """An existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'not a folder' if path.exists() else 'no such folder'}")
    return path


def hex_bytes(size: int | None = None) -> Callable[[str], bytes]:
    """Bytes written in hex (``size`` of them when given)."""

    def parse(text: str) -> bytes:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected hex digits, got {text!r}") from None
        if size is not None and len(raw) != size:
            raise argparse.ArgumentTypeError(f"expected {size} bytes ({2 * size} hex digits), got {len(raw)}")
        return raw

    return parse


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"from {minimum} to {maximum}"
    return f">= {minimum}" if minimum is not None else f"<= {maximum}"


# -- building and running ---------------------------------------------------------------------


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    _name_leaves(parser)
    return parser


def _name_leaves(parser: argparse.ArgumentParser) -> None:
    """Every command that runs learns its full name (``medchain ledger validator``), which
    prefixes its error line."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(_prog=parser.prog)
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            _name_leaves(child)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command and return its exit status."""
    try:
        status = _dispatch(parser, argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        _detach_stdout()
        return EXIT_BROKEN_PIPE


def _dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    name = getattr(args, "_prog", parser.prog)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MedChainError as exc:
        return _fail(name, str(exc))
    except OSError as exc:  # the environment refused: a file, a folder, a port, a host
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(name, where + (exc.strerror or str(exc)))
    except Exception as exc:  # a defect: still one line; the traceback with --log-level DEBUG
        log.debug("unexpected error", exc_info=True)
        return _fail(name, f"unexpected {type(exc).__name__}: {exc} (a defect; --log-level DEBUG shows "
                           "where)", status=1)


def _fail(name: str, message: str, status: int = EXIT_ERROR) -> int:
    print(f"{name}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return status


def _detach_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush finds nowhere to fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
