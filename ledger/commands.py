"""``medchain ledger``: generate a party's keys, assemble a genesis, run validators and local
clusters, simulate.

Imports nothing heavy at load time; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medchain.commandline import UsageError, integer, number, port

__all__ = ["register"]


def _keygen(args: argparse.Namespace) -> int:
    from ledger.consortium import keygen

    d = keygen(args.out, args.name, args.address or "", args.role or "")
    kind = f"validator at {d.address}" if d.is_validator else f"principal ({d.role})"
    print(f"wrote {args.out}/{d.name}.key and {d.name}.tls.key (mode 0600: keep them here) "
          f"and {args.out}/{d.name}.json ({kind}: hand this one over)")
    print(f"  public key {d.public_key}")
    return 0


def _principal(text: str) -> tuple[str, str, str]:
    """NAME=PUBKEY or NAME:ROLE=PUBKEY (the role defaults to the name)."""
    who, sep, key = text.partition("=")
    name, _, role = who.partition(":")
    if not sep or not name or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME[:ROLE]=PUBKEY")
    return name, role or name, key


def _genesis(args: argparse.Namespace) -> int:
    if args.from_:
        return _consortium_genesis(args)
    if args.dir is None:
        raise UsageError("ledger genesis: give --from DESCRIPTOR... --out FILE (a consortium), "
                         "or --local --dir DIR (the all-in-one local genesis)")
    return _local_genesis(args)


def _consortium_genesis(args: argparse.Namespace) -> int:
    from ledger.consortium import Descriptor, assemble
    from ledger.errors import GenesisError
    from medchain.durable import durable_write
    from medchain.pki import CertificateAuthority

    if args.out is None:
        raise UsageError("ledger genesis --from: --out FILE is required")
    if args.out.exists():
        raise GenesisError(f"{args.out} already exists; not overwriting")
    ca = CertificateAuthority.load(args.ca) if args.ca else None
    done = assemble([Descriptor.load(p) for p in args.from_],
                    {name: (role, key) for name, role, key in args.principal or ()}, ca,
                    genesis_time_ms=int(time.time() * 1000), chain_id=args.chain_id)
    g = done.genesis
    g.save(args.out)
    print(f"wrote {args.out}: chain {g.chain_id}, n={g.n}, f={g.f}, "
          f"{'mutual TLS' if g.tls else 'no TLS (loopback only)'}; no private key written")
    for name, pem in done.principal_certs.items():
        (args.out.parent / "certs").mkdir(exist_ok=True)
        path = durable_write(args.out.parent / "certs" / f"{name}.crt", pem.encode())
        print(f"  certificate for {name}: {path} (hand it back; it goes beside {name}.key)")
    print(f"genesis hash {g.hash.hex()}")
    return 0


def _local_genesis(args: argparse.Namespace) -> int:
    from ledger.errors import GenesisError
    from ledger.genesis import make_local_genesis

    if (args.dir / "genesis.json").exists():
        raise GenesisError(f"{args.dir}/genesis.json already exists; not overwriting")
    if args.base_port and args.base_port + args.n - 1 > 65535:
        raise UsageError(f"--base-port {args.base_port} leaves no room for {args.n} validators below port 65536")
    ports = list(range(args.base_port, args.base_port + args.n)) if args.base_port else None
    g = make_local_genesis(args.dir, args.n, host=args.host, ports=ports,
                           genesis_time_ms=int(time.time() * 1000), tls=args.tls)
    print(f"wrote {args.dir}/genesis.json (all-in-one local genesis: every key in one folder, "
          f"for a demo or tests): chain {g.chain_id}, n={g.n}, f={g.f}; "
          f"keys in {args.dir}/keys (mode 0600)")
    for v in g.validators:
        print(f"  validator {v.id}: {v.host}:{v.port} key {v.public_key[:16]}...")
    for p in g.principals:
        print(f"  principal {p.name} ({p.role}): key {p.public_key[:16]}...")
    print(f"genesis hash {g.hash.hex()}")
    return 0


def _validator(args: argparse.Namespace) -> int:
    from ledger.validator import run_validator

    base = args.genesis.parent
    key = args.key or base / "keys" / f"validator-{args.id}.key"
    data = args.data or base / "data"
    return run_validator(args.genesis, args.id, key, data, args.byzantine,
                         genesis_hash=args.genesis_hash, tls_key=args.tls_key)


def _cluster(args: argparse.Namespace) -> int:
    from ledger.cluster import LocalCluster

    workdir = args.dir
    with LocalCluster(args.n, workdir, log_level=args.log_level, tls=args.tls) as cluster:
        g = cluster.genesis
        print(f"ledger cluster up: chain {g.chain_id}, n={g.n}, f={g.f}")
        print(f"  genesis: {cluster.genesis_path}")
        print(f"  keys:    {workdir}/keys  (operator, ingest, training, custodian)")
        print(f"  logs:    {workdir}/logs")
        for v in g.validators:
            print(f"  validator {v.id} on {v.host}:{v.port}")
        print("Ctrl-C stops the cluster.", flush=True)
        try:
            while True:
                time.sleep(args.report_s)
                rows = []
                for i in range(g.n):
                    try:
                        s = cluster.status(i, timeout_s=1.0)
                        rows.append(f"v{i}: h={s['executed']} view={s['view']}")
                    except Exception:  # a validator that is down is reported, not fatal
                        rows.append(f"v{i}: down")
                print("  " + "  ".join(rows), flush=True)
        except KeyboardInterrupt:
            print("stopping")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from ledger.simulation import run_seeds

    failures = run_seeds(args.start, args.seeds, long=args.long, progress=True)
    return 1 if failures else 0


def _status(args: argparse.Namespace) -> int:
    from ledger.client import LedgerClient
    from ledger.genesis import Genesis

    g = Genesis.load(args.genesis)
    key = args.key or args.genesis.parent / "keys" / f"{args.name}.key"
    with LedgerClient(g, key, args.name) as client:
        for i in range(g.n):
            try:
                s = client.status(i, timeout_s=2.0)
                print(f"validator {i}: height {s['executed']} view {s['view']} "
                      f"{'normal' if s['normal'] else 'view-change'} stable {s['stable']} "
                      f"state {s['state_root'].hex()[:16]} dropped {s['dropped']}")
            except Exception as exc:  # report every validator even if one is down
                print(f"validator {i}: unreachable ({type(exc).__name__})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ledger = sub.add_parser("ledger", help="the permissioned PBFT ledger")
    actions = ledger.add_subparsers(dest="action", required=True, metavar="ACTION")

    k = actions.add_parser("keygen", help="one party's keys, generated where they are used")
    k.add_argument("--out", type=Path, required=True, help="folder for the keys and descriptor")
    k.add_argument("--name", required=True, help="validator or principal name")
    k.add_argument("--address", help="HOST:PORT the validator listens on (a validator's keys)")
    k.add_argument("--role", help="a principal's role (default: its name)")
    k.set_defaults(func=_keygen)

    g = actions.add_parser("genesis", help="assemble a genesis from public descriptors "
                           "(or, with --local, an all-in-one local one)")
    g.add_argument("--from", dest="from_", type=Path, nargs="+", action="extend", metavar="DESCRIPTOR",
                   help="descriptors from ledger keygen (validators in id order)")
    g.add_argument("--principal", type=_principal, action="append", metavar="NAME[:ROLE]=PUBKEY",
                   help="a principal by its Ed25519 public key (hex)")
    g.add_argument("--ca", type=Path, help="the consortium CA folder: links run mutual TLS")
    g.add_argument("--out", type=Path, help="the genesis file to write")
    g.add_argument("--chain-id", help="default: medchain-<random>")
    g.add_argument("--local", action="store_true",
                   help="all-in-one local genesis: every key in --dir (demo and tests)")
    g.add_argument("--n", type=int, default=4, help="--local: validators, n = 3f + 1 (default 4)")
    g.add_argument("--dir", type=Path, help="--local: where genesis.json and keys/ go")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--base-port", type=port(any_free=True), default=0, help="first port (default: free ports)")
    g.add_argument("--tls", action="store_true", help="--local: mutual TLS on loopback too")
    g.set_defaults(func=_genesis)

    v = actions.add_parser("validator", help="run one validator in the foreground")
    v.add_argument("--genesis", type=Path, required=True)
    v.add_argument("--id", type=integer(0), required=True, help="this validator's id in the genesis")
    v.add_argument("--key", type=Path, help="default: <genesis dir>/keys/validator-<id>.key")
    v.add_argument("--data", type=Path, help="block store folder (default: <genesis dir>/data)")
    v.add_argument("--genesis-hash", help="the genesis hash agreed (hex): refuse any other")
    v.add_argument("--tls-key", type=Path, help="default: <key stem>.tls.key beside --key")
    v.add_argument("--byzantine", help=argparse.SUPPRESS)  # test-only, needs an env flag
    v.set_defaults(func=_validator)

    c = actions.add_parser("cluster", help="run a local cluster of validator processes")
    c.add_argument("--n", type=int, default=4)
    c.add_argument("--dir", type=Path, default=Path(".medchain-demo/ledger"),
                   help="work folder (reused if it holds a genesis; default .medchain-demo/ledger)")
    c.add_argument("--report-s", type=number(0, above=True), default=5.0, help="status line period")
    c.add_argument("--tls", action="store_true", help="mutual TLS on loopback too")
    c.set_defaults(func=_cluster)

    s = actions.add_parser("simulate", help="randomized simulation of the PBFT replicas")
    s.add_argument("--seeds", type=integer(1), default=50, help="how many seeds (default 50)")
    s.add_argument("--start", type=integer(0), default=0, help="first seed (default 0)")
    s.add_argument("--long", action="store_true", help="longer runs with harsher faults")
    s.set_defaults(func=_simulate)

    st = actions.add_parser("status", help="ask every validator for its status")
    st.add_argument("--genesis", type=Path, required=True)
    st.add_argument("--name", default="operator", help="principal to ask as")
    st.add_argument("--key", type=Path, help="default: <genesis dir>/keys/<name>.key")
    st.set_defaults(func=_status)
