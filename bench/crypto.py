"""Throughput of sealing against the raw primitives, measured in the same run.

    python bench/crypto.py [--sizes 512K,64M] [--rounds 7] [--smoke]

For each object size it times, interleaved round by round so drift hits all alike:

* raw      — ``hashlib.sha256(data)`` + ``AESGCM.encrypt(data)`` once over the whole object:
             the floor of any scheme that hashes and encrypts every byte;
* package  — what the issue's target names: chunk + encrypt + hash + Merkle + sign, with
             the object key prepared beforehand (:func:`medchain.sealing.package`);
* seal     — package plus the per-object HPKE key wrap (X25519 + HKDF + AES-GCM);
* verify   — the cloud's key-less check (signature, chunk digests, Merkle root);
* open     — verify + unwrap + decrypt.

It prints the median MB/s of each and the ratio to raw. Target: package >= 0.80 of raw at
every size (exit status 1 when missed). ``--smoke``: 64 KiB and 1 MiB, one round, ~2 MiB of
work per timing, target not enforced.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verdict import Verdict, add_smoke  # noqa: E402  (bench/verdict.py)

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from medchain.identity import RecipientKey, SigningKey  # noqa: E402
from medchain.sealing import new_object_key, open_envelope, package, seal, verify  # noqa: E402

UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def bench_size(size: int, rounds: int, work: int = 64 * 1024**2) -> dict[str, float]:
    data = os.urandom(size)
    device, custodian = SigningKey.generate(), RecipientKey.generate()
    aead = AESGCM(AESGCM.generate_key(256))
    reps = max(1, int(work // size))  # ~``work`` bytes per timing
    keys = iter([new_object_key(custodian.public) for _ in range(reps * (rounds + 1))])
    common = dict(device_id="bench", sequence=1, signer=device, created_ms=0)
    env = seal({"p": data}, recipient=custodian.public, **common)

    ops = {
        "raw": lambda: (hashlib.sha256(data).digest(), aead.encrypt(os.urandom(12), data, b"")),
        "package": lambda: package({"p": data}, next(keys), **common),
        "seal": lambda: seal({"p": data}, recipient=custodian.public, **common),
        "verify": lambda: verify(env, device.public),
        "open": lambda: open_envelope(env, custodian, device.public),
    }
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for name, op in ops.items():  # warm up
        op()
    for _ in range(rounds):
        for name, op in ops.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
            samples[name].append(size * reps / (time.perf_counter() - t0) / 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512K,64M")
    ap.add_argument("--rounds", type=int, default=7)
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.rounds = "64K,1M", 1
    work = 2 * 1024**2 if args.smoke else 64 * 1024**2
    verdict = Verdict(args.smoke)
    print(f"cores: {len(os.sched_getaffinity(0))}; median of {args.rounds} rounds; MB = 10^6 bytes")
    print(f"{'size':>6} {'op':<8} {'MB/s':>8} {'vs raw':>7}")
    results = {}
    for text in args.sizes.split(","):
        res = results[text] = bench_size(parse_size(text), args.rounds, work)
        for name, mbs in res.items():
            print(f"{text:>6} {name:<8} {mbs:8.0f} {mbs / res['raw']:7.2f}")
    for text, res in results.items():
        verdict.ratio(f"package/raw at {text}", res["package"], res["raw"], at_least=0.80)
    return verdict.exit_status()


if __name__ == "__main__":
    sys.exit(main())
