"""Real scanner files (pydicom's test data and the pydicom-data store) in an archive export with
synthetic series: each indexes, assembles and exports with its header geometry, or is
quarantined/rejected with the reason it deserves; the ledger accounts for every file; no
identifier of theirs reaches the lake.

Files are found with ``get_testdata_file(name, download=False)``: pydicom's own bundle, then the
``pydicom-data`` package (a dev extra, registered as a pydicom external data source); never the
network.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conf.settings import PseudonymSettings
from lake.archive import Archive
from lake.keys import executor_key_file, pseudonymise
from lake.paths import LakePaths
from preprocessing.dicom_series import load_volume
from preprocessing.nifti import write_nifti

from ct_index_cases import SESSION_KEY, index_settings

# pydicom warns about the quirks these files were chosen for (invalid UI values, VR switches).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[2]
J2K_LOSSLESS, JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70"
DEFLATED, BIG_ENDIAN, RLE = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5"

# Outcome per real file: "file:<reason>" (quarantined) or "series:<verdict>" (the series it lands in).
# Why each file is here (docs/ct_index.md has the same table); "was" is the outcome before the fix.
OUTCOMES: dict[str, tuple[str, ...]] = {
    # Single real CT slices (one is not a volume): GE explicit VR LE; JPEG 2000 lossless, oblique;
    # TCIA JPEG 2000 with geometry tags of VR UN; Siemens JPEG lossless with an implicit-VR sequence.
    "series:too_few_slices": ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm",
                              "bad_sequence.dcm"),
    # NEMA Enhanced CT, 2 frames, geometry in functional groups (was: missing_geometry, blaming absent tags).
    "series:multiframe": ("eCT_Supplemental.dcm",),
    # One Toshiba MR slice as explicit LE, big endian, and RLE with trailing padding after the pixel data
    # (was: truncated); deflated secondary capture; RT dose with NumberOfFrames "1A" (was: crashed the
    # job); JPEG pixel element written implicit VR under an explicit syntax (was: truncated); native
    # YBR_FULL_422, 2 bytes a pixel (was: truncated); Philips US (RLE); ALOKA US (big endian).
    "series:not_ct": ("MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "image_dfl.dcm",
                      "badVR.dcm", "SC_rgb_jpeg.dcm", "SC_ybr_full_422_uncompressed.dcm",
                      "OBXXXX1A_rle.dcm", "gdcm-US-ALOKA-16_big.dcm"),
    # Cut inside native pixel data; cut before the encapsulated pixel data's sequence delimiter.
    "file:truncated": ("MR_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"),
    # Implicit VR data set without preamble/file meta (was: not_dicom).
    "file:no_file_meta": ("rtstruct.dcm",),
}
REAL_FILES = {name: outcome for outcome, names in OUTCOMES.items() for name in names}
# Real single slices turned into four-slice series: the header and the pixel bytes are the scanner's,
# only SOP/Series UIDs, InstanceNumber and ImagePositionPatient (stepped along the normal) change.
STACKED = {"CT_small.dcm": 2.5, "693_J2KR.dcm": 5.0}
REAL_CT_SLICES = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm")


def _real(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not available locally; install the dev extra (pydicom-data)"
    return Path(path)


def _stack(src: Path, out: Path, step_mm: float, n: int = 4) -> list[Path]:
    ds = pydicom.dcmread(src)
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    series_uid = generate_uid(entropy_srcs=["real-stack", src.name])
    out.mkdir(parents=True)
    paths = []
    # Written in reverse order so the index must sort by position, not by file name.
    for k in reversed(range(n)):
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["real-stack", src.name, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + k * step_mm * normal]
        paths.append(out / f"IM{n - k:04d}")
        ds.save_as(paths[-1])
    return paths


def _table(path: Path):
    return pq.read_table(sorted(str(p) for p in Path(path).glob("*.parquet"))).to_pandas()


def _constraint_pins() -> set[str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {ln.split("==")[0].strip().lower() for ln in lines if "==" in ln and not ln.startswith("#")}


@pytest.fixture(scope="session")
def real_archive(spark, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One synthetic study plus the real files and stacks, indexed once."""
    from jobs import dicom_index
    from synth.ct import generate

    root = tmp_path_factory.mktemp("real_archive")
    generate(root / "synth", studies=1, seed=3, rows=32, slices=6)
    for name in REAL_FILES:
        dest = root / "real" / name.split("_")[0].split(".")[0] / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_real(name), dest)
    stacks = {name: _stack(_real(name), root / "stacks" / Path(name).stem, step)
              for name, step in STACKED.items()}
    lake = tmp_path_factory.mktemp("real_lake")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", SESSION_KEY)
        settings = index_settings(lake)
        summary = dicom_index.run(settings, root, spark=spark)
        archive = Archive(str(root.resolve()), executor_key_file(PseudonymSettings()))
    lp = LakePaths(lake)
    tables = {"instances": _table(lp.dicom_instances), "series": _table(lp.dicom_series),
              "quarantine": _table(lp.imaging_quarantine)}
    # The lake keeps keyed paths relative to the archive root (no file or folder name as written);
    # the outcomes below are checked per real file, so resolve them back through the archive.
    raw_names = {p.name for p in root.rglob("*")}
    for t in tables.values():
        column = "paths" if "paths" in t.columns else "path"
        for stored in t[column]:
            for keyed in ([stored] if column == "path" else list(stored)):
                assert not set(keyed.split("/")) & raw_names, keyed
        t[column] = t[column].map(lambda v: [str(f) for f in archive.resolve_all(list(v))]
                                  if column == "paths" else str(archive.resolve(v)))
    return {"root": root, "lake": lake, "summary": summary, "stacks": stacks, **tables}


def _copy_of(archive: dict[str, Any], name: str) -> str:
    return str(next(archive["root"].glob(f"real/*/{name}")))


def _series_of(archive: dict[str, Any], path: str):
    rows = archive["series"][archive["series"]["paths"].map(lambda ps: path in list(ps))]
    assert len(rows) == 1, f"{Path(path).name} is in {len(rows)} series"
    return rows.iloc[0]


def test_real_files_come_from_local_stores_only() -> None:
    import data_store  # the pydicom-data package

    for name in [*REAL_FILES, *STACKED]:
        assert Path(get_testdata_file(name, download=False)).is_file(), name
    assert _real("eCT_Supplemental.dcm").parent == Path(data_store.DataStore().data_path)


def test_every_real_file_has_its_exact_outcome(real_archive: dict[str, Any]) -> None:
    inst, quarantine = real_archive["instances"], real_archive["quarantine"]
    for name, outcome in REAL_FILES.items():
        path = _copy_of(real_archive, name)
        kind, want = outcome.split(":")
        q = quarantine[quarantine["path"] == path]
        if kind == "file":
            assert list(q["reason"]) == [want], f"{name}: {list(q['reason'])} {list(q['detail'])}"
            assert not (inst["path"] == path).any()
        else:
            assert q.empty, f"{name} quarantined: {list(q['reason'])} {list(q['detail'])}"
            assert (inst["path"] == path).sum() == 1
            row = _series_of(real_archive, path)
            assert row["verdict"] == want, f"{name}: {row['verdict']} ({row['detail']})"
            assert not row["eligible"]
    mr = _series_of(real_archive, _copy_of(real_archive, "MR_small.dcm"))
    assert mr["slice_count"] == 3  # little endian, big endian and RLE copies of one MR slice
    assert "functional groups" in _series_of(real_archive, _copy_of(real_archive, "eCT_Supplemental.dcm"))["detail"]
    by_path = inst.set_index("path")
    assert by_path.loc[_copy_of(real_archive, "image_dfl.dcm"), "transfer_syntax"] == DEFLATED
    assert by_path.loc[_copy_of(real_archive, "MR_small_RLE.dcm"), "transfer_syntax"] == RLE
    assert by_path.loc[_copy_of(real_archive, "bad_sequence.dcm"), "transfer_syntax"] == JPEG_LOSSLESS_SV1


def test_big_endian_and_compressed_headers_read_as_pydicom_reads_them(real_archive: dict[str, Any]) -> None:
    inst = real_archive["instances"].set_index("path")
    for name in ("MR_small_bigendian.dcm", "gdcm-US-ALOKA-16_big.dcm", "MR_small_RLE.dcm", "badVR.dcm"):
        row, ds = inst.loc[_copy_of(real_archive, name)], pydicom.dcmread(_real(name), stop_before_pixels=True)
        assert (row["rows"], row["cols"]) == (ds.Rows, ds.Columns), name
        assert row["manufacturer"] == ds.Manufacturer
        if "ImagePositionPatient" in ds:
            assert list(row["position_lps_mm"]) == pytest.approx([float(v) for v in ds.ImagePositionPatient])
            assert list(row["pixel_spacing_mm"]) == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert inst.loc[_copy_of(real_archive, "MR_small_bigendian.dcm"), "transfer_syntax"] == BIG_ENDIAN


def test_real_ct_slice_geometry_matches_pydicom(real_archive: dict[str, Any]) -> None:
    inst = real_archive["instances"].set_index("path")
    for name in REAL_CT_SLICES:
        ds = pydicom.dcmread(_real(name), stop_before_pixels=True)
        row = inst.loc[_copy_of(real_archive, name)]
        assert row["modality"] == "CT" and row["sop_class_uid"] == ds.SOPClassUID, name
        assert list(row["position_lps_mm"]) == pytest.approx([float(v) for v in ds.ImagePositionPatient]), name
        assert list(row["orientation"]) == pytest.approx([float(v) for v in ds.ImageOrientationPatient]), name
        assert list(row["pixel_spacing_mm"]) == pytest.approx([float(v) for v in ds.PixelSpacing]), name
        assert row["rescale_intercept"] == pytest.approx(float(ds.RescaleIntercept)), name
        thickness = ds.get("SliceThickness")  # present but empty in some files
        if thickness in (None, ""):
            assert np.isnan(row["slice_thickness_mm"]), name  # null in the lake (NaN through pandas)
        else:
            assert row["slice_thickness_mm"] == pytest.approx(float(thickness)), name
        series = _series_of(real_archive, _copy_of(real_archive, name))
        assert series["pixel_spacing_row_mm"] == pytest.approx(float(ds.PixelSpacing[0]))
        assert series["slice_count"] == 1


def test_stacked_real_ct_assembles_and_exports_with_header_geometry(real_archive: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    import nibabel as nib

    paths = real_archive["stacks"]["CT_small.dcm"]
    row = _series_of(real_archive, str(paths[0]))
    assert row["verdict"] == "eligible" and row["slice_count"] == 4, row["detail"]
    assert row["spacing_median_mm"] == pytest.approx(2.5, abs=1e-3) and row["regular_spacing"]
    # Ordered along the slice normal: written in reverse, so the last file is the lowest slice.
    assert list(row["paths"]) == [str(p) for p in reversed(paths)]
    vol = load_volume(list(row["paths"]))
    ds = pydicom.dcmread(row["paths"][0])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ps = [float(v) for v in ds.PixelSpacing]
    assert vol.shape == (4, ds.Rows, ds.Columns)
    assert vol.origin_lps_mm == pytest.approx([float(v) for v in ds.ImagePositionPatient], abs=1e-3)
    assert vol.spacing_mm == pytest.approx([2.5, ps[0], ps[1]], abs=1e-3)
    assert np.asarray(vol.direction)[:, 0] == pytest.approx(iop[:3])
    assert np.asarray(vol.direction)[:, 1] == pytest.approx(iop[3:])
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.asarray(vol.hu)[0] == pytest.approx(hu)
    # NIfTI: LPS affine with x and y negated, data (column, row, slice).
    img = nib.load(str(write_nifti(vol, tmp_path / "ct_small.nii.gz")))
    lps = np.column_stack([iop[:3] * ps[1], iop[3:] * ps[0], np.cross(iop[:3], iop[3:]) * 2.5,
                           [float(v) for v in ds.ImagePositionPatient]])
    assert img.affine[:3] == pytest.approx(np.diag([-1.0, -1.0, 1.0]) @ lps, abs=1e-3)
    assert img.shape == (ds.Columns, ds.Rows, 4)


def test_compressed_real_ct_decodes_exactly_as_the_pinned_plugins_allow(real_archive: dict[str, Any]) -> None:
    row = _series_of(real_archive, str(real_archive["stacks"]["693_J2KR.dcm"][0]))
    assert row["transfer_syntax"] == J2K_LOSSLESS and row["slice_count"] == 4
    # JPEG 2000 needs pylibjpeg's openjpeg plugin (or GDCM); constraints.txt pins pylibjpeg alone.
    if {"pylibjpeg-openjpeg", "python-gdcm"} & _constraint_pins():
        assert row["verdict"] == "eligible", row["detail"]
    else:
        assert row["verdict"] == "undecodable_pixels"
        assert "JPEG 2000" in row["detail"] and "openjpeg" in row["detail"]


def test_ledger_accounts_for_every_file_and_series(real_archive: dict[str, Any]) -> None:
    n_files = sum(len(fs) for _, _, fs in os.walk(real_archive["root"]))
    counts = real_archive["summary"]["counts"]
    ledger = json.loads(Path(real_archive["summary"]["ledger"]).read_text())
    assert ledger["balanced"] is True
    files = ledger["stages"]["dicom_index.files"]
    assert files["records_in"] == n_files == counts["files"]
    assert files["records_out"] == len(real_archive["instances"])
    assert files["quarantined_total"] == len(real_archive["quarantine"])
    # Exactly: the synthetic study's broken files (and ground_truth.json) plus the real ones.
    truth = json.loads((real_archive["root"] / "synth" / "ground_truth.json").read_text())
    want = {"not_dicom": 1}
    for reason in [b["expected"] for b in truth["broken_files"]] + [o[5:] for o in REAL_FILES.values()
                                                                    if o.startswith("file:")]:
        want[reason] = want.get(reason, 0) + 1
    assert files["quarantined"] == want
    series = ledger["stages"]["dicom_index.series"]
    assert series["records_in"] == len(real_archive["series"]) == series["records_out"] + series["quarantined_total"]
    assert series["quarantined"]["multiframe"] == 1


def test_no_real_identifiers_in_the_lake(real_archive: dict[str, Any]) -> None:
    secrets: set[str] = set()
    for name in [*REAL_FILES, *STACKED]:
        ds = pydicom.dcmread(_real(name), stop_before_pixels=True, force=True)
        for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "PatientName",
                   "AccessionNumber"):
            value = str(ds.get(kw, "") or "")
            # Short all-hex values (PatientID "0010") would match inside any hash; names are never that.
            if len(value) >= 6 or (len(value) >= 4 and any(c not in "0123456789abcdef" for c in value.lower())):
                secrets.add(value)
    for paths in real_archive["stacks"].values():
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        secrets |= {str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    cells = [str(v) for table in ("instances", "series", "quarantine")
             for col in real_archive[table].columns for v in real_archive[table][col].tolist()]
    text = "\n".join(cells) + "\n".join(p.read_text() for p in real_archive["lake"].rglob("*.json"))
    leaked = sorted(s for s in secrets if s in text)
    assert not leaked, f"raw identifiers in the lake: {leaked[:3]}"
    key = SESSION_KEY.encode()
    ct = pydicom.dcmread(_real("CT_small.dcm"), stop_before_pixels=True)
    assert pseudonymise(key, str(ct.SeriesInstanceUID)) in set(real_archive["series"]["series_key"])
