"""De-identification core: a dataset in, a new de-identified dataset and a report out.

Pure: no clock, no disk, no randomness — the site secret (inside the
:class:`~edge_agent.pseudonyms.Pseudonymizer`) is the only key, so the same input always
gives the same output, and the same UID maps to the same new UID in every instance.

What it does (PS3.15 Annex E, Basic Application Level Confidentiality Profile):

* every attribute listed in Table E.1-1 (:mod:`edge_agent.annex_e`), at any depth of nested
  sequences, gets its action. Compound actions are resolved to the most removing choice that
  keeps the usual image IODs valid: ``X/Z``, ``X/D`` and ``X/Z/D`` remove, ``Z/D`` empties,
  ``X/Z/U*`` keeps the reference sequence with the UIDs inside replaced;
* ``D`` on a sequence becomes a single empty item (the contents could be free text);
* private attributes, overlays (60xx) and curves (50xx) are removed;
* options: Retain Longitudinal Temporal Information with Modified Dates (dates move back by a
  per-patient number of days; times of day kept) and Retain Patient Characteristics;
* beyond the table, conservatively: any other date, time or date-time is treated like the
  listed ones, any other person name is removed, and any other UID that is not a DICOM
  standard UID (``1.2.840.10008.*``) or a class/scheme UID is replaced like an instance UID;
* Patient ID becomes the keyed patient token, Accession Number its keyed pseudonym (both are
  allowed "dummy" values for a ``Z`` action); Patient Identity Removed = YES, De-identification
  Method and its Code Sequence, Longitudinal Temporal Information Modified are set.

The report lists tags and actions, never a value.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from edge_agent.annex_e import PRIVATE_RULE, RULES, Rule, is_curve, is_overlay, rule_for
from edge_agent.errors import DeidError
from edge_agent.pseudonyms import Pseudonymizer, normalize_identifier

__all__ = ["DeidOptions", "DeidReport", "deidentify", "resolve_action", "METHOD_NAME",
           "STANDARD_UID_ROOT"]

METHOD_NAME = "MedChain PS3.15 Annex E Basic Profile"
STANDARD_UID_ROOT = "1.2.840.10008."

PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
ACCESSION_NUMBER = 0x00080050
STUDY_INSTANCE_UID = 0x0020000D

# UIDs that name a class, a coding scheme or a resource, never an instance: kept as they are
CLASS_UID_TAGS = frozenset({
    0x00020002, 0x00020010, 0x00020012,  # media storage SOP class, transfer syntax, implementation
    0x00080016, 0x00081150, 0x0008001A, 0x0008001B,  # SOP class, referenced/related/original class
    0x0008010C, 0x0008010D, 0x00080118, 0x00080123,  # coding scheme, context group, mapping resource
    0x00081164, 0x00081199,  # file-set / referenced SOP sequence bits that hold class UIDs only
    0x00400E01, 0x04000010, 0x04000115,  # HL7 instance / MAC algorithm / certificate type class UIDs
})

_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES = {
    "AE": "ANON", "AS": "000Y", "CS": "ANON", "DA": "19000101", "DS": "0", "DT": "19000101000000",
    "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT, "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT, "TM": "000000", "UC": _DUMMY_TEXT, "UR": "", "UT": _DUMMY_TEXT,
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4,
    "OV": b"\x00" * 8, "UN": b"\x00\x00", "AT": 0,
}

CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixels": ("113101", "Clean Pixel Data Option"),
    "longitudinal": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "characteristics": ("113108", "Retain Patient Characteristics Option"),
}


@dataclass(frozen=True)
class DeidOptions:
    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    # set by the pixel stage when configured regions were blanked (Clean Pixel Data Option)
    pixels_cleaned: bool = False


@dataclass(frozen=True)
class DeidReport:
    """What was done, by tag and action: no attribute value, so it can be logged and shipped."""

    patient_token: str
    accession_pseudonym: str | None
    date_shift_days: int | None
    actions: Mapping[str, int]  # action -> number of elements it applied to
    attributes: tuple[tuple[str, str], ...]  # sorted unique ("(gggg,eeee)", action) pairs
    private_removed: int
    overlays_removed: int
    curves_removed: int
    patient_id_missing: bool
    method_codes: tuple[str, ...] = field(default=())

    def __reduce__(self):
        # the read-only ``actions`` view cannot be pickled as such; the report crosses from the
        # processing worker process to the node as plain values and is rebuilt read-only
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["actions"] = dict(self.actions)
        return (_rebuild_report, (values,))

    def to_dict(self) -> dict:
        return {
            "patient_token": self.patient_token,
            "accession_pseudonym": self.accession_pseudonym,
            "date_shift_days": self.date_shift_days,
            "actions": dict(self.actions),
            "attributes": [list(a) for a in self.attributes],
            "private_removed": self.private_removed,
            "overlays_removed": self.overlays_removed,
            "curves_removed": self.curves_removed,
            "patient_id_missing": self.patient_id_missing,
            "method_codes": list(self.method_codes),
        }


def _rebuild_report(values: dict) -> DeidReport:
    return DeidReport(**{**values, "actions": MappingProxyType(dict(values["actions"]))})


def resolve_action(rule: Rule, vr: str, options: DeidOptions) -> str:
    """One of X, Z, D, U, K, C, KSQ (keep a sequence, clean inside) for a listed attribute."""
    if options.retain_longitudinal_modified_dates and rule.longitudinal_modified_dates:
        return "C"
    if options.retain_patient_characteristics and rule.patient_characteristics:
        return "K" if rule.patient_characteristics == "K" else "X"  # we cannot clean free text
    basic = rule.basic
    if basic == "X/Z/U*":
        return "KSQ" if vr == "SQ" else "U"
    if basic == "Z/D":
        return "Z"
    if basic.startswith("X"):
        return "X"
    if basic == "K" and vr == "SQ":
        return "KSQ"
    return basic


def _fmt(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shift_date(value: str, days: int) -> str | None:
    """Shift a DA (YYYYMMDD, or old YYYY.MM.DD) or the date part of a DT; None if unparseable."""
    text = value.strip()
    if len(text) >= 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:10] + text[10:]
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    try:
        moved = day - _dt.timedelta(days=days)
    except OverflowError:
        return None
    return moved.strftime("%Y%m%d") + text[8:]


# VRs whose value, when the profile does not list the attribute, is kept as it is: not a name,
# date, time or UID (those are judged below), not a sequence (cleaned inside), not UN (its real
# VR is unknown). Elements of these VRs skip value decoding and re-encoding entirely.
_RAW_KEEP_VRS = frozenset({"AE", "AS", "CS", "DS", "IS", "LO", "LT", "SH", "ST", "UC", "UR", "UT",
                           "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT",
                           "OB", "OD", "OF", "OL", "OV", "OW"})
# fixed-size binary VRs: a length that is no multiple of the size cannot be decoded
_FIXED_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}


def _passes_raw(raw: RawDataElement) -> bool:
    """True for an element kept byte for byte: unlisted, not private/overlay/curve/file meta/
    group length, of a VR that needs no judgement. Raises :class:`DeidError` (tag and length
    only) for a fixed-size value of impossible length, as decoding it would."""
    tag = int(raw.tag)
    group = tag >> 16
    if group == 0x0002 or group % 2 == 1 or tag & 0xFFFF == 0 or tag in RULES or is_overlay(tag) \
            or is_curve(tag):
        return False
    vr = raw.VR
    if vr is None:  # implicit VR: the dictionary's, when it has exactly one
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    if vr not in _RAW_KEEP_VRS:
        return False
    size = _FIXED_SIZE.get(vr)
    if size and raw.length % size:
        raise DeidError(f"element {_fmt(tag)} cannot be decoded (length {raw.length} is not a "
                        f"multiple of {size} for VR {vr})")
    return True


class _Walker:
    def __init__(self, pz: Pseudonymizer, options: DeidOptions, token: str, shift: int | None):
        self.pz, self.options, self.token, self.shift = pz, options, token, shift
        self.counts: Counter[str] = Counter()
        self.attributes: set[tuple[str, str]] = set()
        self.private = self.overlays = self.curves = 0

    def note(self, tag: int, action: str) -> None:
        self.counts[action] += 1
        self.attributes.add((_fmt(tag), action))

    def dataset(self, ds: Dataset) -> Dataset:
        out = Dataset()
        # the output keeps the input's encoding, so elements passed through undecoded (below)
        # are written back as the very bytes that were read
        out.set_original_encoding(*ds.original_encoding, ds.original_character_set)
        out._parent_encoding = ds._parent_encoding  # a sequence item's inherited character set
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and _passes_raw(raw):
                out[tag] = raw
                continue
            try:
                elem = ds[tag]
            except Exception as exc:  # undecodable element: refuse the instance, name the tag only
                raise DeidError(f"element {_fmt(int(tag))} cannot be decoded "
                                f"({exc.__class__.__name__})") from None
            new = self.element(elem)
            if new is not None:
                out.add(new)
        return out

    def element(self, elem: DataElement) -> DataElement | None:
        tag, vr = int(elem.tag), elem.VR
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0:  # file meta is rebuilt; group lengths go stale
            return None
        rule = rule_for(tag)
        if rule is PRIVATE_RULE or (tag >> 16) % 2 == 1:
            self.private += 1
            return None
        if is_overlay(tag):
            self.overlays += 1
            return None
        if is_curve(tag):
            self.curves += 1
            return None
        if tag == PATIENT_ID:
            return self.patient_id(elem)
        if tag == ACCESSION_NUMBER:
            self.note(tag, "Z")
            value = normalize_identifier(str(elem.value or ""))
            return DataElement(tag, vr, self.pz.accession(value) if value else None)
        if rule is None:
            return self.unlisted(elem)
        action = resolve_action(rule, vr, self.options)
        self.note(tag, action)
        return self.apply(elem, action)

    def patient_id(self, elem: DataElement) -> DataElement:
        self.note(PATIENT_ID, "Z")
        value = normalize_identifier(str(elem.value or ""))
        return DataElement(PATIENT_ID, elem.VR, self.pz.patient(value) if value else self.token)

    def unlisted(self, elem: DataElement) -> DataElement | None:
        tag, vr = int(elem.tag), elem.VR
        if vr == "SQ":
            return DataElement(tag, vr, Sequence([self.dataset(item) for item in elem.value]))
        if vr in ("DA", "DT", "TM"):
            action = "C" if self.options.retain_longitudinal_modified_dates else "X"
            self.note(tag, action + "+")
            return self.apply(elem, action)
        if vr == "PN":
            self.note(tag, "X+")
            return None
        if vr == "UI" and tag not in CLASS_UID_TAGS and elem.value:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            if any(not str(v).startswith(STANDARD_UID_ROOT) for v in values):
                self.note(tag, "U+")
                return self.apply(elem, "U")
        return elem

    def apply(self, elem: DataElement, action: str) -> DataElement | None:
        tag, vr, value = int(elem.tag), elem.VR, elem.value
        if action == "X":
            return None
        if action == "K":
            if vr == "SQ":
                return DataElement(tag, vr, Sequence([self.dataset(item) for item in value]))
            return elem
        if action == "KSQ":
            if vr != "SQ":
                return elem
            return DataElement(tag, vr, Sequence([self.dataset(item) for item in value]))
        if action == "Z":
            return DataElement(tag, vr, Sequence() if vr == "SQ" else None)
        if action == "D":
            if vr == "SQ":
                return DataElement(tag, vr, Sequence([Dataset()]))
            if vr == "UI":
                return DataElement(tag, vr, self.pz.uid(str(value)) if value else self.pz.uid(_fmt(tag)))
            return DataElement(tag, vr, _DUMMIES.get(vr, _DUMMY_TEXT))
        if action == "U":
            if vr == "SQ":  # a UID-bearing sequence: keep it, replace the UIDs inside
                return DataElement(tag, vr, Sequence([self.dataset(item) for item in value]))
            if not value:
                return DataElement(tag, vr, value)
            if isinstance(value, MultiValue):
                return DataElement(tag, vr, [self.pz.uid(str(v)) for v in value])
            return DataElement(tag, vr, self.pz.uid(str(value)))
        if action == "C":
            return self.clean(elem)
        raise DeidError(f"{_fmt(tag)}: unsupported action {action}")

    def clean(self, elem: DataElement) -> DataElement | None:
        """The Modified Dates option: move dates, keep times of day, drop what cannot move."""
        tag, vr, value = int(elem.tag), elem.VR, elem.value
        if vr == "TM":
            return elem
        if vr not in ("DA", "DT") or self.shift is None:
            return None
        if not value:
            return DataElement(tag, vr, value)
        values = list(value) if isinstance(value, MultiValue) else [value]
        shifted = [_shift_date(str(v), self.shift) for v in values]
        if any(s is None for s in shifted):
            self.note(tag, "X")
            return None
        return DataElement(tag, vr, shifted if len(shifted) > 1 else shifted[0])


def _patient_token(ds: Dataset, pz: Pseudonymizer) -> tuple[str, bool]:
    try:
        pid = normalize_identifier(str(ds.get(PATIENT_ID).value or "")) if PATIENT_ID in ds else ""
        issuer = str(ds.get(ISSUER_OF_PATIENT_ID).value or "") if ISSUER_OF_PATIENT_ID in ds else ""
    except Exception as exc:
        raise DeidError(f"Patient ID cannot be decoded ({exc.__class__.__name__})") from None
    if pid:
        return pz.patient(pid, issuer), False
    # no patient ID: one token per study, so unrelated studies never merge into one "patient"
    study = str(ds.get(STUDY_INSTANCE_UID).value or "") if STUDY_INSTANCE_UID in ds else ""
    return pz.patient("study:" + study, issuer), True


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


def deidentify(ds: Dataset, pz: Pseudonymizer, options: DeidOptions = DeidOptions()) -> tuple[Dataset, DeidReport]:
    """De-identify ``ds`` (left untouched) into a new dataset; raise :class:`DeidError` when an
    element cannot be decoded (the instance is then quarantined, never forwarded half-done)."""
    token, missing = _patient_token(ds, pz)
    shift = pz.date_shift(token) if options.retain_longitudinal_modified_dates else None
    walker = _Walker(pz, options, token, shift)
    out = walker.dataset(ds)
    if PATIENT_ID not in out:
        out.add(DataElement(PATIENT_ID, "LO", token))

    keys = ["basic"]
    if options.pixels_cleaned:
        keys.append("clean_pixels")
    if options.retain_longitudinal_modified_dates:
        keys.append("longitudinal")
    if options.retain_patient_characteristics:
        keys.append("characteristics")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD_NAME
    out.DeidentificationMethodCodeSequence = Sequence([_code_item(CODES[k]) for k in keys])
    out.LongitudinalTemporalInformationModified = "MODIFIED" if shift is not None else "REMOVED"

    accession = None
    if ACCESSION_NUMBER in out and out[ACCESSION_NUMBER].value:
        accession = str(out[ACCESSION_NUMBER].value)
    report = DeidReport(
        patient_token=token,
        accession_pseudonym=accession,
        date_shift_days=shift,
        actions=MappingProxyType(dict(sorted(walker.counts.items()))),
        attributes=tuple(sorted(walker.attributes)),
        private_removed=walker.private,
        overlays_removed=walker.overlays,
        curves_removed=walker.curves,
        patient_id_missing=missing,
        method_codes=tuple(CODES[k][0] for k in keys),
    )
    return out, report

