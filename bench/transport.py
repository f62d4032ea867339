"""Uplink throughput over MQTT with TLS (client certificates) against plain MQTT, same run.

    python bench/transport.py [--envelopes 200] [--size 262144] [--rounds 3] [--smoke]

Two private Mosquitto brokers on loopback: one plain, and one as a deployment runs it, started
from the files ``cloud init`` generates (``cloud.brokerconf``: one mutual-TLS listener, no
anonymous clients, certificate subject as user, the ACL), with the device's and the
coordinator's certificates from the deployment's CA (``medchain.pki``). For each, the real
edge path: sealed envelopes in a SQLite outbox, the :class:`Uplink` publishing them at QoS 1,
a receiver that verifies each envelope's signature and answers with a signed ack, and the
outbox releasing it. The ledger is left out (it would dominate both alike). Rounds are
interleaved; prints the median envelopes/s and MB/s per transport and the ratio tls/plain.
Target: tls >= 0.60 x plain (measured 0.70-1.04 per round on 2 shared vCPUs; below 0.60 TLS
would cost more than the margin ingest has over the ledger's commit rate); exit status 1 when
missed. ``--smoke``: 20 envelopes of 16 KiB, one round, target not enforced.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import MosquittoProcess  # noqa: E402  (tests/conftest.py)
from integration.conftest import SecureBroker  # noqa: E402  (the generated set-up, as the suite runs it)
from verdict import Verdict, add_smoke  # noqa: E402  (bench/verdict.py)

from edge_agent.outbox import Outbox, Sealed  # noqa: E402
from edge_agent.uplink import Uplink, UplinkSettings  # noqa: E402
from medchain.identity import RecipientKey, SigningKey  # noqa: E402
from medchain.mqtt import MqttLink  # noqa: E402
from medchain.protocol import Ack, AckStatus, Envelope, ack_topic, decode_message, device_from_topic  # noqa: E402
from medchain.protocol import encode, envelope_subscription  # noqa: E402
from medchain.sealing import seal, verify  # noqa: E402


DEVICE = "bench-edge"


def one_round(endpoint, cloud_endpoint, n: int, size: int, workdir: Path) -> float:
    device, cloud, custodian = SigningKey.generate(), SigningKey.generate(), RecipientKey.generate()
    device_id = DEVICE  # the name the ACL gives the device's certificate
    workdir = Path(tempfile.mkdtemp(dir=workdir))

    def answer(topic, payload):
        env = decode_message(payload, expect=Envelope)
        verify(env, device.public)
        ack = Ack(env.envelope_id, env.header.digest(), device_from_topic(topic), env.header.sequence,
                  AckStatus.STORED, "")
        receiver.publish(ack_topic(device_id), encode(ack.signed(cloud)))

    receiver = MqttLink(cloud_endpoint, subscriptions=[(envelope_subscription(), 1)], on_message=answer,
                        persistent_session=False)
    with Outbox(workdir / f"{device_id}.db") as box, receiver:
        assert receiver.wait_connected(10), receiver.last_error
        for _ in range(n):
            box.enqueue(lambda seq: (lambda e: Sealed(e.envelope_id, encode(e), e.header.digest()))(seal(
                {"dicom": bytes([seq % 256]) * size}, device_id=device_id, sequence=seq, signer=device,
                recipient=custodian.public, created_ms=seq)))
        settings = UplinkSettings(window=32, resend_after_s=60, heartbeat_s=3600, idle_poll_s=0.01)
        with Uplink(box, endpoint, device_id=device_id, device_key=device, cloud_key=cloud.public,
                    settings=settings) as up:
            assert up.link.wait_connected(10), up.link.last_error
            t0 = time.perf_counter()
            assert up.wait_drained(300), f"outbox still holds {box.depth}"
            elapsed = time.perf_counter() - t0
    return n / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envelopes", type=int, default=200)
    parser.add_argument("--size", type=int, default=256 * 1024, help="payload bytes per envelope")
    parser.add_argument("--rounds", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.envelopes, args.size, args.rounds = 20, 16 * 1024, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = MosquittoProcess(tmp / "plain")
        tls = SecureBroker(tmp / "tls", "mosquitto")
        plain.start()
        tls.start()
        try:
            transports = {
                "plain": (plain.endpoint, plain.endpoint),
                "tls": (tls.endpoint_for(tls.admit(DEVICE)), tls.coordinator_endpoint),
            }
            rates: dict[str, list[float]] = {k: [] for k in transports}
            for r in range(args.rounds):
                for name, (edge, cloud) in transports.items():
                    rates[name].append(one_round(edge, cloud, args.envelopes, args.size, tmp))
                    print(f"round {r + 1} {name:5s} {rates[name][-1]:8.1f} envelopes/s", flush=True)
        finally:
            plain.stop()
            tls.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in med.items():
        print(f"{name:5s} median {rate:8.1f} envelopes/s  {rate * args.size / 1e6:7.1f} MB/s payload")
    print(f"({args.envelopes} envelopes of {args.size} bytes, {args.rounds} rounds)")
    verdict = Verdict(args.smoke)
    verdict.ratio("tls/plain", med["tls"], med["plain"], at_least=0.60)
    return verdict.exit_status()


if __name__ == "__main__":
    sys.exit(main())
