"""The DICOM node over real sockets: pynetdicom and dcmtk as peers, statuses, back-pressure,
malformed input, burned-in text, sink failures and restarts."""

from __future__ import annotations

import io
import os
import subprocess
import threading

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from edge_agent.config import BurnedInPolicy, Region
from edge_agent.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from edge_agent.processor import Processor
from edge_agent.sink import FolderSink
from edge_agent.spool import Spool
from scanner_sim.sender import Item, items_from_datasets, send
from scanner_sim.studies import generate_studies, part10_bytes, write_studies


def _send(node, items, calling="SCANNER", concurrency=1):
    return send("127.0.0.1", node.port, items, calling_ae=calling, called_ae=node.dicom.ae_title,
                concurrency=concurrency, progress=False)


def _ct(n=1, seed=3):
    return [ds for st in generate_studies("CT", n, seed, images_per_study=2) for ds in st.datasets]


def test_store_spools_deidentifies_and_forwards(make_node, tmp_path):
    node = make_node().start()
    datasets = _ct(2)
    result = _send(node, items_from_datasets(datasets), concurrency=2)
    assert result.success == 4 and not result.statuses
    assert node.drain(30)
    files = FolderSink(tmp_path / "out").files()
    assert len(files) == 4 and node.spool.pending() == []
    names = {str(ds.PatientName) for ds in datasets} | {ds.PatientID for ds in datasets}
    for f in files:
        data = f.read_bytes()
        assert not any(n.encode() in data for n in names)
        out = dcmread(f)
        assert out.PatientIdentityRemoved == "YES" and out.SOPInstanceUID.startswith("2.25.")
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.pixel_array.shape == (512, 512)
    assert node.stats.as_dict()["forwarded"] == 4


def test_dcmtk_echoscu_storescu_and_rejected_caller(make_node, tmp_path, storescu, echoscu):
    node = make_node().start()
    port = str(node.port)
    paths = write_studies(generate_studies("MR", 1, 5), tmp_path / "mr")
    ok = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", node.dicom.ae_title, "127.0.0.1", port],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    stored = subprocess.run([storescu, "-aet", "STORESCU", "-aec", node.dicom.ae_title, "127.0.0.1", port,
                             *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    bad = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", node.dicom.ae_title, "127.0.0.1", port],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
    assert node.drain(30)
    assert node.stats.stored == len(paths) == node.stats.forwarded
    assert node.stats.rejected_associations == 1


def test_backpressure_and_full_spool_answer_out_of_resources(make_node, tmp_path):
    reason = ["outbox full (demo)"]
    node = make_node(backpressure=lambda: reason[0]).start()
    result = _send(node, items_from_datasets(_ct(1)))
    assert result.statuses == {OUT_OF_RESOURCES: 2} and node.spool.pending() == []
    reason[0] = None
    assert _send(node, items_from_datasets(_ct(1))).success == 2
    node.stop()

    # the spool's own max_bytes: room for one 512x512 slice, not two, while the sink holds on
    release = threading.Event()

    class SlowSink(FolderSink):
        def accept(self, instance):
            release.wait(30)
            super().accept(instance)

    small = make_node(spool_bytes=600_000, sink=SlowSink(tmp_path / "slow")).start()
    result = _send(small, items_from_datasets(_ct(1, seed=9)))
    assert result.success == 1 and result.statuses == {OUT_OF_RESOURCES: 1}
    assert small.stats.refused == {"spool-full": 1}
    release.set()
    assert small.drain(30) and small.stats.forwarded == 1


def test_malformed_input_is_refused_or_quarantined_and_the_node_keeps_serving(make_node, tmp_path):
    node = make_node().start()
    good = _ct(1, seed=11)
    raw = part10_bytes(good[0])
    # truncated in the middle of the pixel data
    (tmp_path / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    # a bad VR ("ZZ") in the middle of the dataset, in an explicit VR stream
    at = raw.index(b"\x08\x00\x70\x00LO")  # Manufacturer
    (tmp_path / "badvr.dcm").write_bytes(raw[:at + 4] + b"ZZ" + raw[at + 6:])
    # pixel data that claims to be JPEG 2000 but is not a codestream
    j2k = good[1].copy()
    j2k.file_meta = good[1].file_meta.copy()
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    j2k.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    j2k["PixelData"].VR = "OB"
    items = [Item(str(good[0].SOPClassUID), "1.2.840.10008.1.2.1", tmp_path / "truncated.dcm", "truncated"),
             Item(str(good[0].SOPClassUID), "1.2.840.10008.1.2.1", tmp_path / "badvr.dcm", "badvr"),
             Item(str(j2k.SOPClassUID), JPEG2000Lossless, tmp_path / "j2k.dcm", "j2k")]
    j2k.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    result = _send(node, items)
    assert node.drain(30)
    outcomes = result.statuses.get(CANNOT_UNDERSTAND, 0) + sum(node.stats.quarantined.values())
    assert outcomes == 3, (result.summary(), node.stats.as_dict())
    assert node.stats.quarantined["undecodable-pixel-data"] >= 1
    for entry in node.spool.quarantined():
        assert entry.reason in ("undecodable-pixel-data", "undecodable-dataset", "deid-failed")
    # and the next scanner is served as usual
    assert _send(node, items_from_datasets(_ct(1, seed=12))).success == 2
    assert node.drain(30) and node.stats.forwarded == 2


def test_missing_file_meta_in_the_spool_is_quarantined(secret, profile):
    from edge_agent.errors import Quarantined

    proc = Processor.from_config(profile.deid, secret)
    raw = part10_bytes(_ct(1)[0])
    with pytest.raises(Quarantined, match="missing-file-meta"):
        proc.process(raw[132 + 200:], "x")  # a dataset stream without preamble and meta
    assert proc.process(raw, "y").modality == "CT"


def _us(flag: str | None):
    ds = generate_studies("US", 1, 21)[0].datasets[0]
    if flag is None:
        del ds.BurnedInAnnotation
    else:
        ds.BurnedInAnnotation = flag
    return ds


def test_burned_in_text_is_quarantined_under_the_quarantine_policy(make_node):
    node = make_node().start()
    assert _send(node, items_from_datasets([_us("YES"), _us(None), _us("NO")])).success == 3
    assert node.drain(30)
    assert node.stats.quarantined["burned-in-annotation"] == 2 and node.stats.forwarded == 1


def test_blank_policy_blanks_the_configured_region(make_node, tmp_path):
    policy = BurnedInPolicy("blank", (Region(0, 0, 100, 20),), ("US",))
    node = make_node(burned_in=policy).start()
    source = _us("YES")
    assert _send(node, items_from_datasets([source])).success == 1
    assert node.drain(30)
    [f] = FolderSink(tmp_path / "out").files()
    out = dcmread(f)
    pixels = out.pixel_array
    assert out.BurnedInAnnotation == "NO" and "113101" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert not pixels[:, :20, :100].any()
    assert np.array_equal(pixels[:, 20:, :], source.pixel_array[:, 20:, :])


def _ct_with_text(seed=5):
    """A CT slice whose pixels carry a patient's name and birth date, drawn at the stored
    maximum as scanners do, while its header says Burned In Annotation NO."""
    import copy

    import cv2
    from pydicom.uid import generate_uid

    clean = _ct(1, seed)[0]
    ds = copy.deepcopy(clean)
    pixels = clean.pixel_array.copy()
    ink = np.zeros(pixels.shape, np.uint8)
    cv2.putText(ink, "DOE^JANE  1970-01-01", (24, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2)
    pixels[ink > 0] = pixels.max()
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "NO"
    ds.SOPInstanceUID = generate_uid()
    return clean, ds, pixels != clean.pixel_array


def test_burned_in_text_found_in_the_pixels_is_quarantined_whatever_the_flag(make_node, tmp_path, storescu):
    """Before this change (c1ffc7f) a CT saying Burned In Annotation NO was never looked at:
    this one went out with the name in its pixels."""
    node = make_node().start()
    clean, texted, _ = _ct_with_text()
    for i, ds in enumerate((clean, texted)):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        run = subprocess.run([storescu, "-aet", "STORESCU", "-aec", node.dicom.ae_title, "127.0.0.1",
                              str(node.port), str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    assert node.drain(60)
    assert node.stats.forwarded == 1 and dict(node.stats.quarantined) == {"burned-in-text": 1}
    [entry] = node.spool.quarantined()
    assert "text region" in entry.detail


def test_blank_policy_blanks_exactly_the_text_found(make_node, tmp_path):
    import json

    node = make_node(burned_in=BurnedInPolicy("blank", (), ("US",))).start()
    _, texted, ink = _ct_with_text()
    assert _send(node, items_from_datasets([texted])).success == 1
    assert node.drain(60)
    [f] = FolderSink(tmp_path / "out").files()
    out = dcmread(f)
    sidecar = json.loads(f.with_suffix(".json").read_text())
    boxes = sidecar["deid"]["blanked"]
    assert boxes and "113101" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    pixels = out.pixel_array
    assert not pixels[ink].any()  # every stroke of the text is gone
    inside = np.zeros(ink.shape, bool)
    for x, y, w, h in boxes:  # the recorded boxes, with the 2-pixel blanking margin
        inside[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = True
    assert np.array_equal(pixels[~inside], texted.pixel_array[~inside])  # nothing else touched
    assert inside.sum() < 0.05 * inside.size


class FlakySink(FolderSink):
    """Fails the first ``n`` times, like a full disk that gets freed."""

    def __init__(self, root, n):
        super().__init__(root)
        self.left = n

    def accept(self, instance):
        if self.left > 0:
            self.left -= 1
            raise OSError("disk full")
        super().accept(instance)


def test_a_failing_sink_leaves_the_object_spooled_and_it_is_retried(make_node, tmp_path):
    sink = FlakySink(tmp_path / "out", 2)
    node = make_node(sink=sink, retry_delay=0.2).start()
    assert _send(node, items_from_datasets(_ct(1)[:1])).success == 1
    import time

    deadline = time.monotonic() + 20
    while node.stats.forwarded < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.stats.sink_failures == 2 and node.stats.forwarded == 1
    assert len(sink.files()) == 1 and node.spool.pending() == []


def test_spooled_objects_from_before_a_restart_are_processed_first(profile, secret, tmp_path):
    spool = Spool(profile.spool.dir, profile.spool.max_bytes)
    for ds in _ct(1):
        spool.put(part10_bytes(ds))
    from edge_agent.node import EdgeNode

    node = EdgeNode(profile.dicom, Spool(profile.spool.dir, profile.spool.max_bytes),
                    Processor.from_config(profile.deid, secret), FolderSink(tmp_path / "out"))
    with node:
        assert node.drain(30)
    assert node.stats.forwarded == 2 and len(FolderSink(tmp_path / "out").files()) == 2


def test_same_object_twice_is_stored_once(make_node, tmp_path):
    node = make_node().start()
    ds = _ct(1)[0]
    for _ in range(2):
        assert _send(node, items_from_datasets([ds])).success == 1
    assert node.drain(30)
    assert len(FolderSink(tmp_path / "out").files()) == 1 and node.stats.forwarded == 2
    raw = FolderSink(tmp_path / "out").files()[0].read_bytes()
    assert dcmread(io.BytesIO(raw)).SOPInstanceUID != ds.SOPInstanceUID


CRASHING_PROCESSOR = '''
import os
from dataclasses import dataclass
from edge_agent.processor import Processor

@dataclass(frozen=True)
class CrashingProcessor(Processor):
    """Kills its worker process on one marked object, as a decoder crash on a hostile file would."""

    def process_keeping_dataset(self, raw, spool_id):
        if b"KILLTHEWORKER" in raw:
            os._exit(3)
        return super().process_keeping_dataset(raw, spool_id)
'''


def test_an_object_that_kills_the_worker_process_is_quarantined_and_the_rest_go_through(
        make_node, tmp_path, monkeypatch, secret, profile):
    """The worker process is spawned, so the crashing processor lives in a module it can import."""
    (tmp_path / "crashing_processor.py").write_text(CRASHING_PROCESSOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("crashing_processor")
    node = make_node(processes=1)
    node.processor = module.CrashingProcessor(**{f: getattr(node.processor, f) for f in ("pseudonymizer", "options",
                                                                                        "burned_in")})
    node.start()
    datasets = _ct(1, seed=31)
    datasets[1].ImageComments = "KILLTHEWORKER"
    assert _send(node, items_from_datasets(datasets)).success == 2
    assert node.drain(120)
    assert node.stats.quarantined == {"worker-crashed": 1} and node.stats.forwarded == 1
    [entry] = node.spool.quarantined()
    assert b"KILLTHEWORKER" in (node.spool.quarantine_dir / f"{entry.spool_id}.dcm").read_bytes()
    assert node.spool.pending() == []
    # and the node keeps serving with a fresh worker process
    assert _send(node, items_from_datasets(_ct(1, seed=32))).success == 2
    assert node.drain(60) and node.stats.forwarded == 3


class _Collect:
    def __init__(self):
        self.instances = []

    def accept(self, instance):
        self.instances.append(instance)


def test_worker_process_prepares_beside_deidentification(make_node):
    from edge_agent.preparation import Preparer
    from models.modality import config_for

    sink = _Collect()
    node = make_node(sink=sink, processes=1, preparer=Preparer.of({"CT": config_for("CT", size=32)})).start()
    assert _send(node, items_from_datasets(_ct(1))).success == 2
    assert node.drain(60) and len(sink.instances) == 2
    for instance in sink.instances:
        tensor = np.load(io.BytesIO(instance.preparation.tensor))
        assert tensor.shape == (1, 1, 32, 32) and instance.preparation.record["resolution"]["rows"] == 512
    assert node.stats.prepare_seconds > 0 and node.stats.deid_seconds > 0


@pytest.mark.parametrize("slots", ["shared memory", "too small", "no /dev/shm"])
def test_worker_results_come_back_whole_through_shared_memory_or_the_pipe(
        make_node, monkeypatch, tmp_path, slots):
    """The same de-identified bytes as in-thread processing, whichever way they travel: a
    slot (CT fits), the pipe (a slot too small for the object), or the pipe because the
    node could not make slots at all; the slots file is gone once the node stops."""
    import edge_agent.handback
    import edge_agent.workpool

    if slots == "too small":
        monkeypatch.setattr(edge_agent.workpool, "HANDBACK_SLOT_BYTES", 4096)
    if slots == "no /dev/shm":
        monkeypatch.setattr(edge_agent.handback, "SHM_DIR", tmp_path / "missing")
    items = items_from_datasets(_ct(1, seed=33))
    here, there = _Collect(), _Collect()
    for sink, processes in ((here, 0), (there, 1)):
        node = make_node(sink=sink, processes=processes).start()
        assert _send(node, items).success == 2 and node.drain(60)
        handback = node.pool.handback
        assert (handback is not None) == (processes == 1 and slots != "no /dev/shm")
        node.stop()
        assert handback is None or not handback.path.exists()
    assert sorted(i.dicom for i in here.instances) == sorted(i.dicom for i in there.instances)
    assert all(len(i.dicom) > 500_000 for i in there.instances)


def test_worker_processes_run_behind_the_scp_threads_on_the_cpu(make_node):
    """De-identification steps back (nice) so a scanner's burst is answered first."""
    from edge_agent.workpool import WORKER_NICENESS

    own = os.nice(0)
    node = make_node(processes=1).start()
    assert node.pool.call(os.nice, 0) == min(19, own + WORKER_NICENESS)
    same = make_node(processes=1, worker_niceness=0).start()
    assert same.pool.call(os.nice, 0) == own


def test_a_spooled_object_that_cannot_be_read_is_retried_not_dropped(make_node, profile):
    """Its segment vanishes from under the node (as on an unmounted or failing disk), then
    comes back: the object is tried again, backing off, and forwarded once it reads."""
    import time

    first = Spool(profile.spool.dir, profile.spool.max_bytes)
    spool_id = first.put(part10_bytes(_ct(1, seed=41)[0]))
    first.close()
    node = make_node(retry_delay=0.1, processes=0)  # its spool scans the segment now
    segment = next((profile.spool.dir / "segments").glob("*.log"))
    hidden = segment.with_name("moved-away")
    segment.rename(hidden)
    node.start()
    deadline = time.monotonic() + 30
    while node.stats.spool_read_failures < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.stats.spool_read_failures >= 2 and node.stats.forwarded == 0
    assert node.spool.pending() == [spool_id]  # still there, still owed downstream
    hidden.rename(segment)
    deadline = time.monotonic() + 30
    while node.stats.forwarded < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.stats.forwarded == 1 and node.spool.pending() == []


def test_a_spool_record_damaged_on_disk_is_quarantined_not_forwarded(make_node, profile):
    first = Spool(profile.spool.dir, profile.spool.max_bytes)
    first.put(part10_bytes(_ct(1, seed=42)[0]))
    damaged = bytearray(part10_bytes(_ct(1, seed=43)[0]))
    bad = first.put(bytes(damaged))
    first.close()
    damaged[-1000] ^= 0xFF  # a bad sector in the second (last) object's pixel data
    segment = next((profile.spool.dir / "segments").glob("*.log"))
    blob = bytearray(segment.read_bytes())
    blob[-1000] ^= 0xFF
    segment.write_bytes(bytes(blob))
    sink = _Collect()
    node = make_node(sink=sink).start()  # the worker process reads and checks each record
    assert node.drain(60)
    assert node.stats.quarantined == {"spool-damaged": 1} and node.stats.forwarded == 1
    [entry] = node.spool.quarantined()
    assert entry.spool_id == bad and entry.reason == "spool-damaged"
    assert (node.spool.quarantine_dir / f"{bad}.dcm").read_bytes() == damaged  # as it is, for a person
    assert node.spool.pending() == [] and len(sink.instances) == 1
