"""One spooled object in, one de-identified instance out — or a quarantine reason.

Deterministic (bytes + secret + options in, bytes + report out), so the crash-and-replay
story holds: processing the same spooled file twice yields the same output file under the
same pseudonymous SOP Instance UID.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass, replace

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite

from edge_agent.config import BurnedInPolicy, DeidConfig
from edge_agent.deid import DeidOptions, deidentify
from edge_agent.errors import DeidError, Quarantined
from edge_agent.pixels import blank_regions, burned_in_suspect, decode_check, find_text, has_pixels, region_boxes
from edge_agent.pseudonyms import Pseudonymizer
from edge_agent.sink import DeidentifiedInstance
from edge_agent.textdetect import TextBox, TextDetector

__all__ = ["Processor", "parse_received", "is_encapsulated_document", "IMPLEMENTATION_VERSION",
           "IMPLEMENTATION_CLASS_UID"]

log = logging.getLogger(__name__)

IMPLEMENTATION_VERSION = "MEDCHAIN_01"
# our own implementation class UID (a UUID-derived 2.25 UID), so nothing in a de-identified
# file's meta can echo a UID from some other implementation's root
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:medchain:edge-agent:v1").int)


# Encapsulated PDF, CDA, STL, OBJ and MTL storage (PS3.4 B.5)
ENCAPSULATED_DOCUMENT_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.104.{n}" for n in range(1, 6))
ENCAPSULATED_DOCUMENT = 0x00420011


def is_encapsulated_document(ds: Dataset) -> bool:
    """An encapsulated document, by its SOP class or by carrying a document body at all."""
    return str(ds.get("SOPClassUID", "") or "") in ENCAPSULATED_DOCUMENT_CLASSES or ENCAPSULATED_DOCUMENT in ds


def parse_received(raw: bytes, *, headers_only: bool = False):
    """Parse a received Part-10 stream, reading every top-level element header; raise
    ``Quarantined`` with a reason a person can act on. ``headers_only`` stops before the
    pixel data (the SCP's quick check while the scanner waits)."""
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise Quarantined("missing-file-meta", "no DICM preamble and file meta information")
    try:
        ds = dcmread(io.BytesIO(raw), stop_before_pixels=headers_only)
        len(ds)  # materialises the element table: truncation and framing errors surface here
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Quarantined:
        raise
    except Exception as exc:
        raise Quarantined("undecodable-dataset", exc.__class__.__name__) from None
    if not str(ds.get("SOPClassUID", "") or "") or not str(ds.get("SOPInstanceUID", "") or ""):
        raise Quarantined("missing-sop-uids", "SOP Class UID or SOP Instance UID absent")
    return ds, transfer_syntax


@dataclass(frozen=True)
class Processor:
    pseudonymizer: Pseudonymizer
    options: DeidOptions
    burned_in: BurnedInPolicy

    documents: str = "quarantine"  # encapsulated documents: "quarantine" or "dummy"
    # checks a reviewer waived when releasing this object from quarantine (quarantine.WAIVERS)
    waived: frozenset[str] = frozenset()
    # looks for burned-in text (its model session is made once per process, on first use)
    detector: TextDetector = TextDetector()

    @classmethod
    def from_config(cls, cfg: DeidConfig, secret: bytes) -> Processor:
        options = DeidOptions(retain_longitudinal_modified_dates=cfg.retain_longitudinal_modified_dates,
                              retain_patient_characteristics=cfg.retain_patient_characteristics,
                              clean_descriptors=cfg.clean_descriptors, safe_private=cfg.safe_private,
                              keep_unlisted=cfg.mode == "keep-unlisted")
        if options.keep_unlisted:
            log.warning("de-identification mode keep-unlisted: attributes Table E.1-1 does not list "
                        "are KEPT (a research-site option; each output's De-identification Method says so)")
        return cls(Pseudonymizer(secret, cfg.patient_id_issuer), options, cfg.burned_in, cfg.documents)

    def _text(self, ds: Dataset, transfer_syntax: str) -> tuple[tuple[TextBox, ...], bool]:
        """The boxes to blank, and whether the pixels were decoded to look for text; raises
        ``Quarantined`` when the policy is quarantine and text is flagged or found, or when
        the flag says text is there and nothing was found or configured to blank."""
        policy = self.burned_in
        if not has_pixels(ds) or "burned-in" in self.waived:
            return (), False
        flagged = burned_in_suspect(ds, policy)
        if flagged and policy.action == "quarantine":
            raise Quarantined("burned-in-annotation", "pixels may carry burned-in text "
                              "(Burned In Annotation not NO); policy is quarantine")
        found = find_text(ds, transfer_syntax, self.detector) if policy.detect_text else ()
        if found and policy.action == "quarantine":
            raise Quarantined("burned-in-text", f"{len(found)} text region(s) found in the pixels; "
                              "policy is quarantine")
        boxes = found + region_boxes(policy.regions) if (found or flagged) else ()
        if flagged and not boxes:
            raise Quarantined("burned-in-annotation", "Burned In Annotation is not NO, no text was "
                              "found and no region is configured to blank")
        return boxes, policy.detect_text

    def process(self, raw: bytes, spool_id: str) -> DeidentifiedInstance:
        return self.process_keeping_dataset(raw, spool_id)[0]

    def process_keeping_dataset(self, raw: bytes, spool_id: str) -> tuple[DeidentifiedInstance, Dataset]:
        """:meth:`process`, also returning the de-identified dataset the file was written
        from, so that preparation reads its pixels without parsing the file again."""
        ds, transfer_syntax = parse_received(raw)
        if self.documents == "quarantine" and "document" not in self.waived and is_encapsulated_document(ds):
            raise Quarantined("encapsulated-document", "a document's body cannot be cleaned by "
                              "attribute rules (PDF, CDA, STL, OBJ or MTL); policy is quarantine")
        boxes, looked = self._text(ds, transfer_syntax)
        options = replace(self.options, pixels_cleaned=True) if boxes else self.options
        try:
            out, report = deidentify(ds, self.pseudonymizer, options)
        except DeidError as exc:
            raise Quarantined("deid-failed", str(exc)) from None
        if has_pixels(out):
            if boxes:
                out, transfer_syntax = blank_regions(out, transfer_syntax, boxes)
            elif not looked:
                decode_check(out, transfer_syntax)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        out.file_meta = meta
        buf = io.BytesIO()
        try:
            dcmwrite(buf, out, enforce_file_format=True)
        except Exception as exc:
            raise Quarantined("unencodable", exc.__class__.__name__) from None
        return DeidentifiedInstance(
            spool_id=spool_id,
            dicom=buf.getvalue(),
            modality=str(out.get("Modality", "") or "OT"),
            sop_class_uid=str(out.SOPClassUID),
            transfer_syntax=transfer_syntax,
            patient_token=report.patient_token,
            study_uid=str(out.get("StudyInstanceUID", "") or ""),
            series_uid=str(out.get("SeriesInstanceUID", "") or ""),
            sop_instance_uid=str(out.SOPInstanceUID),
            accession_pseudonym=report.accession_pseudonym,
            report=report,
            blanked=boxes,
            study_date=shifted_study_date(out, report),
        ), out


def shifted_study_date(out: Dataset, report) -> str | None:
    """The study date (else the acquisition date) of a de-identified dataset, YYYYMMDD, only
    when de-identification shifted dates (``report.date_shift_days``): otherwise they were
    removed, and no date is carried (never the original one)."""
    if report.date_shift_days is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate"):
        value = str(out.get(keyword, "") or "").strip()
        if len(value) == 8 and value.isdigit():
            return value
    return None
