"""Real files nobody here wrote: every file among pydicom's bundled test files and the
pydicom-data package is sent to the running node over the network — by dcmtk's storescu (a
real peer, one file per run) and by a pynetdicom SCU — and each is stored and de-identified,
or refused with a clear reason. For every stored one, no value of any attribute the profile
lists (with an action other than keep) appears anywhere in the de-identified bytes.

The counts are printed (run with ``-s`` to see them) and written to
``$MEDCHAIN_REPORT_DIR/real_files.json`` when that variable is set.
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import threading
from dataclasses import replace

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge_agent.annex_e import RULES, is_curve, is_overlay
from edge_agent.config import BurnedInPolicy, Region
from edge_agent.deid import DeidOptions, resolve_action
from scanner_sim.sender import items_from_paths, send

pytestmark = pytest.mark.slow
MIN_LEN = 4  # shorter values ("M", "70", "Y") occur by chance in any file and prove nothing


class RecordingSink:
    def __init__(self) -> None:
        self.instances = []
        self.lock = threading.Lock()

    def accept(self, instance) -> None:
        with self.lock:
            self.instances.append(instance)


def _raw_values(ds: Dataset, inside_removed: bool = False):
    """(tag, value bytes) of every listed attribute at any depth whose value must be gone;
    everything inside a removed, emptied or dummied sequence counts too."""
    options = DeidOptions()
    for tag in list(ds.keys()):
        tag = int(tag)
        try:
            raw = ds.get_item(tag)
            elem = ds[tag]
        except Exception:
            continue
        rule = RULES.get(tag)
        private = (tag >> 16) % 2 == 1 or is_overlay(tag) or is_curve(tag)
        action = resolve_action(rule, elem.VR, options) if rule is not None else None
        gone = inside_removed or (action is not None and action not in ("K", "KSQ", "C"))
        if elem.VR == "SQ":
            seq_gone = inside_removed or (action in ("X", "Z", "D"))
            for item in elem.value:
                yield from _raw_values(item, seq_gone)
            continue
        if not gone or private or tag in (0x00080016, 0x00020002):
            continue
        value = getattr(raw, "value", None)
        if not isinstance(value, (bytes, bytearray)):
            continue
        for part in bytes(value).split(b"\\"):
            part = part.strip(b" \x00")
            if len(part) >= MIN_LEN:
                yield tag, part


# storescu proposes uncompressed syntaxes unless told otherwise; these options make it
# propose the compressed syntax a file is stored in (so it sends the file as it is)
STORESCU_OPTIONS = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
}


def _storescu_syntax(path) -> list[str]:
    try:
        ts = str(dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
    except Exception:
        return []
    return [STORESCU_OPTIONS[ts]] if ts in STORESCU_OPTIONS else []


def _kept_values(ds: Dataset) -> bytes:
    """The raw values of every attribute the profile does not list, in the de-identified
    output: a listed value found only inside one of these (e.g. Institution Name "TOSHIBA"
    inside Manufacturer "TOSHIBA_MEC") is a coincidence the profile allows, not a leak."""
    parts = []
    for tag in list(ds.keys()):
        raw, elem = ds.get_item(tag), ds[tag]
        if elem.VR == "SQ":
            parts += [_kept_values(item) for item in elem.value]
        elif int(tag) not in RULES and isinstance(getattr(raw, "value", None), (bytes, bytearray)):
            parts.append(bytes(raw.value))
    return b"\x01".join(parts)


def _leaks(original: bytes, deidentified: bytes) -> tuple[list[str], list[str]]:
    """(leaks, coincidences): listed values found in the output, split by whether a kept
    attribute explains them."""
    ds = dcmread(io.BytesIO(original), force=True)
    out = dcmread(io.BytesIO(deidentified))
    kept = _kept_values(out) + b"\x01" + _kept_values(out.file_meta)
    leaks, coincidences = [], []
    for t, v in _raw_values(ds):
        if v in deidentified:
            (coincidences if v in kept else leaks).append(f"({t >> 16:04X},{t & 0xFFFF:04X})")
    return leaks, coincidences


def test_every_real_file_is_stored_and_deidentified_or_refused_with_a_reason(
        corpus, profile, secret, make_node, storescu, tmp_path, capsys):
    assert len(corpus) > 200, "pydicom's test files and pydicom-data should give 250+ files"
    sink = RecordingSink()
    blank = BurnedInPolicy("blank", (Region(0, 0, 16, 8),), profile.deid.burned_in.suspect_modalities)
    node = make_node(sink=sink, burned_in=blank)
    node.dicom = replace(node.dicom, allowed_calling_aets=("*",))
    node.start()
    node.processor = replace(node.processor, options=DeidOptions())  # Basic Profile: every date goes

    outcomes = collections.Counter()
    leaks: dict[str, list[str]] = {}
    coincidences: dict[str, list[str]] = {}
    per_file = {}
    for path in corpus:
        before = (node.stats.stored, sum(node.stats.refused.values()), sum(node.stats.quarantined.values()),
                  len(sink.instances))
        # propose the file's own transfer syntax, as an administrator would configure storescu
        run = subprocess.run([storescu, *_storescu_syntax(path), "-aet", "STORESCU", "-aec", node.dicom.ae_title, "127.0.0.1",
                              str(node.port), str(path)], capture_output=True, text=True, timeout=60)
        assert node.drain(60)
        stored = node.stats.stored - before[0]
        refused = sum(node.stats.refused.values()) - before[1]
        quarantined = sum(node.stats.quarantined.values()) - before[2]
        new = sink.instances[before[3]:]
        if stored == 0 and refused == 0:
            detail = [line for line in (run.stderr or run.stdout).strip().splitlines() if line[:2] in ("E:", "F:")]
            message = detail[-1].split(": ", 1)[-1].split(" in file")[0] if detail else "sent nothing"
            outcome = f"not sent by storescu: {message}"

        elif refused:
            outcome = "refused by the node (failure status)"
        elif quarantined:
            reasons = [q.reason for q in node.spool.quarantined()][-quarantined:]
            outcome = "quarantined: " + ",".join(sorted(set(reasons)))
        else:
            assert len(new) == stored == 1, path
            outcome = "stored and de-identified"
            found, same = _leaks(path.read_bytes(), new[0].dicom)
            if found:
                leaks[path.name] = found
            if same:
                coincidences[path.name] = same
            out = dcmread(io.BytesIO(new[0].dicom))
            assert out.PatientIdentityRemoved == "YES"
            assert not any((int(t) >> 16) % 2 for t in out.keys()), f"{path.name}: private attribute kept"
        outcomes[outcome] += 1
        per_file[str(path.name)] = outcome

    # the same corpus through a pynetdicom SCU (files with meta sent as the bytes on disk)
    stored_before = node.stats.stored
    items, skipped_total = items_from_paths(corpus)
    result = send("127.0.0.1", node.port, items, calling_ae="PYNETDICOM", called_ae=node.dicom.ae_title,
                  concurrency=2, progress=False)
    assert node.drain(120)
    pynetdicom_stored = node.stats.stored - stored_before

    summary = {
        "files": len(corpus),
        "storescu": dict(sorted(outcomes.items())),
        "pynetdicom": {"sent": result.attempted, "stored": pynetdicom_stored,
                       "statuses": {f"0x{k:04X}": v for k, v in result.statuses.items()},
                       "errors": dict(result.errors), "skipped_by_sender": dict(skipped_total)},
        "quarantine_reasons": dict(collections.Counter(q.reason for q in node.spool.quarantined())),
        "leaks": leaks,
        "coincidences_explained_by_kept_attributes": coincidences,
    }
    with capsys.disabled():
        print("\nreal files:", json.dumps(summary, indent=1))
    if os.environ.get("MEDCHAIN_REPORT_DIR"):
        out = os.path.join(os.environ["MEDCHAIN_REPORT_DIR"], "real_files.json")
        with open(out, "w") as f:
            json.dump({**summary, "per_file": per_file}, f, indent=1)

    assert not leaks, leaks
    assert outcomes["stored and de-identified"] >= 150
    assert sum(outcomes.values()) == len(corpus)
    assert pynetdicom_stored >= outcomes["stored and de-identified"] - 10
    assert node.stats.forwarded == len(sink.instances)

