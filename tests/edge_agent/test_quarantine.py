"""The quarantine as a PACS administrator uses it: originals kept private (0700/0600), listed
and inspected by tag without a value, released (with a reviewed check waived) back into a
running node, or deleted — each action in the log."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent.errors import QuarantineError
from edge_agent.quarantine import QuarantineStore
from edge_agent.sink import FolderSink
from scanner_sim.sender import items_from_datasets, send
from scanner_sim.studies import generate_studies


def _send(node, datasets):
    return send("127.0.0.1", node.port, items_from_datasets(datasets), calling_ae="SCANNER",
                called_ae=node.dicom.ae_title, concurrency=1, progress=False)


def _us():
    ds = generate_studies("US", 1, 21)[0].datasets[0]
    del ds.BurnedInAnnotation  # a US image that does not say NO: suspect under the policy
    return ds


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_originals_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = QuarantineStore(tmp_path / "q")
        store.put("a-1", b"raw bytes with PHI", "burned-in-annotation")
        store.request_release("a-1", frozenset({"burned-in"}))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "q") == 0o700
    files = list((tmp_path / "q").iterdir())
    assert {p.suffix for p in files} == {".dcm", ".json", ".release", ".log"}
    assert all(_mode(p) == 0o600 for p in files), [(p.name, oct(_mode(p))) for p in files]


def test_show_lists_tags_and_never_a_value(tmp_path):
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-SECRET-77"
    item = Dataset()
    item.CodeMeaning = "Jane's clinic"
    ds.ProcedureCodeSequence = [item]
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    store = QuarantineStore(tmp_path / "q")
    store.put("b-1", buf.getvalue(), "deid-failed", "element (0010,0010) cannot be decoded")
    lines = list(store.tags("b-1"))
    text = repr(lines)
    assert "Doe" not in text and "SECRET" not in text and "Jane" not in text
    assert {(line.tag, line.keyword) for line in lines} >= {("(0010,0010)", "PatientName"),
                                                           ("(0008,0104)", "CodeMeaning")}
    assert next(line for line in lines if line.keyword == "CodeMeaning").depth == 1
    assert [a["action"] for a in store.actions()] == ["show"]


def test_bad_requests_are_clear_errors(tmp_path):
    store = QuarantineStore(tmp_path / "q")
    with pytest.raises(QuarantineError, match="no entry nope"):
        store.request_release("nope")
    with pytest.raises(QuarantineError, match="not an entry id"):
        store.delete("../etc/passwd")
    store.put("c-1", b"x", "worker-crashed")
    with pytest.raises(QuarantineError, match="unknown waiver"):
        store.request_release("c-1", frozenset({"everything"}))


def _cli(profile_file, state_dir, *args):
    return subprocess.run([sys.executable, "-m", "medchain_app.cli", "edge", "quarantine", *args,
                           "--config", str(profile_file), "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=120)


def test_release_through_the_command_line_into_a_running_node(make_node, profile, tmp_path):
    """Quarantined by policy; released without a waiver it is quarantined again; released
    waiving the reviewed check it is forwarded; a second object is deleted. All logged."""
    node = make_node(processes=0, release_poll_s=0.1).start()
    first, second = _us(), _us()
    second.SOPInstanceUID = generate_uid()
    assert _send(node, [first, second]).success == 2
    assert node.drain(30)
    entries = node.spool.quarantined()
    assert [e.reason for e in entries] == ["burned-in-annotation"] * 2
    keep, drop = entries[0].spool_id, entries[1].spool_id

    listed = _cli(profile.source, tmp_path, "list")
    assert listed.returncode == 0 and keep in listed.stdout and "burned-in-annotation" in listed.stdout
    shown = _cli(profile.source, tmp_path, "show", keep)
    assert shown.returncode == 0 and "(0010,0010)" in shown.stdout
    assert str(first.PatientName) not in shown.stdout and str(first.PatientID) not in shown.stdout

    assert _cli(profile.source, tmp_path, "release", keep).returncode == 0
    _wait(lambda: node.stats.quarantined["burned-in-annotation"] == 3)
    [again] = [e for e in node.spool.quarantined() if e.spool_id not in (keep, drop)]

    assert _cli(profile.source, tmp_path, "release", again.spool_id, "--waive", "burned-in").returncode == 0
    _wait(lambda: node.stats.forwarded == 1)
    [out] = FolderSink(tmp_path / "out").files()
    assert dcmread(out).PatientIdentityRemoved == "YES"
    assert str(first.PatientName).encode() not in out.read_bytes()

    deleted = _cli(profile.source, tmp_path, "delete", drop)
    assert deleted.returncode == 0 and node.spool.quarantined() == []
    assert not list(node.spool.waivers_dir.iterdir())
    log = QuarantineStore(profile.spool.dir / "quarantine").actions()
    assert [(a["action"], a["id"], a["waived"]) for a in log] == [
        ("show", keep, []), ("release", keep, []), ("release", again.spool_id, ["burned-in"]),
        ("delete", drop, [])]
    assert all(a["user"] for a in log)
    missing = _cli(profile.source, tmp_path, "delete", drop)
    assert missing.returncode == 2 and "no entry" in missing.stderr and "Traceback" not in missing.stderr


def _wait(condition, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _pdf_instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "MRN-PDF-1", "Doe^Pdf", "DOC"
    ds.DocumentTitle = "Discharge letter for Jane Doe"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 Jane Doe, born 1970-01-01, MRN-PDF-1\n%%EOF\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_an_encapsulated_pdf_is_quarantined_then_released_as_a_dummy(make_node, tmp_path):
    """Before this change (c1ffc7f) the document's bytes and title were forwarded as they were."""
    node = make_node(processes=0, release_poll_s=0.1).start()
    assert _send(node, [_pdf_instance()]).success == 1
    assert node.drain(30)
    [entry] = node.spool.quarantined()
    assert entry.reason == "encapsulated-document" and node.stats.forwarded == 0
    node.spool.quarantine_store.request_release(entry.spool_id, frozenset({"document"}))
    _wait(lambda: node.stats.forwarded == 1)
    [out] = FolderSink(tmp_path / "out").files()
    data = out.read_bytes()
    assert b"Jane" not in data and b"Doe" not in data and b"1970" not in data and b"MRN-PDF" not in data
