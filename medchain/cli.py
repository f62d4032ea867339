"""The ``medchain`` console script.

Each capability registers its own subcommands from a small module that imports nothing
heavy at load time (handlers import what they need when they run), so ``medchain --help``
stays fast and a subcommand exists only once the issue that builds it has landed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medchain.errors import MedChainError

__all__ = ["main", "COMMAND_MODULES"]

# module -> its register(subparsers) adds one or more subcommands
COMMAND_MODULES = ("medchain.keys", "medchain.demo", "edge_agent.commands", "scanner_sim.commands",
                   "models.cli", "ledger.commands", "cloud.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medchain",
        description="MedChain: scanners to cloud, sealed, on a permissioned ledger.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "DEBUG":  # these narrate every association / export pass at INFO
        for noisy in ("pynetdicom", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except MedChainError as exc:
        print(f"medchain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
