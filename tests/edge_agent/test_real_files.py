"""Real files nobody here wrote: every file among pydicom's bundled test files and the
pydicom-data package is sent to the running node over the network — by dcmtk's storescu (a
real peer, one file per run) and by a pynetdicom SCU (one association per file) — and each
file's outcome and reason on each path must be the one recorded in
``real_files_expected.json``: stored and de-identified, quarantined for a named reason,
refused, or not sent by the peer for a named reason. For every stored instance, on both paths,
no value of any attribute the allow-list does not let through appears anywhere in the
de-identified bytes.

A file whose outcome differs, or a file the expectations do not know (a new pydicom-data
release), fails the test with the list of differences. The whole table is written to
``$MEDCHAIN_REPORT_DIR/real_files.json`` when that variable is set; after a reviewed change of
behaviour, its ``per_file`` part becomes the new expectations.
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge_agent.annex_e import RULES
from edge_agent.config import BurnedInPolicy
from edge_agent.deid import DeidOptions, resolve_action
from edge_agent.keep_list import KEEP
from scanner_sim.sender import items_from_paths, send

pytestmark = pytest.mark.slow
EXPECTED = Path(__file__).with_name("real_files_expected.json")
MIN_LEN = 4  # shorter values ("M", "70", "Y") occur by chance in any file and prove nothing


class RecordingSink:
    def __init__(self) -> None:
        self.instances = []
        self.lock = threading.Lock()

    def accept(self, instance) -> None:
        with self.lock:
            self.instances.append(instance)


def _allowed(tag: int, vr: str) -> bool:
    """May this attribute's own value survive (Basic Profile, no options)?"""
    if (tag >> 16) % 2 == 1 or vr == "UN":
        return False
    rule = RULES.get(tag)
    if rule is not None:
        return resolve_action(rule, vr, DeidOptions()) in ("K", "KSQ", "C")
    return tag in KEEP


CONTENT_SEQUENCE = 0x0040A730
# structured content items of these value types are kept (and filtered like any dataset)
CODED_VALUE_TYPES = {"CONTAINER", "CODE", "NUM", "IMAGE", "COMPOSITE", "WAVEFORM", "SCOORD", "SCOORD3D",
                     "TCOORD", "UIDREF", "DATE", "TIME", "DATETIME"}


def _split_values(ds: Dataset, inside_removed: bool = False):
    """(removed, kept): raw value bytes of the original's attributes, at any depth, split by
    whether the allow-list lets them through; inside a removed sequence everything is removed,
    and of structured content only items of coded value types are kept."""
    removed, kept = [], []
    for tag in list(ds.keys()):
        tag = int(tag)
        try:
            raw, elem = ds.get_item(tag), ds[tag]
        except Exception:
            continue
        gone = inside_removed or not _allowed(tag, elem.VR)
        if elem.VR == "SQ":
            for item in elem.value:
                item_gone = gone
                if tag == CONTENT_SEQUENCE and not inside_removed:
                    item_gone = str(item.get("ValueType", "") or "").strip() not in CODED_VALUE_TYPES
                r, k = _split_values(item, item_gone)
                removed += r
                kept += k
            continue
        value = _value_bytes(raw, elem)
        if value is not None:
            (removed if gone else kept).append(value)
    return removed, kept


def _value_bytes(raw, elem) -> bytes | None:
    """The value as it was on the wire, or as text when it was already decoded."""
    value = getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(elem.value, str):
        return elem.value.encode("latin-1", "replace")
    if isinstance(elem.value, (list, tuple)) and all(isinstance(v, str) for v in elem.value):
        return "\\".join(elem.value).encode("latin-1", "replace")
    return None


def _leaks(original: bytes, deidentified: bytes) -> tuple[list[str], int]:
    """(leaks, coincidences): values of removed attributes found in the output. One that also
    occurs in an attribute the profile lets through (Institution Name "TOSHIBA" inside
    Manufacturer "TOSHIBA_MEC", or a byte run inside the pixel data) is a coincidence."""
    ds = dcmread(io.BytesIO(original), force=True)
    removed, kept = _split_values(ds)
    kept_blob = b"\x01".join(kept)
    leaks, coincidences = [], 0
    for value in removed:
        for part in value.split(b"\\"):
            part = part.strip(b" \x00")
            if len(part) >= MIN_LEN and len(set(part)) > 1 and part in deidentified:  # not ff ff ff ff
                if part in kept_blob:
                    coincidences += 1
                else:
                    leaks.append(part[:8].hex())  # a prefix, as hex: the test report holds no PHI
    return leaks, coincidences


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


def _key(path: Path) -> str:
    """A file's name in the expectations: which package, then its path inside it."""
    parts = path.parts
    at = max(i for i, p in enumerate(parts) if p in ("test_files", "charset_files", "data"))
    package = "pydicom-data" if parts[at] == "data" else f"pydicom/{parts[at]}"
    return f"{package}/{'/'.join(parts[at + 1:])}"


class Tally:
    """What the node did with the objects sent since the last look."""

    def __init__(self, node, sink: RecordingSink) -> None:
        self.node, self.sink = node, sink
        self.mark()

    def mark(self) -> None:
        s = self.node.stats
        self.before = (s.stored, sum(s.refused.values()), sum(s.quarantined.values()), len(self.sink.instances))

    def outcome(self) -> tuple[str, list]:
        assert self.node.drain(60)
        s = self.node.stats
        stored, refused = s.stored - self.before[0], sum(s.refused.values()) - self.before[1]
        quarantined = sum(s.quarantined.values()) - self.before[2]
        new = self.sink.instances[self.before[3]:]
        self.mark()
        if refused:
            return "refused by the node (failure status)", new
        if quarantined:
            reasons = sorted({q.reason for q in self.node.spool.quarantined()[-quarantined:]})
            return "quarantined: " + ",".join(reasons), new
        if stored:
            assert len(new) == stored == 1
            return "stored and de-identified", new
        return "", new


def test_every_real_file_has_its_expected_outcome_and_leaks_nothing(
        corpus, profile, secret, make_node, storescu, tmp_path, capsys):
    assert len(corpus) > 200, "pydicom's test files and pydicom-data should give 250+ files"
    sink = RecordingSink()
    # burned-in text found in the pixels is blanked, so files with text still go through; no
    # modality is suspect by itself (only a flag saying YES is), so the headers of as many
    # files as possible are checked
    blank = BurnedInPolicy("blank", (), ())
    node = make_node(sink=sink, burned_in=blank)
    node.dicom = replace(node.dicom, allowed_calling_aets=("*",))
    node.start()
    node.processor = replace(node.processor, options=DeidOptions())  # Basic Profile: every date goes
    tally = Tally(node, sink)

    per_file: dict[str, dict[str, str]] = {}
    leaks: dict[str, list[str]] = {}
    coincidences = collections.Counter()

    def check(path: Path, route: str, instances) -> None:
        for instance in instances:
            found, same = _leaks(path.read_bytes(), instance.dicom)
            if found:
                leaks[f"{route}:{_key(path)}"] = found
            coincidences[route] += same
            out = dcmread(io.BytesIO(instance.dicom))
            assert out.PatientIdentityRemoved == "YES"
            assert not any((int(t) >> 16) % 2 for t in out.keys()), f"{path.name}: private attribute kept"

    for path in corpus:
        # propose the file's own transfer syntax, as an administrator would configure storescu
        run = subprocess.run([storescu, *_storescu_syntax(path), "-aet", "STORESCU", "-aec", node.dicom.ae_title,
                              "127.0.0.1", str(node.port), str(path)], capture_output=True, text=True, timeout=60)
        outcome, new = tally.outcome()
        if not outcome:
            detail = [line for line in (run.stderr or run.stdout).strip().splitlines() if line[:2] in ("E:", "F:")]
            message = detail[-1].split(": ", 1)[-1].split(" in file")[0] if detail else "sent nothing"
            outcome = f"not sent by storescu: {message}"
        check(path, "storescu", new)
        per_file[_key(path)] = {"storescu": outcome}

    for path in corpus:  # the same files through a pynetdicom SCU, one association each
        items, skipped = items_from_paths([path])
        if not items:
            per_file[_key(path)]["pynetdicom"] = "not sent by the SCU: " + ", ".join(sorted(skipped))
            continue
        result = send("127.0.0.1", node.port, items, calling_ae="PYNETDICOM", called_ae=node.dicom.ae_title,
                      concurrency=1, progress=False)
        outcome, new = tally.outcome()
        if result.errors:
            outcome = "not sent by the SCU: " + ", ".join(sorted(result.errors))
        elif not outcome:
            outcome = "answered " + ", ".join(f"0x{k:04X}" for k in sorted(result.statuses)) if result.statuses \
                else "nothing stored"
        check(path, "pynetdicom", new)
        per_file[_key(path)]["pynetdicom"] = outcome

    summary = {
        "files": len(corpus),
        "storescu": dict(sorted(collections.Counter(f["storescu"] for f in per_file.values()).items())),
        "pynetdicom": dict(sorted(collections.Counter(f["pynetdicom"] for f in per_file.values()).items())),
        "leaks": leaks,
        "coincidences_explained_by_kept_attributes": dict(coincidences),
    }
    with capsys.disabled():
        print("\nreal files:", json.dumps(summary, indent=1))
    if os.environ.get("MEDCHAIN_REPORT_DIR"):
        with open(os.path.join(os.environ["MEDCHAIN_REPORT_DIR"], "real_files.json"), "w") as f:
            json.dump({**summary, "per_file": per_file}, f, indent=1, sort_keys=True)

    assert not leaks, leaks
    expected = json.loads(EXPECTED.read_text())
    differences = {name: {"expected": expected.get(name), "got": got}
                   for name, got in per_file.items() if expected.get(name) != got}
    differences.update({name: {"expected": want, "got": None} for name, want in expected.items()
                        if name not in per_file})
    assert not differences, json.dumps(differences, indent=1)
    assert node.stats.forwarded == len(sink.instances)
