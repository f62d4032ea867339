"""Access for people, end to end: grants per second for one study request.

    python bench/access.py [--images 500] [--smoke]

A local 4-validator ledger (OS processes), the custodian server on its Unix socket, one
radiologist registered with its keys, and one study of ``--images`` sealed DICOM images
registered on the ledger. Measured: request the whole study (the ledger decides and audits
each image), fetch (the custodian reads each grant, decides again, verifies the stored
object and re-wraps its data key), verify against the ledger's record, decrypt and write
the files — images per second. Baseline in the same run: the custodian's raw rate of
unwrap + re-wrap on the same envelopes (no ledger, no I/O). No target: the ratio says how
much of the end-to-end time is the ledger's and the checks'. ``--smoke``: 20 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verdict import Verdict, add_smoke  # noqa: E402  (bench/verdict.py)
from cloud.access import LedgerGateway, Requester  # noqa: E402
from cloud.custodian_service import CustodianConfig, CustodianServer, ask_custodian  # noqa: E402
from cloud.keybackend import open_backend  # noqa: E402
from cloud.objectstore import LocalObjectStore  # noqa: E402
from ledger.client import LedgerClient  # noqa: E402
from ledger.cluster import LocalCluster  # noqa: E402
from ledger.transactions import DeviceEnrolled, ImageRegistered, PrincipalSet  # noqa: E402
from medchain.identity import RecipientKey, SigningKey  # noqa: E402
from medchain.sealing import new_object_key, package, wrap_key_for_principal  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    add_smoke(ap)
    args = ap.parse_args(argv)
    n = 20 if args.smoke else args.images
    verdict = Verdict(args.smoke)
    with tempfile.TemporaryDirectory(prefix="bench-access-") as tmp, \
            LocalCluster(n=4, workdir=Path(tmp) / "ledger") as cluster:
        root = Path(tmp)
        device, custodian = SigningKey.generate(), RecipientKey.generate()
        custodian.save(root / "custodian.key")
        store = LocalObjectStore(root / "store")
        dr_key, dr_recipient = SigningKey.generate(), RecipientKey.generate()
        with cluster.client("operator") as op:
            assert op.submit(DeviceEnrolled("dev-bench", device.public.raw, "site", "cr")).committed
            assert op.submit(PrincipalSet("dr-bench", "radiologist", dr_key.public.raw, True,
                                          dr_recipient.public.raw)).committed
        envelopes = []
        for i in range(n):
            env = package({"dicom": os.urandom(64 * 1024)}, new_object_key(custodian.public), device_id="dev-bench",
                          sequence=i + 1, signer=device, created_ms=0)
            store.put(env)
            envelopes.append(env)
        with cluster.client("ingest") as ingest:
            results = ingest.submit_many(ImageRegistered(
                e.header.object_id, e.header.merkle_root, "tok-bench", "study-bench", f"se-{i % 4}", f"in-{i}",
                "CR", ("diagnosis",), "default", "dev-bench", e.header.sequence) for i, e in enumerate(envelopes))
            assert all(r.committed for r in results)
        config = CustodianConfig(socket=root / "c.sock", key=root / "custodian.key", genesis=cluster.genesis_path,
                                 ledger_key=cluster.key_path("custodian"), store_url=str(root / "store"))
        with CustodianServer(config) as server, LedgerClient(cluster.genesis_path, dr_key, "dr-bench") as ledger:
            requester = Requester(LedgerGateway(ledger, partial(ask_custodian, server.config.socket), store),
                                  "dr-bench", dr_key, dr_recipient)
            start = time.perf_counter()
            decisions = requester.request_study("study-bench", "diagnosis")
            fetched = requester.fetch([(d.envelope_id, d.audit_id) for d in decisions if d.granted], "diagnosis",
                                      root / "out")
            e2e = time.perf_counter() - start
        assert len(fetched) == n and all(f.path is not None for f in fetched), "not every image was fetched"
        backend = open_backend(root / "custodian.key")
        start = time.perf_counter()
        for e in envelopes:
            key = backend.unwrap(e.header.wrapped_key, e.header.object_id)
            wrap_key_for_principal(key, e.header.object_id, "dr-bench", dr_recipient.public)
        raw = time.perf_counter() - start
    print(f"images: {n} (64 KiB each), one study; cores: {len(os.sched_getaffinity(0))}")
    print(f"end to end (request -> ledger -> re-wrap -> fetch -> verify -> write): {n / e2e:8.1f} images/s")
    print(f"custodian raw unwrap + re-wrap:                                         {n / raw:8.1f} images/s")
    verdict.ratio("end-to-end/raw-rewrap", n / e2e, n / raw)
    return verdict.exit_status()


if __name__ == "__main__":
    sys.exit(main())
