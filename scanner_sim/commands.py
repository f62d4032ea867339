"""``medchain scanner``: generate, send and replay studies like a hospital's modalities.

Imports nothing heavy at load time; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medchain.commandline import folder, integer, port

__all__ = ["register"]


def _generate(args: argparse.Namespace):
    from scanner_sim.studies import generate_studies, write_ground_truth

    studies = generate_studies(args.modality, args.studies, args.seed, site=args.site)
    if args.records:
        write_ground_truth(studies, args.records)
        print(f"ground truth for {len(studies)} stud(ies) -> {args.records}")
    return studies


def _send(args: argparse.Namespace) -> int:
    from scanner_sim.sender import check_reachable, items_from_datasets, send
    from scanner_sim.studies import write_studies

    check_reachable(args.host, args.port)
    studies = _generate(args)
    if args.save:
        paths = write_studies(studies, args.save)
        print(f"wrote {len(paths)} file(s) under {args.save}")
    items = items_from_datasets([ds for st in studies for ds in st.datasets])
    calling = args.calling_ae or f"SCANNER_{args.modality.upper()}"
    result = send(args.host, args.port, items, calling_ae=calling, called_ae=args.called_ae,
                  concurrency=args.concurrency, progress=not args.no_progress, retries=args.retries)
    print(f"{args.modality.upper()}: {len(studies)} stud(ies), {result.summary()}")
    return 0 if result.success == result.attempted else 1


def _replay(args: argparse.Namespace) -> int:
    from scanner_sim.errors import ScannerError
    from scanner_sim.sender import check_reachable, items_from_folder, send

    check_reachable(args.host, args.port)
    items, skipped = items_from_folder(args.dir)
    for why, n in sorted(skipped.items()):
        print(f"skipped {n} file(s): {why}")
    if not items:
        raise ScannerError(f"{args.dir}: no DICOM object to send")
    result = send(args.host, args.port, items, calling_ae=args.calling_ae, called_ae=args.called_ae,
                  concurrency=args.concurrency, progress=not args.no_progress, retries=args.retries)
    print(f"replay {args.dir}: {result.summary()}")
    return 0 if result.success == result.attempted else 1


def _write(args: argparse.Namespace) -> int:
    from scanner_sim.studies import write_studies

    studies = _generate(args)
    paths = write_studies(studies, args.out)
    print(f"wrote {len(paths)} file(s) of {len(studies)} {args.modality.upper()} stud(ies) under {args.out}")
    return 0


def _peer(p: argparse.ArgumentParser, calling_default: str | None) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port(), default=11112)
    p.add_argument("--called-ae", default="MEDCHAIN_EDGE", help="AE title of the receiving node")
    p.add_argument("--calling-ae", default=calling_default,
                   help="our AE title" + (" (default SCANNER_<MODALITY>)" if calling_default is None else ""))
    p.add_argument("--concurrency", type=integer(1), default=4, help="parallel associations (default 4)")
    p.add_argument("--retries", type=integer(0), default=1,
                   help="times a lost or refused association is opened again for the objects that got "
                        "no answer, as a scanner's retry queue does (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _studies(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modality", required=True, type=str.upper, choices=["CT", "MR", "CR", "DX", "MG", "US"])
    p.add_argument("--studies", type=integer(1), default=1, help="how many studies (default 1)")
    p.add_argument("--seed", type=integer(0), default=0, help="same seed, same studies (default 0)")
    p.add_argument("--site", default="site-a", help="issuer of the fake patient IDs (default site-a)")
    p.add_argument("--records", type=Path, default=None,
                   help="also write the ground truth (labels, consent) as CSV or JSON for `medchain edge records import`")


def register(sub: argparse._SubParsersAction) -> None:
    scanner = sub.add_parser("scanner", help="simulated scanners: generate, send and replay studies")
    actions = scanner.add_subparsers(dest="action", required=True, metavar="ACTION")
    send = actions.add_parser("send", help="generate studies with fake PHI and send them by C-STORE")
    _studies(send)
    _peer(send, None)
    send.add_argument("--save", type=Path, default=None, help="also keep the sent files under this folder")
    send.set_defaults(func=_send)
    replay = actions.add_parser("replay", help="send every DICOM file under a folder by C-STORE")
    replay.add_argument("dir", type=folder)
    _peer(replay, "STORESCU")
    replay.set_defaults(func=_replay)
    gen = actions.add_parser("generate", help="write generated studies (and ground truth) to a folder")
    _studies(gen)
    gen.add_argument("--out", type=Path, required=True)
    gen.set_defaults(func=_write)
