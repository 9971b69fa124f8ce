"""Header-only reading of DICOM files and per-series verdicts, for the DICOM index.

:func:`read_instance_header` reads one file without its pixel data and either
returns the header values the index needs (raw identifiers included — the
caller pseudonymises them before anything is stored) or a quarantine verdict
with a machine-readable reason. It also checks, from the byte layout alone,
that the pixel data element is complete: a file cut inside its pixels still
parses header-only and must not pass for a good slice.

:func:`judge_series` decides whether the instances of one series can become a
volume (``eligible``) or why not, using the same geometry rules as the volume
loader (:mod:`preprocessing.ct_geometry`).
"""
from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from preprocessing.ct_geometry import MAX_GAP_MM, TILT_TOL_DEG, analyse_positions
from preprocessing.dicom_series import (REASON_DUPLICATE_POSITIONS, REASON_GANTRY_TILT,
                                        REASON_INCONSISTENT_ORIENTATION, REASON_INCONSISTENT_SIZE,
                                        REASON_LOCALIZER, REASON_MISSING_GEOMETRY, REASON_MISSING_SLICES,
                                        REASON_MULTIFRAME, REASON_NOT_CT, REASON_TOO_FEW_SLICES, REASON_UNDECODABLE,
                                        ORIENTATION_TOL)

# File-level quarantine reasons.
FILE_NOT_DICOM = "not_dicom"
FILE_UNREADABLE = "unreadable"
FILE_INCOMPLETE_HEADER = "incomplete_header"
FILE_TRUNCATED = "truncated"
# A DICOM data set without the Part 10 preamble and file meta (old archives): readable only by guessing
# its encoding, so it is not indexed; re-export it as Part 10.
FILE_NO_FILE_META = "no_file_meta"
FILE_REASONS = (FILE_NOT_DICOM, FILE_UNREADABLE, FILE_INCOMPLETE_HEADER, FILE_TRUNCATED, FILE_NO_FILE_META)

ELIGIBLE = "eligible"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_ITEM, _SEQ_DELIMITER_TAG = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
# VRs a pixel data element can carry in explicit VR; anything else means the writer used implicit VR.
_PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OV", b"UN"}


def _number(value: Any, cast: Callable[[Any], Any] = float) -> Any:
    """``cast(value)``, or None for a missing, empty or malformed value (e.g. IS "1A")."""
    if value is None or value == "":
        return None
    try:
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip(), "%Y%m%d").date()
    except ValueError:
        return None


def _pixel_problem(path: Path, ds: pydicom.Dataset, offset: int, size: int) -> str | None:
    """Why the pixel data element at byte ``offset`` is incomplete, or None if it is whole."""
    tsuid = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2.1")))
    if tsuid.is_deflated:
        # The dataset is zlib-compressed: byte offsets in the file say nothing; decoding will judge it.
        return None
    if offset >= size:
        return "the file ends before its pixel data"
    little = tsuid.is_little_endian if tsuid.is_transfer_syntax else True
    implicit = tsuid.is_implicit_VR if tsuid.is_transfer_syntax else False
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(12)
        if len(head) < 8:
            return "the file ends inside the pixel data element's header"
        endian = "<" if little else ">"
        group, elem = struct.unpack(endian + "HH", head[:4])
        if (group, elem) not in _PIXEL_TAGS:
            return None  # something unusual after the header; decoding will judge it
        if not implicit and head[4:6] not in _PIXEL_VRS:
            implicit = True  # written as implicit VR under an explicit transfer syntax (pydicom reads it so too)
        if implicit:
            (length,), header_len = struct.unpack(endian + "I", head[4:8]), 8
        else:
            if len(head) < 12:
                return "the file ends inside the pixel data element's header"
            (length,), header_len = struct.unpack(endian + "I", head[8:12]), 12
        if length == 0xFFFFFFFF:
            # Encapsulated (compressed) frames: items up to a sequence delimiter, which need not
            # end the file (trailing padding or other elements may follow).
            return _encapsulated_problem(f, offset + header_len, size, endian)
    if offset + header_len + length > size:
        return f"pixel data declares {length} bytes but the file holds {size - offset - header_len}"
    native = (not tsuid.is_compressed) if tsuid.is_transfer_syntax else True
    if native:
        rows, cols = _number(ds.get("Rows"), int) or 0, _number(ds.get("Columns"), int) or 0
        bits = _number(ds.get("BitsAllocated"), int) or 16
        # A malformed NumberOfFrames (seen: IS "1A") counts as one frame: the check is a lower bound.
        frames = max(_number(ds.get("NumberOfFrames"), int) or 1, 1)
        spp = _number(ds.get("SamplesPerPixel"), int) or 1
        if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            spp = 2  # chroma subsampled horizontally: two samples per pixel on average
        expected = rows * cols * frames * spp * bits // 8
        if length < expected:
            return f"pixel data holds {length} bytes; {rows}x{cols}x{frames} at {bits} bits needs {expected}"
    return None


def _encapsulated_problem(f: Any, pos: int, size: int, endian: str) -> str | None:
    """Walk the items of encapsulated pixel data from byte ``pos``; why they are incomplete, or None."""
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return "encapsulated pixel data ends before its sequence delimiter (file cut short)"
        group, elem, length = struct.unpack(endian + "HHI", head)
        if (group, elem) == _SEQ_DELIMITER_TAG:
            return None
        if (group, elem) != _ITEM:
            return f"encapsulated pixel data holds ({group:04X},{elem:04X}) where an item should be"
        pos += 8 + length
        if pos > size:
            return f"a pixel data fragment declares {length} bytes but the file ends first (file cut short)"


def _no_file_meta(path: Path) -> bool:
    """True when ``path`` parses as a DICOM data set once the missing preamble/file meta is forgiven."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds
    except Exception:  # junk makes the forced parser fail in many ways
        return False


def read_instance_header(path: Path | str) -> dict[str, Any]:
    """Header values of one file (no pixels), or ``{"quarantine": reason, "detail": ...}``.

    The returned dict holds raw identifiers (``series_uid``, ``study_uid``,
    ``sop_uid``, ``patient_id``): pseudonymise them before storing anything.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return {"path": str(path), "file_size_bytes": None, "quarantine": FILE_UNREADABLE,
                "detail": f"cannot stat file: {exc.strerror}"}
    base = {"path": str(path), "file_size_bytes": int(size)}
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            offset = f.tell()
    except InvalidDicomError:
        if _no_file_meta(path):
            return {**base, "quarantine": FILE_NO_FILE_META,
                    "detail": "DICOM data set without the Part 10 preamble and file meta; re-export as Part 10"}
        return {**base, "quarantine": FILE_NOT_DICOM, "detail": "no DICM preamble/file meta; not a DICOM file"}
    except Exception as exc:  # pydicom raises many types on damaged headers
        return {**base, "quarantine": FILE_UNREADABLE,
                "detail": f"header cannot be parsed ({type(exc).__name__})"}
    missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if k not in ds]
    if missing:
        return {**base, "quarantine": FILE_INCOMPLETE_HEADER,
                "detail": f"header lacks {', '.join(missing)} (file cut short or not an image object)"}
    try:
        return _instance_values(path, ds, offset, size, base)
    except Exception as exc:  # a value no rule foresaw must cost one file, never the run
        return {**base, "quarantine": FILE_UNREADABLE,
                "detail": f"header values cannot be used ({type(exc).__name__})"}


def _instance_values(path: Path, ds: pydicom.Dataset, offset: int, size: int,
                     base: dict[str, Any]) -> dict[str, Any]:
    """The instance dict of :func:`read_instance_header` for a parsed header (or a truncation verdict)."""
    has_image = "Rows" in ds and "Columns" in ds
    if has_image:
        problem = _pixel_problem(path, ds, offset, size)
        if problem is not None:
            return {**base, "quarantine": FILE_TRUNCATED, "detail": problem}
    meta = getattr(ds, "file_meta", None)
    image_type = getattr(ds, "ImageType", None)
    if image_type is not None and not isinstance(image_type, str):
        image_type = "\\".join(str(v) for v in image_type)
    ps = _floats(getattr(ds, "PixelSpacing", None), 2)
    return {
        **base,
        "sop_uid": str(ds.SOPInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "study_uid": str(ds.StudyInstanceUID),
        "patient_id": str(getattr(ds, "PatientID", "") or ""),
        "sop_class_uid": str(getattr(ds, "SOPClassUID", "") or ""),
        "modality": str(getattr(ds, "Modality", "") or ""),
        "image_type": image_type,
        "transfer_syntax": str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else "",
        "manufacturer": str(getattr(ds, "Manufacturer", "") or "") or None,
        "study_date": _date(getattr(ds, "StudyDate", "")),
        "instance_number": _number(ds.get("InstanceNumber"), int),
        "position_lps_mm": _floats(getattr(ds, "ImagePositionPatient", None), 3),
        "orientation": _floats(getattr(ds, "ImageOrientationPatient", None), 6),
        "pixel_spacing_mm": ps,
        "rows": int(ds.Rows) if has_image else None,
        "cols": int(ds.Columns) if has_image else None,
        "slice_thickness_mm": _number(ds.get("SliceThickness")),
        "gantry_tilt_deg": _number(ds.get("GantryDetectorTilt")),
        "rescale_slope": float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
        "rescale_intercept": float(getattr(ds, "RescaleIntercept", 0.0) or 0.0),
        "has_pixels": bool(has_image),
    }


def decode_problem(path: str) -> str | None:
    """Decode one file's pixels; None when they decode to Rows × Columns, else a short reason."""
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:  # any decoder failure makes the series unusable
        # One line, long enough to keep pydicom's list of missing decoder plugins (the actionable part).
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if arr.shape[-2:] != (int(ds.Rows), int(ds.Columns)):
        return f"decoded shape {arr.shape} is not {int(ds.Rows)}x{int(ds.Columns)}"
    return None


def judge_series(instances: Sequence[dict[str, Any]], min_slices: int, gantry_tilt: str,
                 decode: Callable[[str], str | None] = decode_problem) -> dict[str, Any]:
    """Geometry summary and verdict for one series' instances (header dicts).

    Returns ``verdict`` (``eligible`` or a reason code), ``detail`` and the
    geometry summary; ``paths`` are ordered along the slice normal when the
    geometry allows it. ``decode`` checks one (the middle) slice's pixels.
    """
    n = len(instances)
    first = instances[0]
    out: dict[str, Any] = {
        "slice_count": n, "rows": first.get("rows"), "cols": first.get("cols"),
        "modality": first.get("modality"), "image_type": first.get("image_type"),
        "transfer_syntax": first.get("transfer_syntax"), "manufacturer": first.get("manufacturer"),
        "study_date": first.get("study_date"), "slice_thickness_mm": first.get("slice_thickness_mm"),
        "pixel_spacing_row_mm": None, "pixel_spacing_col_mm": None, "orientation": first.get("orientation"),
        "spacing_min_mm": None, "spacing_median_mm": None, "spacing_max_mm": None, "tilt_deg": None,
        "regular_spacing": None, "paths": sorted(str(i["path"]) for i in instances),
    }
    ps = first.get("pixel_spacing_mm")
    if ps:
        out["pixel_spacing_row_mm"], out["pixel_spacing_col_mm"] = float(ps[0]), float(ps[1])

    def verdict(reason: str, detail: str) -> dict[str, Any]:
        out["verdict"], out["detail"] = reason, detail
        return out

    modalities = sorted({str(i.get("modality")) for i in instances})
    if modalities != ["CT"] or any(i.get("sop_class_uid") not in CT_SOP_CLASSES for i in instances):
        return verdict(REASON_NOT_CT, f"modality {'/'.join(modalities)}; only CT image storage is scored")
    if any(i.get("sop_class_uid") == ENHANCED_CT_IMAGE_STORAGE for i in instances):
        return verdict(REASON_MULTIFRAME, "Enhanced CT (multi-frame) object: its geometry is per frame in "
                       "functional groups; only CT Image Storage (one slice per file) is read")
    if any("LOCALIZER" in str(i.get("image_type") or "").upper().split("\\") for i in instances):
        return verdict(REASON_LOCALIZER, "ImageType says LOCALIZER (scout), not a volume")
    if any(not i.get("has_pixels") or i.get("position_lps_mm") is None or i.get("orientation") is None
           or i.get("pixel_spacing_mm") is None for i in instances):
        return verdict(REASON_MISSING_GEOMETRY,
                       "a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    iop0 = np.asarray(first["orientation"], dtype=np.float64)
    if any(np.max(np.abs(np.asarray(i["orientation"]) - iop0)) > ORIENTATION_TOL for i in instances):
        return verdict(REASON_INCONSISTENT_ORIENTATION, "slices differ in ImageOrientationPatient")
    if any((i["rows"], i["cols"]) != (first["rows"], first["cols"])
           or max(abs(a - b) for a, b in zip(i["pixel_spacing_mm"], ps)) > 1e-4 for i in instances):
        return verdict(REASON_INCONSISTENT_SIZE, "slices differ in Rows/Columns/PixelSpacing")
    try:
        sg = analyse_positions(np.asarray([i["position_lps_mm"] for i in instances]), iop0)
    except ValueError as exc:
        return verdict(REASON_INCONSISTENT_ORIENTATION, str(exc))
    out["paths"] = [str(instances[k]["path"]) for k in sg.order]
    if n >= 2:
        out.update(spacing_min_mm=sg.spacing_min_mm, spacing_median_mm=sg.spacing_median_mm,
                   spacing_max_mm=sg.spacing_max_mm, tilt_deg=sg.tilt_deg, regular_spacing=sg.regular)
    if n < max(min_slices, 2):
        return verdict(REASON_TOO_FEW_SLICES, f"{n} slices; imaging.min_slices is {min_slices}")
    if sg.duplicate_positions:
        return verdict(REASON_DUPLICATE_POSITIONS, f"{sg.duplicate_positions} slices share a position")
    gap = sg.gap_problem(MAX_GAP_MM)
    if gap is not None:
        return verdict(REASON_MISSING_SLICES, gap)
    if gantry_tilt == "reject" and sg.tilt_deg > TILT_TOL_DEG:
        return verdict(REASON_GANTRY_TILT, f"stack sheared by {sg.tilt_deg:.2f} degrees; imaging.gantry_tilt=reject")
    problem = decode(out["paths"][n // 2])
    if problem is not None:
        return verdict(REASON_UNDECODABLE, problem)
    return verdict(ELIGIBLE, "")
