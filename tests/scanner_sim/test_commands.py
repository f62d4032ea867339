"""The console commands as users run them: scanner send / replay / generate, edge records."""

from __future__ import annotations

from dataclasses import replace

from edge_agent.node import EdgeNode
from edge_agent.processor import Processor
from edge_agent.sink import FolderSink
from edge_agent.spool import Spool
from medchain_app.cli import main


def _node(tmp_path):
    from edge_agent.config import load_profile, profile_path

    profile = load_profile(profile_path("x86-cpu"), base_dir=tmp_path)
    dicom = replace(profile.dicom, port=0, host="127.0.0.1", allowed_calling_aets=("*",))
    return EdgeNode(dicom, Spool(profile.spool.dir, 10**9), Processor.from_config(profile.deid, bytes(32)),
                    FolderSink(tmp_path / "out"))


def test_scanner_send_replay_and_records_import(tmp_path, capsys):
    with _node(tmp_path) as node:
        port = str(node.port)
        assert main(["scanner", "send", "--port", port, "--modality", "CT", "--studies", "2", "--no-progress",
                     "--records", str(tmp_path / "truth.csv"), "--save", str(tmp_path / "sent")]) == 0
        assert "8/8 stored" in capsys.readouterr().out
        assert main(["scanner", "generate", "--modality", "DX", "--studies", "2", "--out", str(tmp_path / "dx")]) == 0
        (tmp_path / "dx" / "notes.txt").write_text("not DICOM")
        assert main(["scanner", "replay", str(tmp_path / "dx"), "--port", port, "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "2/2 stored" in out and "skipped 1 file(s): no SOP Class/Instance UID" in out
        assert node.drain(30)
    assert len(FolderSink(tmp_path / "out").files()) == 10

    assert main(["keys", "new", "secret", str(tmp_path / "keys" / "site.secret")]) == 0
    config = "firmware_configs/x86-cpu.toml"
    assert main(["edge", "records", "import", "--config", config, "--state-dir", str(tmp_path),
                 str(tmp_path / "truth.csv")]) == 0
    out = capsys.readouterr().out
    assert "imported 2 record(s)" in out and "MRN" not in out
    # a missing secret is a clear error, not a traceback
    assert main(["edge", "records", "import", "--config", config, "--state-dir", str(tmp_path / "nokeys"),
                 str(tmp_path / "truth.csv")]) == 2
    assert "medchain keys new secret" in capsys.readouterr().err
