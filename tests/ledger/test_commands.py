"""``medchain ledger ...`` as users run it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from medchain_app.cli import main


def test_genesis_command_writes_keys_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["ledger", "genesis", "--dir", str(tmp_path), "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "n=4, f=1" in out and "PRIVATE" not in out
    assert (tmp_path / "genesis.json").exists()
    assert len(list((tmp_path / "keys").glob("validator-*.key"))) == 4
    assert main(["ledger", "genesis", "--dir", str(tmp_path)]) == 2


def test_genesis_command_refuses_a_bad_validator_count(tmp_path, capsys):
    assert main(["ledger", "genesis", "--dir", str(tmp_path), "--n", "5"]) == 2
    assert "3f + 1" in capsys.readouterr().err


def test_validator_refuses_a_key_that_is_not_its_own(tmp_path, capsys):
    main(["ledger", "genesis", "--dir", str(tmp_path)])
    capsys.readouterr()
    code = main(["ledger", "validator", "--genesis", str(tmp_path / "genesis.json"), "--id", "1",
                 "--key", str(tmp_path / "keys" / "validator-0.key")])
    assert code == 2 and "does not match validator 1" in capsys.readouterr().err


def test_byzantine_mode_needs_the_test_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDCHAIN_ALLOW_BYZANTINE", raising=False)
    main(["ledger", "genesis", "--dir", str(tmp_path)])
    code = main(["ledger", "validator", "--genesis", str(tmp_path / "genesis.json"), "--id", "0",
                 "--data", str(tmp_path / "d"), "--byzantine", "replay"])
    assert code == 2 and "MEDCHAIN_ALLOW_BYZANTINE" in capsys.readouterr().err


def test_simulate_command_reports_seeds(capsys):
    assert main(["ledger", "simulate", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: ok" in out and "0 failed" in out


@pytest.mark.slow
def test_cluster_command_runs_in_the_foreground_and_stops_on_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "medchain_app.cli", "ledger", "cluster", "--dir", str(tmp_path),
         "--report-s", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "v3: h=" in line:
                break
        assert any("ledger cluster up" in x for x in lines), "".join(lines)
        status = subprocess.run(
            [sys.executable, "-m", "medchain_app.cli", "ledger", "status", "--genesis",
             str(tmp_path / "genesis.json")], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and status.stdout.count("height 0 view 0 normal") == 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopping" in out
