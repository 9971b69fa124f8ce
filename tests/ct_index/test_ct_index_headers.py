"""Header-only reading and per-series verdicts, on real files (no Spark)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from preprocessing.dicom_header import decode_problem, judge_series, read_instance_header

from ct_index_cases import write_case


def _headers(paths: list[Path]) -> list[dict[str, Any]]:
    return [read_instance_header(p) for p in paths]


def test_broken_files_quarantined_with_reasons(synth_dir: Path, truth: dict[str, Any]) -> None:
    assert truth["broken_files"], "the synthetic studies must plant broken files"
    for bad in truth["broken_files"]:
        h = read_instance_header(synth_dir / bad["file"])
        assert h.get("quarantine") == bad["expected"], (bad, h)
        assert h["detail"]
    # ground_truth.json itself sits in the input folder and is not DICOM either.
    assert read_instance_header(synth_dir / "ground_truth.json")["quarantine"] == "not_dicom"


def test_good_slice_header_has_geometry_but_no_pixels_read(synth_dir: Path, truth: dict[str, Any]) -> None:
    s = next(r for r in truth["series"] if r["label"] == "axial_chest")
    h = read_instance_header(synth_dir / s["study"] / s["files"][0])
    assert "quarantine" not in h
    assert h["series_uid"] == s["series_instance_uid"]
    assert len(h["position_lps_mm"]) == 3 and len(h["orientation"]) == 6
    assert h["rows"] == s["rows"] and h["modality"] == "CT"


def test_series_verdicts(synth_dir: Path, truth: dict[str, Any]) -> None:
    for s in truth["series"]:
        hs = _headers([synth_dir / s["study"] / f for f in s["files"]])
        v = judge_series(hs, min_slices=4, gantry_tilt="correct")
        assert v["verdict"] == s["expected"], (s["label"], v["verdict"], v["detail"])
        if s["label"] == "variable_spacing":
            assert not v["regular_spacing"] and v["spacing_max_mm"] > 1.5 * v["spacing_min_mm"]
        if s["label"] == "gantry_tilt":
            assert v["tilt_deg"] == pytest.approx(15.0, abs=0.05)
            assert judge_series(hs, min_slices=4, gantry_tilt="reject")["verdict"] == "gantry_tilt"
    axial = next(s for s in truth["series"] if s["label"] == "axial_chest")
    hs = _headers([synth_dir / axial["study"] / f for f in axial["files"]])
    assert judge_series(hs, min_slices=50, gantry_tilt="correct")["verdict"] == "too_few_slices"


def test_missing_slice_not_ct_and_orientation_verdicts(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "s", seed=21, rows=24)
    hs = sorted(_headers(rec["paths"]), key=lambda h: h["position_lps_mm"][2])
    v = judge_series(hs, min_slices=4, gantry_tilt="correct")
    assert v["verdict"] == "eligible"
    # Paths come out ordered along the slice normal (foot to head here).
    assert v["paths"] == [h["path"] for h in hs]
    # One slice missing from a 2.5 mm run leaves a 5 mm gap: within tolerance, interpolated.
    one = judge_series(hs[:7] + hs[8:], 4, "correct")
    assert one["verdict"] == "eligible" and one["spacing_max_mm"] == pytest.approx(5.0, abs=1e-3)
    # Two adjacent slices missing leave 7.5 mm: beyond it, quarantined with the gap in the detail.
    two = judge_series(hs[:7] + hs[9:], 4, "correct")
    assert two["verdict"] == "missing_slices" and "7.5 mm" in two["detail"], two["detail"]
    assert judge_series([dict(h, modality="MR") for h in hs], 4, "correct")["verdict"] == "not_ct"
    twisted = [dict(h) for h in hs]
    twisted[5]["orientation"] = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert judge_series(twisted, 4, "correct")["verdict"] == "inconsistent_orientation"
    resized = [dict(h) for h in hs]
    resized[2]["rows"] = 32
    assert judge_series(resized, 4, "correct")["verdict"] == "inconsistent_size"


def test_undecodable_pixels_found_by_decoding_one_frame(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "rle", seed=22, rows=24, rle=True)
    for p in rec["paths"]:
        raw = bytearray(p.read_bytes())
        # Corrupt the RLE header's segment count inside the first fragment; lengths stay valid,
        # so the header-only check passes and only decoding can tell.
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        at = bytes(raw).rfind(b"\xfe\xff\x00\xe0") + 8  # the last item: the frame's fragment
        raw[at:at + 4] = (99).to_bytes(4, "little")
        p.write_bytes(bytes(raw))
    hs = _headers(rec["paths"])
    assert all("quarantine" not in h for h in hs)
    assert decode_problem(str(rec["paths"][0])) is not None
    assert judge_series(hs, 4, "correct")["verdict"] == "undecodable_pixels"


def test_deflated_file_is_not_mistaken_for_truncated(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "d", seed=23, rows=16, z_positions_mm=[0.0, 2.5, 5.0, 7.5])
    ds = pydicom.dcmread(rec["paths"][0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    target = tmp_path / "deflated.dcm"
    ds.save_as(target, enforce_file_format=True)
    h = read_instance_header(target)
    assert "quarantine" not in h, h
    assert decode_problem(str(target)) is None
