"""Ingest rate of the edge node against a bare pynetdicom SCP, measured in the same run.

    python bench/ingest.py [--instances 200] [--concurrency 4] [--rounds 3] [--smoke]

Both receivers get the same 512x512 16-bit CT instances from the same sender
(:func:`scanner_sim.sender.send`, ``--concurrency`` parallel associations), interleaved
round by round so drift hits both alike:

* bare  — a pynetdicom SCP whose C-STORE handler only writes the received bytes to a file;
* edge  — the MedChain node: parse check, durable spool (append to the log, group
          fdatasync) before Success, then de-identification (Annex E), pixel decode check, Part-10
          encoding and a durable hand-off to a folder sink (fsync again), spool entry removed.

The edge rate counts until the last instance is de-identified and handed off (not only
until the scanner got its Success). Both receivers run in this process, beside the sender,
as an edge box shares its cores. Prints the median instances/s and the ratio edge/bare.
Target: edge >= 0.80 x bare (exit status 1 when missed). ``--smoke``: 8 instances, one round,
target not enforced.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verdict import Verdict, add_smoke  # noqa: E402  (bench/verdict.py)

from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402

from edge_agent.config import load_profile, profile_path  # noqa: E402
from edge_agent.node import EdgeNode  # noqa: E402
from edge_agent.processor import Processor  # noqa: E402
from edge_agent.sink import FolderSink  # noqa: E402
from edge_agent.spool import Spool  # noqa: E402
from scanner_sim.sender import items_from_datasets, send  # noqa: E402
from scanner_sim.studies import generate_studies  # noqa: E402


def bare_round(items, concurrency: int, workdir: Path) -> float:
    counter = [0]

    def handle(event):
        counter[0] += 1
        (workdir / f"{counter[0]}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_associations = 32
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        t0 = time.perf_counter()
        result = send("127.0.0.1", server.server_address[1], items, calling_ae="BENCH", called_ae="BARE",
                      concurrency=concurrency, progress=False, retries=1)
        elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
    assert result.success == len(items), result.summary()
    return len(items) / elapsed


def edge_round(items, concurrency: int, workdir: Path, secret: bytes) -> tuple[float, float]:
    profile = load_profile(profile_path("x86-cpu"), base_dir=workdir)
    dicom = replace(profile.dicom, port=0, host="127.0.0.1", allowed_calling_aets=("*",), max_associations=32)
    node = EdgeNode(dicom, Spool(profile.spool.dir, profile.spool.max_bytes),
                    Processor.from_config(profile.deid, secret), FolderSink(workdir / "out"))
    node.start()
    try:
        t0 = time.perf_counter()
        result = send("127.0.0.1", node.port, items, calling_ae="BENCH", called_ae=dicom.ae_title,
                      concurrency=concurrency, progress=False, retries=1)
        acked = time.perf_counter() - t0
        assert node.drain(600)
        done = time.perf_counter() - t0
    finally:
        node.stop()
    assert result.success == len(items) == node.stats.forwarded, (result.summary(), node.stats.as_dict())
    return len(items) / done, len(items) / acked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.instances, args.rounds, args.concurrency = 8, 1, 2

    studies = -(-args.instances // 4)
    datasets = [ds for st in generate_studies("CT", studies, seed=7) for ds in st.datasets][: args.instances]
    items = items_from_datasets(datasets)
    size = len(datasets[0].PixelData)
    print(f"{len(items)} CT instances {datasets[0].Rows}x{datasets[0].Columns} "
          f"({size / 1024:.0f} KiB pixels each), {args.concurrency} associations, {args.rounds} rounds")
    bare, edge, edge_ack = [], [], []
    secret = bytes(range(32))
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            bare.append(bare_round(items, args.concurrency, Path(d)))
        with tempfile.TemporaryDirectory() as d:
            done, acked = edge_round(items, args.concurrency, Path(d), secret)
            edge.append(done)
            edge_ack.append(acked)
        print(f"round {r + 1}: bare {bare[-1]:7.1f}/s  edge {edge[-1]:7.1f}/s (scanner acked at {edge_ack[-1]:.1f}/s)",
              flush=True)
    b, e, a = statistics.median(bare), statistics.median(edge), statistics.median(edge_ack)
    print()
    print("| receiver | instances/s | vs bare |")
    print("|---|---|---|")
    print(f"| bare pynetdicom SCP (write file) | {b:.1f} | 1.00 |")
    print(f"| edge node: spool + de-identify + hand-off (until handed off) | {e:.1f} | **{e / b:.2f}** |")
    print(f"| edge node, as the scanner sees it (until last Success) | {a:.1f} | {a / b:.2f} |")
    print()
    verdict = Verdict(args.smoke)
    verdict.ratio("edge/bare (until handed off)", e, b, at_least=0.80)
    return verdict.exit_status()


if __name__ == "__main__":
    sys.exit(main())
