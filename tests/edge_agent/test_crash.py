"""Crash test: SIGKILL the agent mid-stream; after a restart every instance that got Success
is present exactly once. Then SIGTERM: in-flight work finishes and the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.pseudonyms import Pseudonymizer
from medchain.identity import load_secret, new_secret
from scanner_sim.sender import items_from_datasets
from scanner_sim.studies import generate_studies

pytestmark = pytest.mark.slow
PROFILE = Path(__file__).resolve().parents[2] / "firmware_configs" / "x86-cpu.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(state: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "medchain_app.cli", "edge", "run", "--config", str(PROFILE),
                             "--state-dir", str(state), "--port", str(port), "--host", "127.0.0.1",
                             "--out", str(state / "deidentified")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready:" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("edge agent did not become ready")


def _stream(port: int, items, acked: list, stop: threading.Event) -> None:
    """One association, one C-STORE at a time; remember each instance that got Success."""
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER_CT")
    ae.add_requested_context(items[0].sop_class, items[0].transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDCHAIN_EDGE")
    try:
        for it in items:
            if stop.is_set() or not assoc.is_established:
                return
            try:
                status = assoc.send_c_store(it.payload)
            except Exception:
                return
            if status is not None and "Status" in status and status.Status == 0:
                acked.append(str(it.payload.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.abort()


def _settled(out: Path, spool: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not list((spool / "segments").glob("*.log")):  # every record handed off
            return
        time.sleep(0.2)
    pytest.fail("spool did not drain after restart")


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path):
    state = tmp_path / "state"
    new_secret(state / "keys" / "site.secret")
    pz = Pseudonymizer(load_secret(state / "keys" / "site.secret"), "site-a")
    items = items_from_datasets([ds for st in generate_studies("CT", 10, seed=42) for ds in st.datasets])
    port = _free_port()

    proc = _start(state, port)
    acked: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=_stream, args=(port, items, acked, stop))
    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 12 and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert workers, "the node processes objects in a worker process"
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: more instances are on the wire
    proc.wait(10)
    stop.set()
    sender.join(30)
    assert 12 <= len(acked) < len(items), "the kill should land mid-stream"
    deadline = time.monotonic() + 10  # the orphaned worker notices and leaves
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "worker outlived its node"

    proc = _start(state, port)  # restart: the spool is processed first
    try:
        _settled(state / "deidentified", state / "spool")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.wait(30)
    assert output == 0  # SIGTERM: clean exit

    out = state / "deidentified"
    for uid in acked:
        assert len(list(out.rglob(f"{pz.uid(uid)}.dcm"))) == 1, "an acknowledged instance is missing or doubled"
    files = list(out.rglob("*.dcm"))
    assert len(files) == len({f.name for f in files}) >= len(acked)
    assert not list(out.rglob("*.part")) and not list((state / "spool" / "segments").iterdir())
