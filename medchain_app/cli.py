"""The ``medchain`` console script.

Each capability registers its own subcommands from a small module that imports nothing
heavy at load time (handlers import what they need when they run), so ``medchain --help``
stays fast and a subcommand exists only once the issue that builds it has landed.
"""

from __future__ import annotations

import argparse
import sys

from medchain import commandline

__all__ = ["main", "COMMAND_MODULES"]

# module -> its register(subparsers) adds one or more subcommands
COMMAND_MODULES = ("medchain_app.keys", "medchain_app.demo", "edge_agent.commands", "scanner_sim.commands",
                   "models.cli", "ledger.commands", "cloud.commands", "cloud.access_commands",
                   "cloud.consent_commands")


def build_parser() -> argparse.ArgumentParser:
    return commandline.build_parser("medchain", "MedChain: scanners to cloud, sealed, on a permissioned ledger.",
                                    COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return commandline.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
