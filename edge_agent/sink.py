"""The hand-off from the DICOM node to whatever comes next.

The node calls ``sink.accept(instance)`` for each de-identified instance and deletes the
spooled original only after it returns; a sink that raises leaves the item spooled, to be
retried. So a sink must hold the instance durably before returning, and must tolerate being
given the same instance again after a crash (the pseudonymous SOP Instance UID is stable:
use it as the key).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edge_agent.deid import DeidReport
from edge_agent.spool import DirSync, fsync_dir, write_synced

if TYPE_CHECKING:
    from edge_agent.preparation import Preparation
    from edge_agent.textdetect import TextBox

__all__ = ["DeidentifiedInstance", "Sink", "FolderSink"]


@dataclass(frozen=True)
class DeidentifiedInstance:
    """One de-identified DICOM instance, ready for preprocessing and packaging."""

    spool_id: str
    dicom: bytes  # a complete DICOM Part-10 file (preamble, file meta, dataset)
    modality: str
    sop_class_uid: str
    transfer_syntax: str
    patient_token: str  # HMAC-SHA256(site secret, issuer | patient id), 64 hex characters
    study_uid: str  # pseudonymous, 2.25.<int>
    series_uid: str
    sop_instance_uid: str
    accession_pseudonym: str | None
    report: DeidReport
    # tensor, descriptors and metadata record, when the node's worker prepared them beside
    # de-identification (see edge_agent.preparation); None: the sink prepares what it needs
    preparation: Preparation | None = None
    # rectangles blanked in every frame: burned-in text found, and configured regions
    blanked: tuple[TextBox, ...] = ()
    # the study date (YYYYMMDD) as de-identification wrote it, moved by the patient's shift;
    # None unless dates were kept shifted (never the original date)
    study_date: str | None = None

    def deid_summary(self) -> dict:
        """What de-identification did, for the sealed metadata: the profile's edition and
        codes, actions and removals by count, the blanked rectangles; never a value, and not
        the date shift (with it, shifted dates could be moved back)."""
        r = self.report
        return {"edition": r.edition, "method_codes": list(r.method_codes), "actions": dict(r.actions),
                "removed": dict(r.removed), "blanked": [[b.x, b.y, b.width, b.height] for b in self.blanked]}

    def meta(self) -> dict:
        """The small, de-identified description that may travel beside the image."""
        return {
            "modality": self.modality,
            "sop_class_uid": self.sop_class_uid,
            "transfer_syntax": self.transfer_syntax,
            "patient_token": self.patient_token,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "accession_pseudonym": self.accession_pseudonym,
            "study_date": self.study_date,
        }


@runtime_checkable
class Sink(Protocol):
    def accept(self, instance: DeidentifiedInstance) -> None:
        """Hold ``instance`` durably, or raise (the node keeps it spooled and retries)."""


class FolderSink:
    """Writes ``<out>/<study>/<series>/<sop>.dcm`` plus a ``.json`` with meta and deid report.

    Idempotent: the same instance delivered twice overwrites itself, so it is present once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._dirs: dict[Path, DirSync] = {}  # series folders made so far, each with its group fsync

    def _dir_sync(self, folder: Path) -> DirSync:
        with self._lock:
            known = self._dirs.get(folder)
        if known is not None:
            return known
        folder.mkdir(parents=True, exist_ok=True)
        # a new study/series folder's own entry must be durable too
        for parent in (folder.parent, folder.parent.parent):
            fsync_dir(parent)
        with self._lock:
            return self._dirs.setdefault(folder, DirSync(folder))

    def path_for(self, instance: DeidentifiedInstance) -> Path:
        return (self.root / (instance.study_uid or "no-study") / (instance.series_uid or "no-series")
                / f"{instance.sop_instance_uid}.dcm")

    def accept(self, instance: DeidentifiedInstance) -> None:
        path = self.path_for(instance)
        folder = self._dir_sync(path.parent)
        info = {**instance.meta(), "deid": {**instance.report.to_dict(), **instance.deid_summary()}}
        report, report_part, part = path.with_suffix(".json"), path.with_suffix(".json.part"), \
            path.with_name(path.name + ".part")
        write_synced(report_part, json.dumps(info, indent=1).encode())
        write_synced(part, instance.dicom)
        # both files are complete (fsynced) before either name appears, the report first; one
        # group fsync of the folder then makes both names durable before we return. A crash
        # before that leaves the spool entry in place, and its replay writes both again.
        os.replace(report_part, report)
        os.replace(part, path)
        folder.sync()

    def files(self) -> list[Path]:
        return sorted(self.root.rglob("*.dcm"))
