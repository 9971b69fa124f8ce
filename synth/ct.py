"""Synthetic DICOM CT studies with planted nodules, for demos, tests and benchmarks.

Each study is one folder holding several series mixed together under shuffled
file names, the way PACS exports arrive: an axial chest series (512×512 by
default), a localizer, in the first study an RLE Lossless–compressed second
reconstruction, and optionally a variable-spacing and a gantry-tilted series.
Broken inputs are planted beside them (a file truncated inside its pixel data,
one truncated inside its header, non-DICOM files). ``ground_truth.json`` lists
every volume series' nodules in LPS mm, keyed by SeriesInstanceUID, plus what
the index is expected to conclude about each series and broken file.

All pixels are sampled from one analytic phantom per study
(:mod:`synth.ct_phantom`), so the same nodule sits at the same patient
position in every series of a study however that series was sampled.
Same seed, same bytes (UIDs are derived from the seed, not from randomness).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from synth.ct_phantom import ChestAnatomy, ChestPhantom, Nodule, random_nodules

# Our own UID root for synthetic data (pydicom's documented example root).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

# Study dates are drawn in [STUDY_FIRST_DAY, STUDY_FIRST_DAY + 540 days) (study_identity).
STUDY_FIRST_DAY = dt.date(2023, 1, 1)
STUDY_LAST_DAY = STUDY_FIRST_DAY + dt.timedelta(days=539)

MANUFACTURERS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA", "Canon Medical Systems")


@dataclass
class SeriesSpec:
    """How one series samples the study's phantom."""

    label: str                               # what the series is for (ground truth only)
    rows: int = 512
    cols: int = 512
    pixel_spacing_mm: float = 0.7
    # Slice centres along the scanner's z axis (table position), ascending, mm.
    z_positions_mm: list[float] = field(default_factory=list)
    tilt_deg: float = 0.0
    rle: bool = False
    localizer: bool = False
    slice_thickness_mm: float | None = None
    # Stored as int16 with intercept 0 ("signed") or uint16 with intercept −1024.
    signed: bool = False
    manufacturer: str = "SIEMENS"
    expected: str = "eligible"


def _uid(*parts: Any) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _base_dataset(sop_uid: str, study: dict[str, Any], series_uid: str, spec: SeriesSpec,
                  series_number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = study["birth_date"]
    ds.PatientSex = study["sex"]
    ds.StudyInstanceUID = study["study_uid"]
    ds.StudyDate = study["study_date"]
    ds.StudyTime = "093000"
    ds.StudyID = "1"
    ds.AccessionNumber = study["accession"]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = spec.label.replace("_", " ").upper()
    ds.FrameOfReferenceUID = study["frame_uid"]
    ds.Modality = "CT"
    ds.Manufacturer = spec.manufacturer
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 120
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if spec.localizer else ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "FFS"
    ds.GantryDetectorTilt = float(spec.tilt_deg)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if spec.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.RescaleIntercept = 0 if spec.signed else -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    return ds


def _slice_frames(spec: SeriesSpec, anatomy: ChestAnatomy) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(IPP, row cosine, column cosine) of each slice, centred in-plane on the anatomy."""
    t = math.radians(spec.tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    # Gantry tilt rotates the image plane about the patient's left-right axis while the
    # table still steps along z: the stack is sheared, not rotated.
    col = np.array([0.0, math.cos(t), math.sin(t)])
    cx, cy, _ = anatomy.centre_lps_mm
    half_x = (spec.cols - 1) / 2.0 * spec.pixel_spacing_mm
    half_y = (spec.rows - 1) / 2.0 * spec.pixel_spacing_mm
    frames = []
    for z in spec.z_positions_mm:
        centre = np.array([cx, cy, z])
        ipp = centre - half_x * row - half_y * col
        frames.append((ipp, row, col))
    return frames


def _sample_slice(phantom: ChestPhantom, spec: SeriesSpec, ipp: np.ndarray, row: np.ndarray,
                  col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    i = np.arange(spec.cols, dtype=np.float64)[None, :] * spec.pixel_spacing_mm
    j = np.arange(spec.rows, dtype=np.float64)[:, None] * spec.pixel_spacing_mm
    x = ipp[0] + i * row[0] + j * col[0]
    y = ipp[1] + i * row[1] + j * col[1]
    z = ipp[2] + i * row[2] + j * col[2]
    hu, _ = phantom.sample(x, y, z, rng=rng)
    return np.rint(hu)


def write_series(folder: Path, phantom: ChestPhantom, spec: SeriesSpec, study: dict[str, Any],
                 series_number: int, rng: np.random.Generator, seed_key: str) -> dict[str, Any]:
    """Write one series' slices into ``folder`` under random names; return its ground-truth record."""
    series_uid = _uid(seed_key, "series", series_number)
    frames = _slice_frames(spec, phantom.anatomy)
    files = []
    for k, (ipp, row, col) in enumerate(frames):
        sop_uid = _uid(seed_key, "sop", series_number, k)
        ds = _base_dataset(sop_uid, study, series_uid, spec, series_number)
        # InstanceNumber deliberately runs against the slice order in some series:
        # readers must sort on position, not on this.
        ds.InstanceNumber = (len(frames) - k) if series_number % 2 == 0 else k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.SliceLocation = round(float(ipp[2]), 4)
        ds.SliceThickness = spec.slice_thickness_mm or (
            float(np.median(np.diff(spec.z_positions_mm))) if len(spec.z_positions_mm) > 1 else 1.0)
        hu = _sample_slice(phantom, spec, ipp, row, col, rng)
        if spec.signed:
            stored = np.clip(hu, -1024, 3071).astype(np.int16)
        else:
            stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        if spec.rle:
            _set_rle_pixels(ds, stored)
        name = folder / f"{rng.integers(0, 2**48):012x}"
        ds.save_as(name, enforce_file_format=True)
        files.append(name.name)
    return {"series_instance_uid": series_uid, "label": spec.label, "expected": spec.expected,
            "manufacturer": spec.manufacturer, "slices": len(frames), "rows": spec.rows,
            "cols": spec.cols, "pixel_spacing_mm": spec.pixel_spacing_mm,
            "tilt_deg": spec.tilt_deg, "rle": spec.rle, "files": sorted(files)}


def _packbits_row(row: np.ndarray) -> bytes:
    """One row as PackBits (DICOM PS3.5 Annex G): replicate runs of >= 3 bytes, literals otherwise."""
    n = row.size
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    if starts.size > n // 3:
        # Noise (the low byte of HU): runs are rare, so emit 128-byte literal packets directly.
        return b"".join(bytes([min(128, n - i) - 1]) + row[i:i + 128].tobytes() for i in range(0, n, 128))
    lengths = np.diff(np.r_[starts, n])
    out = bytearray()
    lit = bytearray()

    def flush() -> None:
        for i in range(0, len(lit), 128):
            chunk = lit[i:i + 128]
            out.append(len(chunk) - 1)
            out.extend(chunk)
        lit.clear()

    for start, length in zip(starts.tolist(), lengths.tolist()):
        value = int(row[start])
        if length < 3:
            lit.extend(bytes([value]) * length)
            continue
        flush()
        while length > 0:
            m = min(length, 128)
            # A leftover single byte is a one-byte literal; longer pieces replicate.
            out.extend((0, value) if m == 1 else ((1 - m) & 0xFF, value))
            length -= m
    flush()
    return bytes(out)


def _set_rle_pixels(ds: Dataset, stored: np.ndarray) -> None:
    """Encode one 16-bit frame as RLE Lossless and store it encapsulated.

    pydicom's own RLE encoder works byte by byte in Python (seconds per
    512x512 slice); finding runs with numpy keeps the demo fast.
    """
    from pydicom.encaps import encapsulate

    planes = stored.astype(stored.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(stored.shape + (2,))
    segments = []
    for plane in (planes[..., 1], planes[..., 0]):  # most significant byte first
        seg = b"".join(_packbits_row(np.ascontiguousarray(r)) for r in plane)
        segments.append(seg + (b"\x00" if len(seg) % 2 else b""))
    header = np.zeros(16, dtype="<u4")
    header[0] = len(segments)
    header[1] = 64
    header[2] = 64 + len(segments[0])
    ds.PixelData = encapsulate([header.tobytes() + b"".join(segments)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless


def study_identity(rng: np.random.Generator, seed_key: str, index: int) -> dict[str, Any]:
    # Fake, obviously synthetic identifiers: the index must never let these reach the lake.
    born = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 45)))
    when = STUDY_FIRST_DAY + dt.timedelta(days=int(rng.integers(0, 540)))
    return {"patient_name": f"SYNTH^PATIENT{index:04d}", "patient_id": f"SYN{int(rng.integers(10**7, 10**8))}",
            "birth_date": born.strftime("%Y%m%d"), "sex": "F" if rng.uniform() < 0.5 else "M",
            "study_uid": _uid(seed_key, "study"), "frame_uid": _uid(seed_key, "frame"),
            "study_date": when.strftime("%Y%m%d"), "accession": f"ACC{int(rng.integers(10**6, 10**7))}"}


def _axial_positions(z0: float, n: int, spacing_mm: float) -> list[float]:
    return [z0 + k * spacing_mm for k in range(n)]


def plan_study(rng: np.random.Generator, index: int, rows: int, slices: int,
               rle_series: bool, variable_spacing: bool, gantry_tilt: bool,
               slice_spacing_mm: float | None = None) -> tuple[ChestAnatomy, list[SeriesSpec]]:
    """The anatomy and series of one study (pure planning: no files).

    ``slice_spacing_mm`` fixes the axial series' slice spacing; None draws 2 or 2.5 mm.
    """
    manufacturer = MANUFACTURERS[index % len(MANUFACTURERS)]
    # The in-plane field of view is what a chest protocol would use; the matrix sets the spacing.
    fov_mm = float(rng.uniform(0.6, 0.9)) * 512
    ps = fov_mm / rows
    # Drawn even when fixed, so the rest of the study (nodules, identity) does not depend on it.
    spacing = float(rng.choice([2.0, 2.5]))
    if slice_spacing_mm is not None:
        spacing = float(slice_spacing_mm)
    extent = spacing * (slices - 1)
    z0 = -extent / 2.0
    anatomy = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0), fov_mm=(fov_mm, fov_mm, extent + spacing))
    specs = [SeriesSpec("axial_chest", rows=rows, cols=rows, pixel_spacing_mm=ps,
                        z_positions_mm=_axial_positions(z0, slices, spacing),
                        manufacturer=manufacturer, signed=index % 2 == 1),
             SeriesSpec("localizer", rows=rows, cols=rows, pixel_spacing_mm=ps, z_positions_mm=[0.0],
                        localizer=True, manufacturer=manufacturer, expected="localizer")]
    if rle_series:
        # A thick second reconstruction, RLE Lossless–compressed.
        n5 = max(int(extent // 5.0) + 1, 8)
        specs.append(SeriesSpec("thick_rle", rows=rows, cols=rows, pixel_spacing_mm=ps,
                                z_positions_mm=_axial_positions(-(n5 - 1) * 5.0 / 2, n5, 5.0), rle=True,
                                manufacturer=manufacturer))
    if variable_spacing:
        # Fine sampling through the middle third, coarse above and below.
        # Built on a half-step lattice so the only steps are spacing/2 and 2·spacing.
        fine = spacing / 2.0
        n_fine = int(round(extent / fine))
        lo, hi = n_fine // 3, 2 * n_fine // 3
        idx = sorted(set(range(0, lo, 4)) | set(range(lo - lo % 4, hi + 1)) | set(range(hi, n_fine + 1, 4)))
        zs = [z0 + k * fine for k in idx]
        specs.append(SeriesSpec("variable_spacing", rows=rows, cols=rows, pixel_spacing_mm=ps,
                                z_positions_mm=[float(z) for z in zs], manufacturer=manufacturer))
    if gantry_tilt:
        specs.append(SeriesSpec("gantry_tilt", rows=rows, cols=rows, pixel_spacing_mm=ps,
                                z_positions_mm=_axial_positions(z0 + spacing, slices - 2, spacing),
                                tilt_deg=15.0, manufacturer=manufacturer))
    return anatomy, specs


def emr_patients_for_ct(emr_dir: Path, studies: int, seed: int) -> list[dict[str, Any]]:
    """Patients of a synthetic EMR export (``medscreen synth emr``) to image, one per study.

    Chosen among adults (40 or older when the study window opens) registered before it and
    alive and under observation through it, so every study falls inside the patient's record.
    Each has ``patient_id`` (the EMR's MRN: FHIR ``Patient.identifier`` of type MR, OMOP
    ``person_source_value``), ``birth_date`` (YYYYMMDD), ``sex`` (F/M/O) and ``emr_patient``.
    """
    from synth.emr import read_truth

    rows = read_truth(emr_dir, "patients")
    first, last = STUDY_FIRST_DAY.isoformat(), STUDY_LAST_DAY.isoformat()
    candidates = [r for r in rows
                  if r["registration_date"] is not None and r["registration_date"] < first
                  and r["observation_end_date"] > last
                  and (r["death_date"] is None or r["death_date"] > last)
                  and (STUDY_FIRST_DAY - dt.date.fromisoformat(r["birth_date"])).days >= 40 * 365.25]
    if len(candidates) < studies:
        raise ValueError(f"{emr_dir} has {len(candidates)} adults under observation through "
                         f"{first}..{last}, fewer than the {studies} CT studies asked for; "
                         "generate more EMR patients or fewer studies")
    pick = np.random.default_rng([seed, 99]).choice(len(candidates), size=studies, replace=False)
    return [{"patient_id": candidates[i]["mrn"], "emr_patient": candidates[i]["patient"],
             "birth_date": candidates[i]["birth_date"].replace("-", ""),
             "sex": {"female": "F", "male": "M"}.get(candidates[i]["sex"], "O")}
            for i in pick.tolist()]


def generate(out_dir: Path, studies: int, seed: int, rows: int = 512, slices: int = 100,
             nodules_per_study: tuple[int, int] = (2, 5), variable_spacing: bool = False,
             gantry_tilt: bool = False, broken_files: bool = True,
             slice_spacing_mm: float | None = None, emr_dir: Path | None = None) -> dict[str, Any]:
    """Write ``studies`` synthetic CT studies under ``out_dir`` (one folder each) and ground_truth.json.

    ``rows`` is the (square) matrix size; ``slices`` the axial series' slice
    count at ``slice_spacing_mm`` (None: 2 or 2.5 mm, drawn per study).
    ``emr_dir``: a synthetic EMR export; each study then images one of its patients
    (DICOM PatientID = the patient's MRN, birth date and sex from the EMR), so EMR and CT
    link. Without it, PatientIDs are synthetic and link to nothing.
    Returns a summary (counts, paths) for the CLI.
    """
    out_dir = Path(out_dir)
    if studies < 0:
        raise ValueError(f"studies must be >= 0, got {studies}")
    if rows < 16 or slices < 4:
        raise ValueError(f"rows must be >= 16 and slices >= 4, got rows={rows}, slices={slices}")
    if slice_spacing_mm is not None and not 0 < slice_spacing_mm <= 10:
        raise ValueError(f"slice spacing must be in (0, 10] mm (CT protocols use 0.625–5), "
                         f"got {slice_spacing_mm}")
    linked = emr_patients_for_ct(Path(emr_dir), studies, seed) if emr_dir is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    truth: dict[str, Any] = {"seed": seed, "series": [], "broken_files": [], "studies": []}
    n_files = 0
    for s in range(studies):
        rng = np.random.default_rng([seed, s])
        seed_key = f"medscreen-synth-ct/{seed}/{s}"
        folder = out_dir / f"study_{s:03d}"
        folder.mkdir(exist_ok=True)
        anatomy, specs = plan_study(rng, s, rows, slices, rle_series=(s == 0),
                                    variable_spacing=variable_spacing, gantry_tilt=gantry_tilt,
                                    slice_spacing_mm=slice_spacing_mm)
        n_nod = int(rng.integers(nodules_per_study[0], nodules_per_study[1] + 1))
        nodules = random_nodules(rng, n_nod, anatomy, diameter_range_mm=(4.0, 24.0))
        phantom = ChestPhantom(anatomy, [Nodule.from_dict(n) for n in nodules])
        study = study_identity(rng, seed_key, s)
        if linked is not None:
            # Same draws as an unlinked study; only who is imaged changes.
            study.update({k: linked[s][k] for k in ("patient_id", "birth_date", "sex")})
        truth["studies"].append({"study": folder.name, "patient_id": study["patient_id"],
                                 "emr_patient": linked[s]["emr_patient"] if linked else None,
                                 "study_date": study["study_date"]})
        for number, spec in enumerate(specs, start=1):
            rec = write_series(folder, phantom, spec, study, number, rng, seed_key)
            rec["study"] = folder.name
            # Every series of the study images the same patient: the same nodules (a localizer has none).
            rec["nodules"] = [] if spec.localizer else [
                {"centre_lps_mm": n["centre_lps_mm"], "diameter_mm": n["diameter_mm"], "kind": n["kind"]}
                for n in nodules]
            truth["series"].append(rec)
            n_files += rec["slices"]
        if broken_files:
            truth["broken_files"] += _plant_broken(folder, truth["series"][-len(specs)], rng)
            n_files += 4
    (out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=2, sort_keys=True))
    return {"out_dir": str(out_dir), "studies": studies, "series": len(truth["series"]),
            "files": n_files, "broken_files": len(truth["broken_files"]),
            "nodules": sum(len(r["nodules"]) for r in truth["series"] if r["label"] == "axial_chest"),
            "linked_to_emr": sum(st["emr_patient"] is not None for st in truth["studies"]),
            "ground_truth": str(out_dir / "ground_truth.json")}


def _plant_broken(folder: Path, axial: dict[str, Any], rng: np.random.Generator) -> list[dict[str, str]]:
    """Four bad files beside a study: pixel-truncated copy, header-truncated copy, text, binary junk."""
    src = (folder / axial["files"][len(axial["files"]) // 2]).read_bytes()
    out = []
    # Cut inside the pixel data: the header still parses, so only a size check can catch it.
    name = f"{rng.integers(0, 2**48):012x}"
    (folder / name).write_bytes(src[: len(src) - len(src) // 3])
    out.append({"file": f"{folder.name}/{name}", "expected": "truncated"})
    name = f"{rng.integers(0, 2**48):012x}"
    (folder / name).write_bytes(src[:300])
    out.append({"file": f"{folder.name}/{name}", "expected": "incomplete_header"})
    (folder / "README.txt").write_text("exported by the PACS gateway; see the transfer log\n")
    out.append({"file": f"{folder.name}/README.txt", "expected": "not_dicom"})
    (folder / "Thumbs.db").write_bytes(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
    out.append({"file": f"{folder.name}/Thumbs.db", "expected": "not_dicom"})
    return out
