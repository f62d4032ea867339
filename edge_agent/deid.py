"""De-identification core: a dataset in, a new de-identified dataset and a report out.

Pure: no clock, no disk, no randomness — the site secret (inside the
:class:`~edge_agent.pseudonyms.Pseudonymizer`) is the only key, so the same input always
gives the same output, and the same UID maps to the same new UID in every instance.

An allow-list (PS3.15 Annex E, Basic Application Level Confidentiality Profile): an
attribute reaches the output, at any depth of nested sequences, only if

* Table E.1-1 (:mod:`edge_agent.annex_e`) gives it an action that leaves something under
  the options in force (``K`` keep, ``C`` clean, ``D`` dummy, ``Z`` empty, ``U`` new UID);
  compound actions resolve to the most removing choice that keeps the usual image IODs valid:
  ``X/Z``, ``X/D`` and ``X/Z/D`` remove, ``Z/D`` empties, ``X/Z/U*`` keeps the reference
  sequence with the UIDs inside replaced;
* or :mod:`edge_agent.keep_list` names it (pixel module, geometry, acquisition parameters,
  codes, references), a string among them holding no date;
* or the profile sets it (Patient ID as the keyed patient token, Accession Number as its
  keyed pseudonym, Patient Identity Removed, the method and its codes).

Everything else is removed and counted by class (:data:`REMOVAL_CLASSES`), never by value:
private attributes (except a creator keep-list under Retain Safe Private), overlays, curves,
UN-typed elements, public tags no dictionary knows, retired attributes and whatever the list
does not name. Options: Retain Longitudinal Temporal Information with Modified Dates (dates
move back by a per-patient number of days, times of day kept, a date that cannot be moved is
removed), Retain Patient Characteristics, Retain Safe Private, Clean Descriptors (free text
cleaned by :func:`edge_agent.free_text.clean_descriptor`). Structured content keeps only items
of value types that carry no free text or names (TEXT and PNAME items are removed).
``keep_unlisted`` brings back the old deny-list reading for research sites that need it
(unlisted attributes kept, names removed, dates and instance UIDs treated like listed ones).
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from pydicom.datadict import dictionary_has_tag, dictionary_is_retired, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from edge_agent.annex_e import EDITION, PRIVATE_RULE, Rule, is_curve, is_overlay, rule_for
from edge_agent.errors import DeidError
from edge_agent.free_text import clean_descriptor, has_date
from edge_agent.keep_list import CLASS_UIDS, KEEP
from edge_agent.pseudonyms import Pseudonymizer, normalize_identifier

__all__ = ["DeidOptions", "DeidReport", "deidentify", "resolve_action", "METHOD_NAME",
           "STANDARD_UID_ROOT", "REMOVAL_CLASSES", "SafePrivate"]

METHOD_NAME = f"MedChain PS3.15 Annex E Basic Profile ({EDITION}), allow-list"
STANDARD_UID_ROOT = "1.2.840.10008."

PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
ACCESSION_NUMBER = 0x00080050
STUDY_INSTANCE_UID = 0x0020000D
CONTENT_SEQUENCE = 0x0040A730
VALUE_TYPE = 0x0040A040
TIMEZONE_OFFSET = 0x00080201

# what the removal counts are keyed by, in the report and the sidecar
REMOVAL_CLASSES = ("private", "overlay", "curve", "un", "unknown-public", "retired", "not-allowed",
                   "date-in-text", "uncleanable-text", "structured-text", "structured-name",
                   "structured-other", "group-length")
# content items kept in structured reports: coded, numeric, spatial and reference values
_CONTENT_VALUE_TYPES = frozenset({"CONTAINER", "CODE", "NUM", "IMAGE", "COMPOSITE", "WAVEFORM", "SCOORD",
                                  "SCOORD3D", "TCOORD", "UIDREF", "DATE", "TIME", "DATETIME"})

_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES = {
    "AE": "ANON", "AS": "000Y", "CS": "ANON", "DA": "19000101", "DS": "0", "DT": "19000101000000",
    "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT, "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT, "TM": "000000", "UC": _DUMMY_TEXT, "UR": "urn:anonymized", "UT": _DUMMY_TEXT,
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4,
    "OV": b"\x00" * 8, "AT": 0,
}

CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixels": ("113101", "Clean Pixel Data Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "longitudinal": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "characteristics": ("113108", "Retain Patient Characteristics Option"),
    "safe_private": ("113111", "Retain Safe Private Option"),
}

SafePrivate = frozenset[tuple[str, int]]  # (private creator, element byte 0x00-0xFF)


@dataclass(frozen=True)
class DeidOptions:
    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    # set by the pixel stage when text was blanked (Clean Pixel Data Option)
    pixels_cleaned: bool = False
    clean_descriptors: bool = False
    # Retain Safe Private: private elements kept, by (creator, element byte); empty = none
    safe_private: SafePrivate = frozenset()
    # the deny-list reading: attributes the table does not list are kept (research sites)
    keep_unlisted: bool = False


@dataclass(frozen=True)
class DeidReport:
    """What was done, by tag, action and class: no attribute value, so it can be logged and
    shipped in the sidecar."""

    patient_token: str
    accession_pseudonym: str | None
    date_shift_days: int | None
    actions: Mapping[str, int]  # action -> number of elements it applied to
    attributes: tuple[tuple[str, str], ...]  # sorted unique ("(gggg,eeee)", action) pairs
    removed: Mapping[str, int]  # removal class -> number of elements removed
    patient_id_missing: bool
    method_codes: tuple[str, ...] = field(default=())
    edition: str = EDITION

    def __reduce__(self):
        # read-only mapping views cannot be pickled as such; the report crosses from the
        # processing worker process to the node as plain values and is rebuilt read-only
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["actions"], values["removed"] = dict(self.actions), dict(self.removed)
        return (_rebuild_report, (values,))

    def to_dict(self) -> dict:
        return {
            "patient_token": self.patient_token,
            "accession_pseudonym": self.accession_pseudonym,
            "date_shift_days": self.date_shift_days,
            "actions": dict(self.actions),
            "attributes": [list(a) for a in self.attributes],
            "removed": dict(self.removed),
            "patient_id_missing": self.patient_id_missing,
            "method_codes": list(self.method_codes),
            "edition": self.edition,
        }


def _rebuild_report(values: dict) -> DeidReport:
    return DeidReport(**{**values, "actions": MappingProxyType(dict(values["actions"])),
                         "removed": MappingProxyType(dict(values["removed"]))})


def resolve_action(rule: Rule, vr: str, options: DeidOptions) -> str:
    """One of X, Z, D, U, K, C, KSQ (keep a sequence, clean inside) for a listed attribute."""
    if options.retain_longitudinal_modified_dates and rule.longitudinal_modified_dates:
        return "C"
    if options.retain_patient_characteristics and rule.patient_characteristics:
        return "KSQ" if vr == "SQ" else rule.patient_characteristics
    if options.clean_descriptors and rule.clean_descriptors:
        return "C"
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


_DT_REST = re.compile(r"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$|^\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$")


def _shift_date(value: str, days: int, vr: str) -> str | None:
    """Shift a DA (YYYYMMDD, or old YYYY.MM.DD) or the date part of a DT (its time and time
    zone kept); None when it is not a whole date in that form (a partial DT, free text)."""
    text = value.strip()
    if len(text) >= 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:10] + text[10:]
    rest = text[8:]
    if len(text) < 8 or not text[:8].isdigit() or (rest if vr == "DA" else not _DT_REST.match(rest)):
        return None
    try:
        moved = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])) - _dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d") + rest


# VRs whose values can be kept without a look at them: numbers, binary, codes of fixed form.
# Strings (CS, LO, SH, UC, AE) are decoded to be checked for dates; SQ and UN never pass raw.
_RAW_KEEP_VRS = frozenset({"AS", "DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT",
                           "OB", "OD", "OF", "OL", "OV", "OW", "UR"})
_CHECKED_STRING_VRS = frozenset({"AE", "CS", "LO", "SH", "UC"})
# fixed-size binary VRs: a length that is no multiple of the size cannot be decoded
_FIXED_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}


def _raw_vr(raw: RawDataElement) -> str | None:
    if raw.VR is not None:
        return raw.VR
    try:  # implicit VR: the dictionary's, when it has exactly one
        return dictionary_VR(int(raw.tag))
    except KeyError:
        return None


def _check_length(tag: int, vr: str, length: int) -> None:
    size = _FIXED_SIZE.get(vr)
    if size and length % size:
        raise DeidError(f"element {_fmt(tag)} cannot be decoded (length {length} is not a "
                        f"multiple of {size} for VR {vr})")


def _removal_class(tag: int, vr: str | None) -> str:
    """Why an attribute that neither the table nor the keep list names is removed."""
    if tag & 0xFFFF == 0:
        return "group-length"
    if not dictionary_has_tag(tag):
        return "unknown-public"
    if vr == "UN":
        return "un"
    if dictionary_is_retired(tag):
        return "retired"
    return "not-allowed"


def _private_creators(ds: Dataset) -> dict[tuple[int, int], str]:
    """``{(group, block): creator}`` of the private creator elements (gggg,0010-00FF)."""
    creators = {}
    for tag in ds.keys():
        t = int(tag)
        if (t >> 16) % 2 == 1 and 0x10 <= t & 0xFFFF <= 0xFF:
            value = ds[tag].value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            creators[(t >> 16, t & 0xFF)] = str(value or "").strip(" \x00")
    return creators


class _Walker:
    def __init__(self, pz: Pseudonymizer, options: DeidOptions, token: str, shift: int | None):
        self.pz, self.options, self.token, self.shift = pz, options, token, shift
        self.counts: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        self.attributes: set[tuple[str, str]] = set()
        self.safe_creators = frozenset(c for c, _ in options.safe_private)

    def note(self, tag: int, action: str) -> None:
        self.counts[action] += 1
        self.attributes.add((_fmt(tag), action))

    def dataset(self, ds: Dataset) -> Dataset:
        out = Dataset()
        # the output keeps the input's encoding, so elements passed through undecoded (below)
        # are written back as the very bytes that were read
        out.set_original_encoding(*ds.original_encoding, ds.original_character_set)
        out._parent_encoding = ds._parent_encoding  # a sequence item's inherited character set
        creators = _private_creators(ds) if self.options.safe_private else {}
        for tag in list(ds.keys()):
            t = int(tag)
            group = t >> 16
            if group == 0x0002:  # file meta is rebuilt
                continue
            if group % 2 == 1:
                if self.safe_private(t, creators):
                    out[tag] = ds.get_item(tag)
                else:
                    self.removed["private"] += 1
                continue
            if is_overlay(t) or is_curve(t):
                self.removed["overlay" if is_overlay(t) else "curve"] += 1
                continue
            raw = ds.get_item(tag)
            listed = rule_for(t) is not None or t in (PATIENT_ID, ACCESSION_NUMBER)
            if not listed and t not in KEEP and not self.options.keep_unlisted:
                vr = _raw_vr(raw) if isinstance(raw, RawDataElement) else raw.VR
                self.removed[_removal_class(t, vr)] += 1
                continue
            if isinstance(raw, RawDataElement) and not listed and self.passes_raw(raw):
                out[tag] = raw
                continue
            try:
                elem = ds[tag]
            except Exception as exc:  # undecodable element: refuse the instance, name the tag only
                raise DeidError(f"element {_fmt(t)} cannot be decoded "
                                f"({exc.__class__.__name__})") from None
            new = self.element(elem)
            if new is not None:
                out.add(new)
        return out

    def safe_private(self, tag: int, creators: Mapping[tuple[int, int], str]) -> bool:
        element = tag & 0xFFFF
        if 0x10 <= element <= 0xFF:  # a creator: kept when the keep-list names it
            return creators.get((tag >> 16, element)) in self.safe_creators
        creator = creators.get((tag >> 16, element >> 8))
        return creator is not None and (creator, element & 0xFF) in self.options.safe_private

    def passes_raw(self, raw: RawDataElement) -> bool:
        """True for a kept element of a VR that needs no look at its value; raises
        :class:`DeidError` (tag and length only) for a fixed-size value of impossible length."""
        vr = _raw_vr(raw)
        if vr not in _RAW_KEEP_VRS:
            return False
        _check_length(int(raw.tag), vr, raw.length)
        return True

    def element(self, elem: DataElement) -> DataElement | None:
        tag, vr = int(elem.tag), elem.VR
        if tag & 0xFFFF == 0:  # group lengths go stale
            self.removed["group-length"] += 1
            return None
        if tag == PATIENT_ID:
            return self.patient_id(elem)
        if tag == ACCESSION_NUMBER:
            self.note(tag, "Z")
            value = normalize_identifier(str(elem.value or ""))
            return DataElement(tag, vr, self.pz.accession(value) if value else None)
        if vr == "UN":  # its real VR is unknown, so its value cannot be judged
            self.removed["un"] += 1
            return None
        rule = rule_for(tag)
        if rule is PRIVATE_RULE:  # reached only through keep_unlisted's decoded path
            self.removed["private"] += 1
            return None
        if rule is not None:
            action = resolve_action(rule, vr, self.options)
            self.note(tag, action)
            return self.apply(elem, action)
        if tag in KEEP:
            return self.keep(elem)
        return self.unlisted(elem)

    def keep(self, elem: DataElement) -> DataElement | None:
        """An attribute of the keep list: sequences filtered inside, strings free of dates.
        A copy, so that changing the output never changes the input."""
        if elem.VR == "SQ":
            return self.sequence(elem)
        if elem.VR in _CHECKED_STRING_VRS and elem.value and any(has_date(str(v)) for v in _values(elem.value)):
            self.removed["date-in-text"] += 1
            return None
        return copy.copy(elem)

    def patient_id(self, elem: DataElement) -> DataElement:
        self.note(PATIENT_ID, "Z")
        value = normalize_identifier(str(elem.value or ""))
        return DataElement(PATIENT_ID, elem.VR, self.pz.patient(value) if value else self.token)

    def sequence(self, elem: DataElement) -> DataElement:
        return DataElement(int(elem.tag), "SQ", Sequence([self.dataset(item) for item in elem.value]))

    def unlisted(self, elem: DataElement) -> DataElement | None:
        """The deny-list reading (``keep_unlisted``): kept, but names removed and dates and
        instance UIDs treated like the listed ones."""
        tag, vr = int(elem.tag), elem.VR
        if vr == "SQ":
            return self.sequence(elem)
        if vr in ("DA", "DT", "TM"):
            action = "C" if self.options.retain_longitudinal_modified_dates else "X"
            self.note(tag, action + "+")
            return self.apply(elem, action)
        if vr == "PN":
            self.note(tag, "X+")
            return None
        if vr == "UI" and tag not in CLASS_UIDS and elem.value:
            if any(not str(v).startswith(STANDARD_UID_ROOT) for v in _values(elem.value)):
                self.note(tag, "U+")
                return self.apply(elem, "U")
        return copy.copy(elem)

    def apply(self, elem: DataElement, action: str) -> DataElement | None:
        tag, vr, value = int(elem.tag), elem.VR, elem.value
        if action == "X":
            return None
        if action in ("K", "KSQ"):
            return self.sequence(elem) if vr == "SQ" else self.keep(elem)
        if action == "Z":
            return DataElement(tag, vr, Sequence() if vr == "SQ" else None)
        if action == "D":
            if tag == CONTENT_SEQUENCE:
                return self.content(elem)
            if vr == "SQ":
                return DataElement(tag, vr, Sequence([Dataset()]))
            if vr == "UI":
                return DataElement(tag, vr, self.pz.uid(str(value)) if value else self.pz.uid(_fmt(tag)))
            if vr not in _DUMMIES:  # UN (an attribute newer than our dictionary): no safe dummy
                return None
            return DataElement(tag, vr, _DUMMIES[vr])
        if action == "U":
            if vr == "SQ":  # a UID-bearing sequence: keep it, replace the UIDs inside
                return self.sequence(elem)
            if vr != "UI":
                return None
            if not value:
                return DataElement(tag, vr, value)
            new = [self.pz.uid(str(v)) for v in _values(value)]
            return DataElement(tag, vr, new if len(new) > 1 else new[0])
        if action == "C":
            return self.clean(elem)
        raise DeidError(f"{_fmt(tag)}: unsupported action {action}")

    def content(self, elem: DataElement) -> DataElement:
        """Structured content: items of coded, numeric, spatial and reference value types,
        each filtered like any other dataset; TEXT and PNAME items (and unknown types) go."""
        items = []
        for item in elem.value:
            value_type = str(item.get(VALUE_TYPE).value or "").strip() if VALUE_TYPE in item else ""
            if value_type in _CONTENT_VALUE_TYPES:
                items.append(self.dataset(item))
            else:
                kind = {"TEXT": "structured-text", "PNAME": "structured-name"}.get(value_type, "structured-other")
                self.removed[kind] += 1
        return DataElement(int(elem.tag), "SQ", Sequence(items))

    def clean(self, elem: DataElement) -> DataElement | None:
        """``C``: dates moved by the patient's shift (times of day kept), free text cleaned to
        clinical vocabulary; what cannot be cleaned is removed."""
        tag, vr, value = int(elem.tag), elem.VR, elem.value
        if vr == "SQ":
            return self.sequence(elem)
        if not value:
            return DataElement(tag, vr, value)
        values = _values(value)
        if vr == "TM" or (tag == TIMEZONE_OFFSET and vr == "SH"):
            ok = all(_TM.match(str(v).strip()) for v in values) if vr == "TM" else \
                re.fullmatch(r"[+-]\d{4}", str(value).strip())
            return copy.copy(elem) if ok else self.drop(tag, "uncleanable-text")
        if vr in ("DA", "DT"):
            if self.shift is None:
                return None
            shifted = [_shift_date(str(v), self.shift, vr) for v in values]
            if any(s is None for s in shifted):
                return self.drop(tag, "uncleanable-text")
            return DataElement(tag, vr, shifted if len(shifted) > 1 else shifted[0])
        if vr in ("LO", "SH", "ST", "LT", "UT", "UC"):
            cleaned = [clean_descriptor(str(v)) for v in values]
            if any(c is None for c in cleaned):
                return self.drop(tag, "uncleanable-text")
            return DataElement(tag, vr, cleaned if len(cleaned) > 1 else cleaned[0])
        return self.drop(tag, "uncleanable-text")

    def drop(self, tag: int, kind: str) -> None:
        self.note(tag, "X")
        self.removed[kind] += 1
        return None


def _values(value) -> list:
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


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


def _method_keys(options: DeidOptions) -> list[str]:
    flags = {"clean_pixels": options.pixels_cleaned, "clean_descriptors": options.clean_descriptors,
             "longitudinal": options.retain_longitudinal_modified_dates,
             "characteristics": options.retain_patient_characteristics,
             "safe_private": bool(options.safe_private)}
    return ["basic", *(k for k, on in flags.items() if on)]


def deidentify(ds: Dataset, pz: Pseudonymizer, options: DeidOptions = DeidOptions()) -> tuple[Dataset, DeidReport]:
    """De-identify ``ds`` (left untouched) into a new dataset; raise :class:`DeidError` when a
    kept element cannot be decoded (the instance is then quarantined, never forwarded
    half-done)."""
    token, missing = _patient_token(ds, pz)
    shift = pz.date_shift(token) if options.retain_longitudinal_modified_dates else None
    walker = _Walker(pz, options, token, shift)
    out = walker.dataset(ds)
    if PATIENT_ID not in out:
        out.add(DataElement(PATIENT_ID, "LO", token))

    keys = _method_keys(options)
    method = METHOD_NAME if not options.keep_unlisted else METHOD_NAME.replace("allow-list", "unlisted kept")
    # new elements, never assignments: a kept element may still be shared with the input
    out.add(DataElement(0x00120062, "CS", "YES"))  # Patient Identity Removed
    out.add(DataElement(0x00120063, "LO", method))  # De-identification Method
    out.add(DataElement(0x00120064, "SQ", Sequence([_code_item(CODES[k]) for k in keys])))
    out.add(DataElement(0x00280303, "CS", "MODIFIED" if shift is not None else "REMOVED"))

    accession = None
    if ACCESSION_NUMBER in out and out[ACCESSION_NUMBER].value:
        accession = str(out[ACCESSION_NUMBER].value)
    report = DeidReport(
        patient_token=token,
        accession_pseudonym=accession,
        date_shift_days=shift,
        actions=MappingProxyType(dict(sorted(walker.counts.items()))),
        attributes=tuple(sorted(walker.attributes)),
        removed=MappingProxyType(dict(sorted(walker.removed.items()))),
        patient_id_missing=missing,
        method_codes=tuple(CODES[k][0] for k in keys),
    )
    return out, report
