"""Running a command line built from packages' ``register(subparsers)`` functions: one place
for logging set-up and for turning our errors into a one-line message and exit status 2
(never a traceback). The ``medchain`` command registers every package; a package may run its
own commands alone (``python -m ledger``), as the local cluster starts its validators."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from medchain.errors import MedChainError

__all__ = ["build_parser", "run"]

QUIET_LOGGERS = ("pynetdicom", "onnxscript", "onnx_ir")  # they narrate every association / pass at INFO


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except MedChainError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
