"""``medchain keys``: create and inspect the key files a site needs.

Private key files are created with mode 0600 and never overwritten; ``show`` prints only
public material (public key and key id), never a private key or a secret.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medchain.errors import KeyFileError
from medchain.identity import SECRET_SIZE, RecipientKey, SigningKey, new_secret

__all__ = ["register"]

def _new(args: argparse.Namespace) -> int:
    if args.kind == "secret":
        new_secret(args.path)
        print(f"{args.path}: new {SECRET_SIZE}-byte secret (mode 0600)")
        return 0
    key = (SigningKey if args.kind == "signing" else RecipientKey).generate()
    key.save(args.path)
    print(f"{args.path}: new {args.kind} key id={key.public.id} public={key.public.hex()}")
    return 0


def _show(args: argparse.Namespace) -> int:
    for loader in (SigningKey.load, RecipientKey.load):
        try:
            key = loader(args.path)
        except KeyFileError as exc:
            if "expected an" in str(exc):
                continue
            raise
        kind = "signing (Ed25519)" if isinstance(key, SigningKey) else "recipient (X25519)"
        print(f"{args.path}: {kind} id={key.public.id} public={key.public.hex()}")
        return 0
    raise KeyFileError(f"{args.path}: neither an Ed25519 nor an X25519 private key")


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create and inspect key files")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="create a key file (mode 0600, never overwrites)")
    new.add_argument("kind", choices=["signing", "recipient", "secret"],
                     help="signing: Ed25519 (device, validator, model); recipient: X25519 "
                          "(custodian); secret: 32 random bytes (site pseudonymization)")
    new.add_argument("path", type=Path)
    new.set_defaults(func=_new)
    show = actions.add_parser("show", help="print the public key and key id of a key file")
    show.add_argument("path", type=Path)
    show.set_defaults(func=_show)

