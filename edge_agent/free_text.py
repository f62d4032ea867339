"""Free text under the profile: dates found in any string, and descriptors cleaned to words
that cannot identify anyone.

Pure functions. A descriptor ("CT CHEST W/O CONTRAST 12/03/2024 DR SMITH") is cleaned by
keeping only words of clinical vocabulary — the code meanings of the coding schemes pydicom
ships (SNOMED CT, DICOM, RadLex, LOINC, UCUM: about 8,800 words), the words of DICOM
attribute names and common radiology abbreviations ("AX", "FLAIR") — plus short technical
tokens ("T1", "3D", "5MM"); a date, a long number, a
name or any word outside the vocabulary is dropped. Cleaning can only remove words, never add
or reorder them. A limitation stated plainly: a surname that is also a clinical eponym
("Parkinson", "Hodgkin") passes as the eponym does.
"""

from __future__ import annotations

import functools
import re

from pydicom.datadict import DicomDictionary

__all__ = ["has_date", "clean_descriptor"]

_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec"
_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(1[89]|20|21)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?!\d)"),  # 20240304
    re.compile(r"(?<!\d)\d{1,4}[./\-]\d{1,2}[./\-]\d{1,4}(?!\d)"),  # 12/03/2024, 2024-03-12, 4.3.24
    re.compile(rf"(?i)\b\d{{1,2}}\s*(?:{_MONTHS})[a-z]*\.?\s*\d{{2,4}}\b"),  # 4 Mar 2024
    re.compile(rf"(?i)\b(?:{_MONTHS})[a-z]*\.?\s+\d{{1,2}},?\s+\d{{2,4}}\b"),  # March 4, 2024
)
_TECHNICAL = re.compile(r"^(?:\d{1,3}(?:\.\d{1,2})?[a-z]{0,3}|[a-z]{1,3}\d{1,2}[a-z]{0,2})$")  # 5mm, 3d, t1, c5, t2w
# radiology abbreviations that code meanings spell out in full
_ABBREVIATIONS = frozenset("ax sag cor tra obl w wo flair fse tse se gre ge dwi adc swi stir pd fs "
                           "mprage spgr fiesta trufi haste epi mip mpr cta mra pet spect dx cr mg us "
                           "ap pa lat llat rlat lao rao lpo rpo cc mlo xccl hr std".split())
_WORD = re.compile(r"[A-Za-z0-9]+(?:\.[0-9]+)?")


def has_date(text: str) -> bool:
    """True when ``text`` holds something written like a calendar date, in any common form."""
    return any(p.search(text) for p in _DATE_PATTERNS)


@functools.cache
def _vocabulary() -> frozenset[str]:
    from pydicom.sr._concepts_dict import concepts  # noqa: PLC0415 - 0.5 s, only when cleaning

    words: set[str] = set()
    for schemes in concepts.values():
        for codes in schemes.values():
            for meaning, _ in codes.values():
                words.update(w.lower() for w in re.findall(r"[A-Za-z]{2,}", meaning))
    for entry in DicomDictionary.values():
        words.update(w.lower() for w in re.findall(r"[A-Za-z]{2,}", entry[2]))
    return frozenset(words)


def clean_descriptor(text: str) -> str | None:
    """The words of ``text`` that are clinical vocabulary or technical tokens, in their order
    and spelling, one space apart; None when nothing is left."""
    for pattern in _DATE_PATTERNS:
        text = pattern.sub(" ", text)
    vocabulary = _vocabulary()
    kept = [w for w in _WORD.findall(text)
            if w.lower() in vocabulary or w.lower() in _ABBREVIATIONS or _TECHNICAL.match(w.lower())]
    return " ".join(kept) or None
