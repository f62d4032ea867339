"""``python -m ledger ...``: the ledger's commands alone (what ``medchain ledger`` runs), so the
local cluster starts its validators without the application on top."""

import sys

from medchain import commandline

if __name__ == "__main__":
    sys.exit(commandline.run(commandline.build_parser("python -m ledger", "the permissioned PBFT ledger",
                                                      ["ledger.commands"])))
