"""Bad input on the command line, as a new user types it: each case ends with a non-zero exit
status and exactly one line on stderr that names the problem, never a traceback and never a
silent exit 0; arguments are refused before any network wait; a closed stdout ends quietly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medchain_app.cli import main

PROFILE = "firmware_configs/x86-cpu.toml"
NOT_UTF8 = "patient_id,accession,label,consent_training,consent_research,consent_inference\n" \
           "M\u00fcller-01,A1,benign,yes,yes,yes\n".encode("latin-1")
SEMICOLONS = b"patient_id;accession;label;consent_training;consent_research;consent_inference\n" \
             b"P1;A1;benign;yes;yes;yes\n"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """What the cases refer to: a 4-validator genesis, a cloud.toml whose broker is not
    running, an edge state folder with its site secret, and CSV exports a user might have."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["ledger", "genesis", "--dir", str(root / "ledger")]) == 0
    assert main(["cloud", "init", "--dir", str(root / "cloud"), "--ledger-dir", str(root / "ledger"),
                 "--port", str(closed_port())]) == 0
    bare = root / "cloud-without-ca"  # a hand-made configuration: no CA beside it
    bare.mkdir()
    text = (root / "cloud" / "cloud.toml").read_text().replace("embedded = false", "embedded = true")
    (bare / "cloud.toml").write_text(text.replace('"keys/', f'"{root / "cloud" / "keys"}/'))
    assert main(["keys", "new", "secret", str(root / "edge" / "keys" / "site.secret")]) == 0
    (root / "latin1.csv").write_bytes(NOT_UTF8)
    (root / "semicolons.csv").write_bytes(SEMICOLONS)
    (root / "empty").mkdir()
    return root


def cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, words the one error line must contain)."""
    genesis, cloud = str(root / "ledger" / "genesis.json"), str(root / "cloud" / "cloud.toml")
    edge = ["--config", PROFILE, "--state-dir", str(root / "edge")]
    rollout = ["cloud", "rollout", "--config", cloud, "--group", "g", "--model", "ab" * 32]
    return {
        "unknown command": (["bogus"], "invalid choice: 'bogus'"),
        "negative studies": (["scanner", "send", "--modality", "CT", "--studies", "-1"], "--studies"),
        "zero studies": (["scanner", "send", "--modality", "CT", "--studies", "0"], ">= 1, got 0"),
        "studies not a number": (["scanner", "send", "--modality", "CT", "--studies", "two"], "got 'two'"),
        "negative seed": (["scanner", "generate", "--modality", "CT", "--seed", "-3", "--out", str(root / "g")],
                          "--seed"),
        "port out of range": (["scanner", "send", "--modality", "CT", "--port", "70000"], "from 1 to 65535"),
        "zero concurrency": (["scanner", "send", "--modality", "CT", "--concurrency", "0"], "--concurrency"),
        "negative retries": (["scanner", "send", "--modality", "CT", "--retries", "-1"], "--retries"),
        "unreachable port": (["scanner", "send", "--modality", "CT", "--port", str(closed_port())],
                             "Connection refused"),
        "unknown host": (["scanner", "send", "--modality", "CT", "--host", "nowhere.invalid"], "unknown host"),
        "missing folder": (["scanner", "replay", str(root / "no-such-folder")], "no such folder"),
        "edge port out of range": (["edge", "run", *edge, "--port", "65536"], "--port"),
        "Latin-1 CSV": (["edge", "records", "import", *edge, str(root / "latin1.csv")], "not UTF-8"),
        "semicolon CSV": (["edge", "records", "import", *edge, str(root / "semicolons.csv")], "';'"),
        "missing CSV": (["edge", "records", "import", *edge, str(root / "none.csv")], "cannot read"),
        "unknown validator id": (["ledger", "validator", "--genesis", genesis, "--id", "9"], "no validator 9"),
        "negative validator id": (["ledger", "validator", "--genesis", genesis, "--id", "-1"], "--id"),
        "zero seeds": (["ledger", "simulate", "--seeds", "0"], "--seeds"),
        "validators past port 65535": (["ledger", "genesis", "--dir", str(root / "g2"), "--base-port", "65534"],
                                       "65536"),
        "genesis exists": (["ledger", "genesis", "--dir", str(root / "ledger")], "already exists"),
        "too few validators": (["ledger", "genesis", "--dir", str(root / "g3"), "--n", "-1"], "3f + 1"),
        "broker port out of range": (["cloud", "broker", "--port", "-5"], "--port"),
        "embedded broker without a CA": (["cloud", "broker", "--config", str(root / "cloud-without-ca/cloud.toml")],
                                         "no certificate authority"),
        "coordinator's embedded broker without a CA": (
            ["cloud", "run", "--config", str(root / "cloud-without-ca/cloud.toml")], "certificate authority"),
        "cloud init port zero": (["cloud", "init", "--dir", str(root / "c2"), "--ledger-dir", str(root),
                                  "--port", "0"], "--port"),
        "canary share above one": ([*rollout, "--canary", "5"], "--canary"),
        "negative timeout": ([*rollout, "--timeout", "-1"], "--timeout"),
        "model hash not hex": (["cloud", "rollout", "--config", cloud, "--group", "g", "--model", "zz"],
                               "hex digits"),
        "envelope id not hex": (["cloud", "prediction", "--config", cloud, "--envelope", "xyz"], "hex digits"),
        "public key not hex": (["cloud", "enroll", "--config", cloud, "--device-id", "d", "--public-key", "12",
                                "--site", "s", "--group", "g", "--out", str(root / "e.json")], "32 bytes"),
        "zero epochs": (["cloud", "train", "--config", cloud, "--modality", "CR", "--out", str(root / "r"),
                         "--epochs", "0"], "--epochs"),
        "missing cloud config": (["cloud", "devices", "--config", str(root / "none.toml")], "not found"),
        "demo with negative studies": (["demo", "--workdir", str(root / "demo"), "--studies", "-1"], "--studies"),
        "demo with no new studies": (["demo", "--workdir", str(root / "demo"), "--new-studies", "0"],
                                     "--new-studies"),
        "key file that is not a key": (["keys", "show", str(root / "latin1.csv")], "latin1.csv"),
    }


CASES = sorted(cases(Path("/x")))


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_a_non_zero_exit(site, name, capsys):
    argv, words = cases(site)[name]
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's usage errors leave through SystemExit(2)
        status = exc.code
    elapsed = time.monotonic() - t0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert status == 2, (status, out, err)
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in out + err
    assert elapsed < 15, f"{name}: {elapsed:.1f} s before the error"  # no network wait first


def test_folder_without_dicom_is_an_error_not_an_empty_success(site, capsys):
    """``scanner replay`` of a folder with nothing to send says so (exit 2), once the node
    answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        status = main(["scanner", "replay", str(site / "empty"), "--port", str(listener.getsockname()[1])])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and "no DICOM object to send" in err[0]


def medchain(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medchain_app.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_a_taken_port_is_one_line_from_the_real_process(site):
    """The edge node and the embedded broker, started as users start them, on a port that
    another program holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        edge = medchain("--log-level", "WARNING", "edge", "run", "--config", PROFILE, "--state-dir",
                        str(site / "edge"), "--out", str(site / "out"), "--host", "127.0.0.1", "--port", port)
        broker = medchain("cloud", "broker", "--port", port)
    for done, words in ((edge, "DICOM node cannot listen"), (broker, "embedded broker cannot listen")):
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and words in done.stderr and "in use" in done.stderr, done.stderr


def test_unreachable_host_and_latin1_csv_from_the_real_process(site):
    refused = medchain("scanner", "send", "--modality", "CT", "--port", str(closed_port()), "--no-progress")
    latin1 = medchain("edge", "records", "import", "--config", PROFILE, "--state-dir", str(site / "edge"),
                      str(site / "latin1.csv"))
    for done in (refused, latin1):
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert "M\u00fcller" not in latin1.stderr  # the error names where, never the value


@pytest.mark.parametrize("argv", [["ledger", "simulate", "--seeds", "2"], ["keys", "show", "KEY"]],
                         ids=["simulate", "keys show"])
def test_stdout_closed_early_ends_quietly(site, argv):
    """``medchain ... | head -1``: the reader is gone before anything is written."""
    argv = [str(site / "edge" / "keys" / "device.key") if a == "KEY" else a for a in argv]
    if "keys" in argv:
        assert main(["keys", "new", "signing", argv[-1]]) == 0
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "medchain_app.cli", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr
