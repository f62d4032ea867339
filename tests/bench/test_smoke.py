"""Every benchmark runs end to end in its smoke mode, as CI runs it: a broken benchmark
fails here, not months later on the day someone wants a figure. Each must exit 0, print its
ratio to the baseline it measured in the same run, and say that its targets were not
enforced (smoke inputs are too small to judge them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"^ratio .+: \d+\.\d+( \(target [<>]= \d+\.\d+: (met|missed)\))?$", re.MULTILINE)

pytestmark = pytest.mark.slow


def smoke(name: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench/{name}.py --smoke exited {done.returncode}:\n" \
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert RATIO.search(done.stdout), f"bench/{name}.py printed no ratio line:\n{done.stdout[-3000:]}"
    assert "smoke run:" in done.stdout and "targets not enforced" in done.stdout, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", ["crypto", "ingest", "ledger", "pipeline", "burned_in", "access"])
def test_benchmark_smoke(name):
    smoke(name)


def test_transport_benchmark_smoke(mosquitto_binary):
    """Two private brokers (one TLS-only), started by the benchmark itself."""
    out = smoke("transport")
    assert "ratio tls/plain" in out
