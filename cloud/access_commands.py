"""``medchain access request|status|fetch|audit`` (a person, with its own keys) and
``medchain principal add|revoke|list`` (the operator signs ``PRINCIPAL_SET``).

Output is JSON lines, one per image or principal. Imports nothing heavy at load time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "operator_client", "signer_client"]


def _print(obj) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def _request(args: argparse.Namespace) -> int:
    from cloud.access import load_access_config, open_requester

    if not args.image and not args.study and not args.series:
        raise SystemExit("access request: name --image ID..., --study UID... or --series UID...")
    with open_requester(load_access_config(args.config), args.key) as requester:
        decisions = requester.request(args.image, args.purpose) if args.image else []
        for study in args.study or []:
            decisions += requester.request_study(study, args.purpose)
        for series in args.series or []:
            decisions += requester.request_series(series, args.purpose)
    for d in decisions:
        _print({"image": d.envelope_id, "granted": d.granted, "reason": d.reason, "audit": d.audit_id})
    return 0 if decisions and all(d.granted for d in decisions) else 3


def _status(args: argparse.Namespace) -> int:
    from cloud.access import load_access_config, open_requester

    with open_requester(load_access_config(args.config), args.key) as requester:
        entries = requester.status()
    for e in entries:
        _print({"audit": e["id"], "image": e["image"].hex() if e["image"] else None, "purpose": e["purpose"], "action": e["action"],
                "granted": e["granted"], "reason": e["reason"], "t": e["t"], "by": e["by"],
                "validators": len(e["signatures"])})
    return 0


def _audit(args: argparse.Namespace) -> int:
    """An audit trail as the ledger holds it: a principal's (one's own, or anyone's for an
    auditor), or a patient token's or an image's (an auditor's; the read is itself filed as
    ``AUDIT_READ`` on that trail first, and is its last entry)."""
    from cloud.access import load_access_config
    from ledger.client import LedgerClient
    from medchain.identity import SigningKey

    config = load_access_config(args.config)
    which = {"user": args.user, "patient": args.patient,
             "image": bytes.fromhex(args.image) if args.image else None}
    with LedgerClient(config.genesis, SigningKey.load(args.key or config.key), config.name) as ledger:
        entries = ledger.audit(**which)
    for e in entries:
        _print({"audit": e["id"], "user": e["user"], "image": e["image"].hex() if e["image"] else None,
                "patient": e["patient"], "purpose": e["purpose"], "action": e["action"], "granted": e["granted"],
                "reason": e["reason"], "t": e["t"], "by": e["by"], "validators": len(e["signatures"])})
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from cloud.access import latest_grants, load_access_config, open_requester

    with open_requester(load_access_config(args.config), args.key) as requester:
        grants = latest_grants(requester.status(), args.purpose, args.image)
        if args.image:
            missing = sorted(set(args.image) - {g[0] for g in grants})
            for image in missing:
                _print({"image": image, "fetched": False, "reason": "no grant: run `access request` first"})
        fetched = requester.fetch(grants, args.purpose, args.out)
    for f in fetched:
        _print({"image": f.envelope_id, "fetched": f.path is not None, "path": str(f.path) if f.path else None,
                "reason": f.refused, "audit": f.audit_id})
    ok = all(f.path is not None for f in fetched) and len(fetched) == len(args.image or fetched)
    return 0 if ok else 3


def _operator(args):
    return operator_client(args.config)


def operator_client(config_path: Path):
    """A ledger client (not started) signing as the operator, from cloud.toml."""
    from cloud.config import load_config
    from ledger.client import LedgerClient
    from medchain.errors import ConfigError
    from medchain.identity import SigningKey

    config = load_config(config_path, state_dir=config_path.resolve().parent)
    if config.operator_key is None:
        raise ConfigError("[ledger] operator_key is not set: principal commands are signed by the operator")
    return LedgerClient(config.genesis, SigningKey.load(config.operator_key), "operator")


def signer_client(config_path: Path, name: str | None, key: Path | None, command: str):
    """A ledger client (not started) signing as the named principal (``--name/--key``),
    else as the operator of cloud.toml."""
    if name is None and key is None:
        return operator_client(config_path)
    if name is None or key is None:
        raise SystemExit(f"{command}: --name and --key go together (the principal who signs)")
    from cloud.config import load_config
    from ledger.client import LedgerClient

    config = load_config(config_path, state_dir=config_path.resolve().parent)
    return LedgerClient(config.genesis, key, name)


def _submit(ledger, tx) -> int:
    result = ledger.submit(tx)
    _print({"principal": tx.name, "role": tx.role, "active": tx.active, "committed": result.committed,
            "reason": result.reason or None})
    return 0 if result.committed else 3


def _add(args: argparse.Namespace) -> int:
    from ledger.transactions import PrincipalSet

    with _operator(args) as ledger:
        return _submit(ledger, PrincipalSet(args.name, args.role, bytes.fromhex(args.public_key), True,
                                            bytes.fromhex(args.recipient_key) if args.recipient_key else None))


def _revoke(args: argparse.Namespace) -> int:
    from ledger.transactions import PrincipalSet

    with _operator(args) as ledger:
        p = ledger.principal(args.name)
        if p is None:
            raise SystemExit(f"principal revoke: {args.name!r} is not on the ledger")
        return _submit(ledger, PrincipalSet(args.name, p["role"], p["key"], False, p.get("recipient")))


def _list(args: argparse.Namespace) -> int:
    with _operator(args) as ledger:
        for p in ledger.principals():
            _print({"name": p["name"], "role": p["role"], "active": p["active"], "public_key": p["key"].hex(),
                    "recipient_key": p["recipient"].hex() if p["recipient"] else None})
    return 0


def _hex32(text: str) -> str:
    try:
        if len(bytes.fromhex(text)) == 32:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("expected 64 hex digits (a 32-byte public key)")


def _hex16(text: str) -> str:
    try:
        if len(bytes.fromhex(text)) == 16:
            return text.lower()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("expected 32 hex digits (an envelope id)")


def register(sub: argparse._SubParsersAction) -> None:
    access = sub.add_parser("access", help="a person's access to images: request (the ledger decides and "
                                           "audits), status, fetch (the custodian re-wraps the key to you)")
    actions = access.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, required=True, help="access.toml ([principal] [ledger] "
                                                                  "[custodian] [store])")
        p.add_argument("--key", type=Path, help="the principal's Ed25519 key file (overrides the config's)")

    p = actions.add_parser("request", help="ask the ledger for images for a purpose; one decision per image")
    common(p)
    p.add_argument("--image", nargs="+", help="envelope ids (32 hex digits)")
    p.add_argument("--study", nargs="+", help="study uids: every image of each study")
    p.add_argument("--series", nargs="+", help="series uids (as `cloud studies` lists them): every image "
                                                "of each series")
    p.add_argument("--purpose", required=True, choices=["diagnosis", "research", "training", "sharing"])
    p.set_defaults(func=_request)
    p = actions.add_parser("status", help="your requests and fetches, as the ledger's audit trail has them")
    common(p)
    p.set_defaults(func=_status)
    p = actions.add_parser("audit", help="an audit trail: a principal's (yours; anyone's for an auditor), or a "
                                         "patient token's or an image's (auditors; the read is audited first)")
    common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="a principal's name")
    which.add_argument("--patient", help="a patient's pseudonym token")
    which.add_argument("--image", type=_hex16, help="an envelope id (32 hex digits)")
    p.set_defaults(func=_audit)
    p = actions.add_parser("fetch", help="fetch granted images, decrypt here, verify against the ledger, "
                                         "write <id>.dcm files")
    common(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--purpose", required=True, choices=["diagnosis", "research", "training", "sharing"])
    p.add_argument("--image", nargs="+", help="only these envelope ids (default: every image granted)")
    p.set_defaults(func=_fetch)

    principal = sub.add_parser("principal", help="register, revoke and list ledger principals (as the operator)")
    actions = principal.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext, func in (("add", "register or update a principal (PRINCIPAL_SET)", _add),
                                 ("revoke", "deactivate a principal", _revoke),
                                 ("list", "every principal on the ledger (JSON lines)", _list)):
        p = actions.add_parser(name, help=helptext)
        p.add_argument("--config", type=Path, required=True, help="cloud.toml (its [ledger] operator_key signs)")
        if name != "list":
            p.add_argument("--name", required=True)
        if name == "add":
            p.add_argument("--role", required=True)
            p.add_argument("--public-key", type=_hex32, required=True, help="Ed25519 public key (hex)")
            p.add_argument("--recipient-key", type=_hex32, help="X25519 public key (hex): needed to fetch images")
        p.set_defaults(func=func)
