"""Synthetic studies with realistic headers and fake PHI, and their ground truth.

``generate_studies(modality, n, seed)`` is deterministic: the same arguments give the same
patients, UIDs, headers and pixels. Each study carries the identifying attributes a real
scanner writes (names, IDs, birth date, address, phone, institution, physicians, operator,
station, device serial, free-text comments, a vendor private block that repeats the name) so
de-identification has real work to do. The ground truth is an EHR-style record per study,
keyed by patient ID and accession, with the diagnosis label and consent per purpose, in the
format ``medchain edge records import`` reads.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from scanner_sim import phantoms

__all__ = ["MODALITIES", "SOP_CLASSES", "FakePatient", "SimStudy", "generate_studies", "ground_truth",
           "write_ground_truth", "write_studies", "part10_bytes", "PURPOSES"]

MODALITIES = ("CT", "MR", "CR", "DX", "MG", "US")
PURPOSES = ("diagnosis", "research", "training", "sharing")
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
}
IMAGES_PER_STUDY = {"CT": 4, "MR": 3, "CR": 1, "DX": 1, "MG": 2, "US": 1}
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; UIDs drawn deterministically under it

_GIVEN = ["Anna", "Ben", "Clara", "David", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal",
          "Lena", "Mateo", "Nora", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tove", "Ulla", "Viktor"]
_FAMILY = ["Andersen", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad",
           "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov"]
_STREETS = ["Elm Street", "Harbour Road", "Mill Lane", "Station Square", "Kirkegade", "Rue Lafayette"]
_BODY_PART = {"CT": "CHEST", "MR": "HEAD", "CR": "CHEST", "DX": "CHEST", "MG": "BREAST", "US": "ABDOMEN"}


@dataclass(frozen=True)
class FakePatient:
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    address: str
    phone: str


@dataclass(frozen=True)
class SimStudy:
    patient: FakePatient
    accession: str
    study_uid: str
    modality: str
    label: str
    consent: Mapping[str, bool]
    datasets: tuple[Dataset, ...]


def _uid(seed: int, *parts) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(seed), *map(str, parts)])


def _patient(rng: np.random.Generator, issuer: str) -> FakePatient:
    given, family = rng.choice(_GIVEN), rng.choice(_FAMILY)
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
    return FakePatient(
        patient_id=f"MRN{int(rng.integers(1_000_000, 9_999_999))}",
        issuer=issuer,
        name=f"{family}^{given}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        address=f"{int(rng.integers(1, 200))} {rng.choice(_STREETS)}, Springfield",
        phone=f"+1-555-{int(rng.integers(1000, 9999))}",
    )


def _pixels(modality: str, label: str, rng: np.random.Generator, index: int, count: int) -> np.ndarray:
    if modality == "CT":
        return phantoms.ct_slice(label, rng, z=(index - count / 2) / max(count, 1))
    if modality == "MR":
        return phantoms.mr_slice(label, rng)
    if modality in ("CR", "DX"):
        return phantoms.radiograph(label, rng)
    if modality == "MG":
        return phantoms.mammogram(label, rng)
    return phantoms.ultrasound_cine(label, rng)


def _image(modality: str, pixels: np.ndarray, ds: Dataset) -> None:
    if modality == "US":
        frames, rows, cols, _ = pixels.shape
        ds.NumberOfFrames, ds.FrameTime, ds.SamplesPerPixel = frames, 33.3, 3
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.BurnedInAnnotation = "NO"
        ds.FrameIncrementPointer = 0x00181063
    else:
        rows, cols = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = rows, cols
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.KVP, ds.XRayTubeCurrent, ds.ConvolutionKernel = 120, 200, "B45f"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    elif modality == "MR":
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.9], 5.0
        ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime = 3.0, 90.0, 4000.0
        ds.ScanningSequence, ds.SequenceVariant = "SE", "SK"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    elif modality in ("CR", "DX", "MG"):
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.KVP = 28 if modality == "MG" else 110
        if modality == "MG":
            ds.ImageLaterality, ds.ViewPosition = "L", "MLO"
    ds.PixelData = pixels.tobytes()


def _dataset(seed: int, study_no: int, index: int, count: int, modality: str, patient: FakePatient,
             accession: str, study_uid: str, series_uid: str, frame_uid: str, when: dt.datetime,
             pixels: np.ndarray, site: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality in ("CT", "MR") else ""]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = _uid(seed, "sop", study_no, index)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ds.InstanceCreationTime = time
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName = "MedChain Simulated Scanners", f"SimScan {modality} 3000"
    ds.InstitutionName = f"{site.title()} General Hospital"
    ds.InstitutionAddress = "1 Hospital Way, Springfield"
    ds.ReferringPhysicianName = "Okafor^Ngozi^^Dr."
    ds.StationName = f"{modality}01-{site.upper()}"
    ds.StudyDescription = f"{_BODY_PART[modality].title()} {modality} for {patient.name.split('^')[0]}"
    ds.SeriesDescription = f"{modality} series 1"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PerformingPhysicianName = "Lindqvist^Maja"
    ds.OperatorsName = "Tech^Tom"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int((when.date() - dt.datetime.strptime(patient.birth_date, '%Y%m%d').date()).days / 365.25):03d}Y"
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.OtherPatientIDs = f"NHS{patient.patient_id[3:]}"
    ds.PatientComments = f"Call {patient.phone} before follow-up"
    ds.BodyPartExamined = _BODY_PART[modality]
    ds.DeviceSerialNumber = f"SN-{seed % 1000:03d}-{modality}"
    ds.SoftwareVersions = "sim-1.0"
    ds.ProtocolName = f"{_BODY_PART[modality]} routine"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = f"S{study_no:05d}"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientPosition = "HFS" if modality in ("CT", "MR") else ""
    if modality in ("CT", "MR"):
        ds.ImagePositionPatient = [-180.0, -180.0, -index * 2.5]
        ds.SliceLocation = -index * 2.5
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step
    ref.ReferencedSOPInstanceUID = _uid(seed, "pps", study_no)
    ds.ReferencedPerformedProcedureStepSequence = Sequence([ref])
    request = Dataset()
    request.RequestedProcedureID = f"RP{study_no:05d}"
    request.ScheduledProcedureStepID = f"SPS{study_no:05d}"
    request.RequestingPhysician = "Okafor^Ngozi"
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0029, "SIMSCAN 1.0", create=True)
    block.add_new(0x10, "LO", patient.name.replace("^", " "))
    block.add_new(0x11, "LO", f"{site}-workstation-7")
    _image(modality, pixels, ds)
    ds.file_meta = _meta(ds)
    return ds


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def generate_studies(modality: str, n: int, seed: int = 0, *, site: str = "site-a",
                     images_per_study: int | None = None,
                     start: dt.datetime = dt.datetime(2024, 3, 4, 8, 0, 0)) -> list[SimStudy]:
    """``n`` studies of one modality, deterministic in ``seed``. Labels cycle healthy, benign,
    malignant with a seeded shuffle; consent is mostly granted, sometimes refused per purpose."""
    modality = modality.upper()
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    per = images_per_study or IMAGES_PER_STUDY[modality]
    studies = []
    for s in range(n):
        patient = _patient(rng, site)
        label = phantoms.LABELS[int(rng.integers(0, 3))]
        consent = MappingProxyType({p: bool(rng.random() < (0.95 if p == "diagnosis" else 0.8)) for p in PURPOSES})
        accession = f"ACC{int(rng.integers(10**7, 10**8))}"
        when = start + dt.timedelta(days=int(rng.integers(0, 300)), minutes=int(rng.integers(0, 600)))
        study_uid, series_uid = _uid(seed, modality, "study", s), _uid(seed, modality, "series", s)
        frame_uid = _uid(seed, modality, "frame", s)
        datasets = tuple(
            _dataset(seed, s, i, per, modality, patient, accession, study_uid, series_uid, frame_uid, when,
                     _pixels(modality, label, rng, i, per), site)
            for i in range(per))
        studies.append(SimStudy(patient, accession, study_uid, modality, label, consent, datasets))
    return studies


def part10_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part-10 file (explicit VR little endian)."""
    import io

    if not getattr(ds, "file_meta", None):
        ds.file_meta = _meta(ds)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_studies(studies: Iterable[SimStudy], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    paths = []
    for st in studies:
        for ds in st.datasets:
            path = folder / st.modality / st.accession / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(part10_bytes(ds))
            paths.append(path)
    return paths


def ground_truth(studies: Iterable[SimStudy]) -> list[dict]:
    """EHR-style rows keyed by patient ID and accession (the clinical-records import format)."""
    return [{"patient_id": st.patient.patient_id, "issuer": st.patient.issuer, "accession": st.accession,
             "label": st.label, **{f"consent_{p}": "yes" if st.consent[p] else "no" for p in PURPOSES},
             "modality": st.modality} for st in studies]


def write_ground_truth(studies: Iterable[SimStudy], path: str | Path) -> Path:
    """CSV or JSON by suffix; the file holds PHI-like keys, as a hospital export would."""
    path = Path(path)
    rows = ground_truth(studies)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"records": rows}, indent=1))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["patient_id", "accession", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return path
