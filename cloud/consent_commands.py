"""``medchain consent set|revoke|history --config cloud.toml --patient TOKEN [--purpose P]``:
a patient's consent as a ledger record (``CONSENT_SET``), effective for every access decision
committed after it, and its full history. TOKEN is the patient's pseudonym as the edge keys
it; nothing here sees an MRN (a registrar at the site turns an MRN into the token with
``medchain edge pseudonym``). Signed by a registrar principal (``--name N --key K``), or by
``[ledger] operator_key`` when none is named; the operator and the registrar roles may file
consent, and only a registrar or an auditor may read the history: the read is itself an
``AUDIT_READ`` on the patient's trail. Output is JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["register"]

PURPOSES = ["diagnosis", "research", "training", "sharing"]


def _operator(args):
    """The ledger client that signs: the named principal's (a registrar), else the operator's."""
    from cloud.access_commands import signer_client

    return signer_client(args.config, args.name, args.key, f"consent {args.action}")


def _set(args: argparse.Namespace, granted: bool) -> int:
    from ledger.transactions import ConsentSet

    now = int(time.time() * 1000)
    expires = now + int(args.days * 86_400_000) if granted and args.days else 0
    with _operator(args) as ledger:
        result = ledger.submit(ConsentSet(args.patient, args.purpose, granted, now, expires))
    print(json.dumps({"patient": args.patient, "purpose": args.purpose, "granted": granted,
                      "expires_ms": expires or None, "committed": result.committed,
                      "height": result.height if result.committed else None,
                      "reason": result.reason or None}, sort_keys=True), flush=True)
    return 0 if result.committed else 3


def _history(args: argparse.Namespace) -> int:
    with _operator(args) as ledger:
        consent = ledger.consent(args.patient)
    for entry in consent["history"]:
        if args.purpose is None or entry["purpose"] == args.purpose:
            print(json.dumps({"purpose": entry["purpose"], "granted": entry["granted"],
                              "time_ms": entry["time_ms"], "expires_ms": entry["expires_ms"] or None,
                              "height": entry["height"], "by": entry["by"]}, sort_keys=True), flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    consent = sub.add_parser("consent", help="a patient's consent per purpose on the ledger: set, revoke, history")
    actions = consent.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in (("set", "grant consent for a purpose (optionally for --days)"),
                           ("revoke", "revoke consent for a purpose"),
                           ("history", "every consent change for the patient, oldest first")):
        p = actions.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True, help="cloud.toml (its [ledger] genesis; its "
                                                                  "operator_key signs unless --name/--key)")
        p.add_argument("--name", help="the principal who signs (a registrar; history: a registrar or auditor)")
        p.add_argument("--key", type=Path, help="that principal's Ed25519 key file")
        p.add_argument("--patient", required=True, help="the patient's pseudonym token (as the edge keys it)")
        p.add_argument("--purpose", choices=PURPOSES, required=name != "history")
        if name == "set":
            p.add_argument("--days", type=float, help="consent expires after this many days")
            p.set_defaults(func=lambda a: _set(a, True))
        elif name == "revoke":
            p.set_defaults(func=lambda a: _set(a, False))
        else:
            p.set_defaults(func=_history)
