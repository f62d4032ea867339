"""``python -m cloud ...``: the cloud's commands alone (what ``medchain cloud`` runs), so a
broker process starts without the application on top."""

import sys

from medchain import commandline

if __name__ == "__main__":
    sys.exit(commandline.run(commandline.build_parser("python -m cloud", "the cloud coordinator",
                                                     ["cloud.commands"])))
