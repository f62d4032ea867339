"""The console script as users run it: demo and key commands."""

import json
import stat
import subprocess
import sys

import pytest

from medchain_app.cli import main


def test_demo_runs_the_whole_system_end_to_end(tmp_path, capsys, monkeypatch):
    """`make demo` in small: scanners -> edge -> cloud -> ledger -> training -> rollout ->
    predictions proven from the ledger; with a relative --workdir, as `make demo` runs it."""
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", "demo", "--studies", "30", "--new-studies", "3",
            "--epochs", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.split("summary   ")[1].splitlines()[0])
    assert summary["instances_stored"] == 33
    assert summary["new_studies"] == 3 and summary["ledger_height"] > 0
    assert summary["training_reads_audited"] >= summary["training_reads_granted"] > 0
    assert summary["training_reads_audited"] > summary["training_reads_granted"]  # withdrawn consent
    assert "rollout" in out and '"result": "complete"' in out
    assert "inclusion proof and commit certificate" in out
    # training read through the custodian process; the coordinator holds its public key only
    assert "custodian its own process" in out
    # one granted access (fetched, opened in pydicom) and one denied, both on the audit trail
    assert summary["access_fetched"] == 1 and "opens in pydicom: CR" in out
    assert '"granted": false' in out and "consent" in out.split("asks for two images")[1]
    assert (workdir / "cloud" / "keys" / "custodian.pub").exists()
    assert not (workdir / "cloud" / "keys" / "custodian.key").exists()
    for key in (workdir / "edge-1" / "keys").iterdir():  # secrets; certificates (ca.pem) are public
        if key.suffix in (".key", ".secret"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # a second run replaces the demo folder; a folder the demo did not make is refused
    assert (workdir / ".medchain-demo").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a demo folder"):
        main(["demo", "--workdir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_keys_new_and_show(tmp_path, capsys):
    path = tmp_path / "device.key"
    assert main(["keys", "new", "signing", str(path)]) == 0
    created = capsys.readouterr().out
    assert main(["keys", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    public = created.split("public=")[1].strip()
    assert public in shown and "Ed25519" in shown and "PRIVATE" not in shown
    assert main(["keys", "new", "recipient", str(tmp_path / "c.key")]) == 0
    assert main(["keys", "new", "secret", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s").stat().st_size == 32


def test_errors_are_reported_not_raised(tmp_path, capsys):
    path = tmp_path / "k"
    assert main(["keys", "new", "signing", str(path)]) == 0
    assert main(["keys", "new", "signing", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    path.chmod(0o644)
    assert main(["keys", "show", str(path)]) == 2
    assert "too open" in capsys.readouterr().err


def test_console_script_help_lists_only_real_commands():
    out = subprocess.run([sys.executable, "-m", "medchain_app.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "keys" in out
