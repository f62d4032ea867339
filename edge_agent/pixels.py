"""Pixel data checks: can it be decoded, does it carry burned-in text, and blanking it.

Pure functions over in-memory datasets. Decoding uses pydicom's pixel plugins (numpy for
native data; pylibjpeg with libjpeg, openjpeg and rle backends for JPEG, JPEG-LS, JPEG 2000
and RLE), so "cannot be decoded" here means no installed decoder can read it.
"""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from edge_agent.config import BurnedInPolicy, Region
from edge_agent.errors import Quarantined
from edge_agent.textdetect import TextBox, TextDetector, blank_boxes, detect_frames

__all__ = ["has_pixels", "decode_check", "burned_in_suspect", "find_text", "blank_regions", "region_boxes",
           "SECONDARY_CAPTURE_ROOT"]

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"


def has_pixels(ds: Dataset) -> bool:
    return PIXEL_DATA in ds or any(t in ds for t in FLOAT_PIXEL_DATA)


def _native_length(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    count = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    return (count + 7) // 8 if bits == 1 else count * (bits // 8)


def decode_check(ds: Dataset, transfer_syntax: str) -> None:
    """Check that every frame can be decoded; raise ``Quarantined('undecodable-pixel-data')``
    when not. Native (uncompressed) pixel data only needs its geometry to match its length;
    compressed data is decoded."""
    if not UID(transfer_syntax).is_compressed and PIXEL_DATA in ds:
        try:
            needed, have = _native_length(ds), len(ds.PixelData)
        except Exception as exc:
            raise Quarantined("undecodable-pixel-data", f"image geometry unreadable ({exc.__class__.__name__})") from None
        if have < needed:
            raise Quarantined("undecodable-pixel-data", f"pixel data holds {have} bytes, geometry needs {needed}")
        return
    probe = _with_meta(ds, transfer_syntax)
    try:
        probe.pixel_array  # noqa: B018 - decoding is the check
    except Exception as exc:  # any decoder failure: truncated stream, bad codestream, no plugin
        raise Quarantined("undecodable-pixel-data", f"{exc.__class__.__name__} for transfer syntax "
                          f"{transfer_syntax}") from None


def burned_in_suspect(ds: Dataset, policy: BurnedInPolicy) -> bool:
    """Burned In Annotation YES, or not NO for modalities (and secondary captures) that are
    known to burn text into the pixels."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return True
    if flag == "NO":
        return False
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    return modality in policy.suspect_modalities or sop_class.startswith(SECONDARY_CAPTURE_ROOT)


def find_text(ds: Dataset, transfer_syntax: str, detector: TextDetector) -> tuple[TextBox, ...]:
    """Text burned into the pixels, found by looking (:mod:`edge_agent.textdetect`): the boxes,
    in pixel coordinates, over every frame looked at. Decoding is the decode check too:
    ``Quarantined('undecodable-pixel-data')`` when no decoder can read the pixels."""
    probe = _with_meta(ds, transfer_syntax)
    try:
        pixels = probe.pixel_array
    except Exception as exc:
        raise Quarantined("undecodable-pixel-data", f"{exc.__class__.__name__} for transfer syntax "
                          f"{transfer_syntax}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    return detect_frames(detector, pixels, photometric, frames).boxes


def blank_regions(ds: Dataset, transfer_syntax: str, boxes: tuple[TextBox, ...]) -> tuple[Dataset, str]:
    """Zero exactly ``boxes`` (with a small margin) in every frame. The result is stored
    uncompressed (explicit VR little endian): re-encoding lossy data would compound its loss."""
    out = _with_meta(ds, transfer_syntax)
    try:
        if UID(transfer_syntax).is_compressed:
            out.decompress(generate_instance_uid=False)
        frames = int(out.get("NumberOfFrames", 1) or 1)
        pixels = blank_boxes(out.pixel_array, boxes, frames)
    except Quarantined:
        raise
    except Exception as exc:
        raise Quarantined("undecodable-pixel-data", f"{exc.__class__.__name__} while blanking") from None
    out.PixelData = pixels.tobytes()
    out["PixelData"].VR = "OB" if int(out.BitsAllocated) <= 8 else "OW"
    out.BurnedInAnnotation = "NO"
    del out.file_meta
    return out, ExplicitVRLittleEndian


def region_boxes(regions: tuple[Region, ...]) -> tuple[TextBox, ...]:
    """Configured rectangles as boxes to blank (a site's known annotation areas)."""
    return tuple(TextBox(r.x, r.y, r.width, r.height, 1.0) for r in regions)


def _with_meta(ds: Dataset, transfer_syntax: str) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds
