"""Clinical records: the site's diagnosis labels and consent, keyed by pseudonyms only.

A hospital exports, per study, the patient ID (optionally its issuer), the accession number,
the diagnosis label and the patient's consent per purpose — as CSV or JSON. The importer
replaces both keys with the same keyed pseudonyms de-identification puts into the images
(:mod:`edge_agent.pseudonyms`), so labels join images by pseudonym and no identifier is kept.

CSV columns (header required): ``patient_id, accession, label, consent_diagnosis,
consent_research, consent_training, consent_sharing`` and optionally ``issuer``. JSON: a list
of objects with the same keys (or ``{"records": [...]}``), where ``consent`` may also be an
object ``{"diagnosis": true, ...}``. Booleans: true/false, yes/no, 1/0, y/n.

Errors name the file, the row number and the field, never a value from the row.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from edge_agent.errors import RecordsError
from edge_agent.pseudonyms import Pseudonymizer, normalize_identifier

__all__ = ["LABELS", "PURPOSES", "ClinicalRecord", "parse_records", "pseudonymize", "read_records_file",
           "RecordStore"]

LABELS = ("healthy", "benign", "malignant")
PURPOSES = ("diagnosis", "research", "training", "sharing")
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


@dataclass(frozen=True)
class ClinicalRecord:
    patient_token: str
    accession_pseudonym: str
    label: str
    consent: Mapping[str, bool]

    def to_dict(self) -> dict:
        return {"patient_token": self.patient_token, "accession_pseudonym": self.accession_pseudonym,
                "label": self.label, "consent": dict(self.consent)}


@dataclass(frozen=True)
class _Row:
    patient_id: str
    issuer: str | None
    accession: str
    label: str
    consent: Mapping[str, bool]


def _bool(origin: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RecordsError(f"{origin}: expected a boolean (true/false, yes/no, 1/0)")


def _row(where: str, obj: Mapping) -> _Row:
    def field(name: str) -> str:
        value = obj.get(name)
        if value is None or not normalize_identifier(str(value)):
            raise RecordsError(f"{where}: field {name!r} missing or empty")
        return normalize_identifier(str(value))

    patient_id, accession = field("patient_id"), field("accession")
    label = field("label").lower()
    if label not in LABELS:
        raise RecordsError(f"{where}: label must be one of {', '.join(LABELS)}")
    nested = obj.get("consent")
    consent = {}
    for purpose in PURPOSES:
        if isinstance(nested, Mapping):
            raw = nested.get(purpose)
        else:
            raw = obj.get(f"consent_{purpose}")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise RecordsError(f"{where}: consent for {purpose!r} missing")
        consent[purpose] = _bool(f"{where}: consent_{purpose}", raw)
    issuer = obj.get("issuer")
    issuer = normalize_identifier(str(issuer)) if issuer is not None else None
    return _Row(patient_id, issuer or None, accession, label, MappingProxyType(consent))


def parse_records(text: str, *, fmt: str, origin: str = "records") -> list[_Row]:
    """Parse CSV (``fmt='csv'``) or JSON (``fmt='json'``) text into validated rows."""
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{origin}: not valid JSON (line {exc.lineno})") from None
        if isinstance(data, Mapping):
            data = data.get("records")
        if not isinstance(data, list):
            raise RecordsError(f"{origin}: expected a list of records or {{\"records\": [...]}}")
        rows = []
        for i, obj in enumerate(data):
            if not isinstance(obj, Mapping):
                raise RecordsError(f"{origin}: record {i}: expected an object")
            rows.append(_row(f"{origin}: record {i}", obj))
        return rows
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"patient_id", "accession", "label"} - set(reader.fieldnames or ())
        if missing and any(";" in name for name in reader.fieldnames or ()):
            raise RecordsError(f"{origin}: columns are separated by ';'; export the file with commas "
                               "(patient_id,accession,label,...)")
        if missing:
            raise RecordsError(f"{origin}: CSV header lacks {', '.join(sorted(missing))}")
        return [_row(f"{origin}: line {reader.line_num}", obj) for obj in reader]
    raise RecordsError(f"{origin}: unknown format {fmt!r} (csv or json)")


def read_records_file(path: str | Path) -> list[_Row]:
    path = Path(path)
    fmt = {".csv": "csv", ".json": "json"}.get(path.suffix.lower())
    if fmt is None:
        raise RecordsError(f"{path}: expected a .csv or .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:  # a Latin-1 or Windows-1252 export: say where, never what
        raise RecordsError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); "
                           "export the file as UTF-8") from None
    return parse_records(text, fmt=fmt, origin=str(path))


def pseudonymize(rows: Iterable[_Row], pz: Pseudonymizer) -> list[ClinicalRecord]:
    """Replace patient ID and accession with the keyed pseudonyms the images carry."""
    return [ClinicalRecord(pz.patient(r.patient_id, r.issuer), pz.accession(r.accession), r.label,
                           r.consent) for r in rows]


class RecordStore:
    """SQLite store of pseudonymized records: consent per patient token and purpose, labels
    per (patient token, accession pseudonym). The latest import wins."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(
            "pragma journal_mode=wal;"
            "create table if not exists consent (patient_token text, purpose text, granted integer,"
            " primary key (patient_token, purpose));"
            "create table if not exists labels (patient_token text, accession_pseudonym text, label text,"
            " primary key (patient_token, accession_pseudonym));")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upsert(self, records: Iterable[ClinicalRecord]) -> int:
        n = 0
        with self._lock, self._db:
            for r in records:
                self._db.executemany("insert or replace into consent values (?, ?, ?)",
                                     [(r.patient_token, p, int(g)) for p, g in r.consent.items()])
                self._db.execute("insert or replace into labels values (?, ?, ?)",
                                 (r.patient_token, r.accession_pseudonym, r.label))
                n += 1
        return n

    def consent(self, patient_token: str) -> dict[str, bool]:
        """Consent flags per purpose; purposes never recorded are absent (treat as not given)."""
        with self._lock:
            rows = self._db.execute("select purpose, granted from consent where patient_token = ?",
                                    (patient_token,)).fetchall()
        return {p: bool(g) for p, g in rows}

    def label(self, patient_token: str, accession_pseudonym: str) -> str | None:
        with self._lock:
            row = self._db.execute("select label from labels where patient_token = ? and accession_pseudonym = ?",
                                   (patient_token, accession_pseudonym)).fetchone()
        return row[0] if row else None

    def labels(self, patient_token: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("select accession_pseudonym, label from labels where patient_token = ?",
                                    (patient_token,)).fetchall()
        return dict(rows)

    def counts(self) -> dict[str, int]:
        with self._lock:
            patients = self._db.execute("select count(distinct patient_token) from consent").fetchone()[0]
            studies = self._db.execute("select count(*) from labels").fetchone()[0]
        return {"patients": patients, "studies": studies}
