"""``medchain edge``: run the DICOM node, import clinical records, review the quarantine,
turn a patient's MRN into its keyed token at the site (for the registrar).

Imports nothing heavy at load time; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medchain.commandline import port

__all__ = ["register"]


def _profile(args: argparse.Namespace):
    from edge_agent.config import load_profile

    return load_profile(args.config, base_dir=args.state_dir)


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import build_node, load_site_secret, serve
    from edge_agent.sink import FolderSink

    profile = _profile(args)
    secret = load_site_secret(profile, args.secret)
    if args.out is None:
        return _run_agent(args, profile, secret)
    out = args.out
    node = build_node(profile, secret, FolderSink(out), port=args.port, host=args.host)

    def ready(n) -> None:
        print(f"edge node {profile.device.id} ready: AE {profile.dicom.ae_title} on "
              f"{n.dicom.host}:{n.port}, spool {profile.spool.dir}, output {out}", flush=True)

    stats = serve(node, ready=ready)
    print("edge node stopped: " + json.dumps(stats, sort_keys=True), flush=True)
    return 0


def _run_agent(args: argparse.Namespace, profile, secret: bytes) -> int:
    """The full agent: de-identified instances are sealed, queued and sent to the cloud."""
    from edge_agent.service import EdgeAgent

    agent = EdgeAgent(profile, secret, port=args.port, host=args.host)

    def ready(a) -> None:
        print(f"edge agent {profile.device.id} ready: AE {profile.dicom.ae_title} on "
              f"{a.node.dicom.host}:{a.node.port}; uplink to {a.uplink.link.endpoint.describe()}; "
              f"outbox {profile.outbox.path} ({a.outbox.depth} waiting)", flush=True)

    stats = agent.serve(ready=ready)
    print("edge agent stopped: " + json.dumps(stats, sort_keys=True), flush=True)
    return 0


def _records_import(args: argparse.Namespace) -> int:
    from edge_agent.agent import load_site_secret
    from edge_agent.pseudonyms import Pseudonymizer
    from edge_agent.records import RecordStore, pseudonymize, read_records_file

    profile = _profile(args)
    pz = Pseudonymizer(load_site_secret(profile, args.secret), profile.deid.patient_id_issuer)
    records = pseudonymize(read_records_file(args.file), pz)
    with RecordStore(profile.records.path) as store:
        n = store.upsert(records)
        counts = store.counts()
    print(f"imported {n} record(s) from {args.file} into {profile.records.path} "
          f"(now {counts['patients']} patient token(s), {counts['studies']} labelled stud(ies)); "
          "identifiers replaced by keyed pseudonyms", file=sys.stdout)
    return 0


def _pseudonym(args: argparse.Namespace) -> int:
    """The patient token the edge writes for an MRN (with the site's secret and issuer), so
    that a registrar can file consent on the ledger by token: the MRN never leaves the site.
    ``--mrn -`` reads one MRN per line from standard input (kept out of the process list and
    the shell history); the output never repeats an MRN."""
    from edge_agent.agent import load_site_secret
    from edge_agent.pseudonyms import Pseudonymizer, normalize_identifier

    profile = _profile(args)
    pz = Pseudonymizer(load_site_secret(profile, args.secret), profile.deid.patient_id_issuer)
    mrns = [args.mrn] if args.mrn != "-" else sys.stdin.read().splitlines()
    mrns = [m for m in mrns if normalize_identifier(m)]
    if not mrns:
        raise SystemExit("edge pseudonym: no MRN given")
    for mrn in mrns:
        print(json.dumps({"patient": pz.patient(mrn, args.issuer), "issuer": pz.issuer(args.issuer)},
                         sort_keys=True), flush=True)
    return 0


def _quarantine(args: argparse.Namespace):
    from edge_agent.quarantine import QuarantineStore

    return QuarantineStore(_profile(args).spool.dir / "quarantine")


def _quarantine_list(args: argparse.Namespace) -> int:
    import datetime as dt

    entries = _quarantine(args).entries()
    for e in entries:
        when = dt.datetime.fromtimestamp(e.at, dt.timezone.utc).isoformat(timespec="seconds") if e.at else "-"
        state = "  release requested" if e.release_requested else ""
        print(f"{e.spool_id}  {when}  {e.size:>10} B  {e.reason}{': ' + e.detail if e.detail else ''}{state}")
    print(f"{len(entries)} quarantined object(s)", file=sys.stderr)
    return 0


def _quarantine_show(args: argparse.Namespace) -> int:
    store = _quarantine(args)
    entry = store.entry(args.id)
    print(f"{entry.spool_id}: {entry.reason}{': ' + entry.detail if entry.detail else ''} ({entry.size} B); "
          "tags only, no values")
    for line in store.tags(args.id):
        print(f"{'  ' * line.depth}{line.tag} {line.vr:<2} {line.length:>8} B  {line.keyword}")
    return 0


def _quarantine_release(args: argparse.Namespace) -> int:
    entry = _quarantine(args).request_release(args.id, frozenset(args.waive))
    print(f"{entry.spool_id} ({entry.reason}) released{' waiving ' + ', '.join(args.waive) if args.waive else ''}: "
          "the running edge node processes it again within seconds")
    return 0


def _quarantine_delete(args: argparse.Namespace) -> int:
    entry = _quarantine(args).delete(args.id)
    print(f"{entry.spool_id} ({entry.reason}) deleted")
    return 0


def _common(p: argparse.ArgumentParser, *, secret: bool = True) -> None:
    p.add_argument("--config", required=True, type=Path, help="device profile, e.g. firmware_configs/x86-cpu.toml")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="base for the profile's relative paths (default: current directory)")
    if not secret:
        return
    p.add_argument("--secret", type=Path, default=None,
                   help="site pseudonymization secret (default: the profile's [deid] secret_path)")


def register(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="the edge agent: DICOM node and clinical records")
    actions = edge.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run the edge agent until SIGTERM (receive, de-identify, "
                                         "prepare, seal, queue, send to the cloud)")
    _common(run)
    run.add_argument("--port", type=port(any_free=True), default=None,
                     help="override the profile's DICOM port (0: any free port)")
    run.add_argument("--host", default=None, help="override the profile's bind address")
    run.add_argument("--out", type=Path, default=None,
                     help="stand-alone mode: write de-identified instances to this folder instead "
                          "of sealing and sending them (needs no enrolment)")
    run.set_defaults(func=_run)
    records = actions.add_parser("records", help="clinical records (labels and consent)")
    ra = records.add_subparsers(dest="records_action", required=True, metavar="ACTION")
    imp = ra.add_parser("import", help="import a CSV or JSON export keyed by patient ID and accession; "
                                       "keys are replaced by keyed pseudonyms")
    _common(imp)
    imp.add_argument("file", type=Path)
    imp.set_defaults(func=_records_import)
    pseudonym = actions.add_parser("pseudonym", help="the patient token for an MRN, keyed with the site's "
                                                     "secret as the edge writes it (for medchain consent "
                                                     "--patient TOKEN); the MRN stays at the site")
    _common(pseudonym)
    pseudonym.add_argument("--mrn", required=True, help="the patient ID; '-': one per line from standard input")
    pseudonym.add_argument("--issuer", default=None,
                           help="its Issuer of Patient ID (default: the profile's [deid] patient_id_issuer)")
    pseudonym.set_defaults(func=_pseudonym)

    from edge_agent.quarantine import WAIVERS

    quarantine = actions.add_parser("quarantine", help="objects set aside with a reason: list, show tags, "
                                                       "release or delete (each action logged)")
    qa = quarantine.add_subparsers(dest="quarantine_action", required=True, metavar="ACTION")
    for name, func, what in (("list", _quarantine_list, "every quarantined object with its reason"),
                             ("show", _quarantine_show, "one object's tags, VRs and lengths (never a value)"),
                             ("release", _quarantine_release, "process an object again, optionally waiving "
                                                              "a check a person has reviewed"),
                             ("delete", _quarantine_delete, "remove an object for good")):
        p = qa.add_parser(name, help=what)
        _common(p, secret=False)
        if name != "list":
            p.add_argument("id", help="the quarantine entry id (see list)")
        if name == "release":
            p.add_argument("--waive", action="append", default=[], choices=sorted(WAIVERS),
                           help="; ".join(f"{k}: {v}" for k, v in WAIVERS.items()))
        p.set_defaults(func=func)
