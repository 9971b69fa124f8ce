"""The chest phantom and the synthetic study writer: anatomy in HU, nodules where promised, determinism."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from synth.ct_phantom import ChestAnatomy, default_origin_lps_mm, make_phantom, random_nodules


def test_phantom_tissues_and_planted_nodules() -> None:
    shape, spacing = (24, 96, 96), (4.0, 3.0, 3.0)
    origin = default_origin_lps_mm(shape, spacing)
    anatomy = ChestAnatomy.for_grid(shape, spacing, origin)
    rng = np.random.default_rng(3)
    nodules = random_nodules(rng, 3, anatomy, diameter_range_mm=(8.0, 20.0), part_solid_share=1.0)
    hu, mask = make_phantom(shape, spacing, nodules, np.random.default_rng(4), origin_lps_mm=origin)
    assert hu.dtype == np.int16 and mask.dtype == np.uint8 and hu.shape == mask.shape == shape
    assert hu[:, 0, 0].mean() == pytest.approx(-1000, abs=20)       # air
    assert hu.max() >= 600                                           # spine / ribs
    lung = anatomy.in_lung(*np.meshgrid(origin[0] + np.arange(96) * 3.0, origin[1] + np.arange(96) * 3.0,
                                        indexing="xy"), np.float64(origin[2] + 12 * 4.0))
    lung_hu = hu[12][lung & (mask[12] == 0)]
    assert -900 < float(np.median(lung_hu)) < -800
    for n in nodules:
        k, j, i = np.round((np.asarray(n["centre_lps_mm"]) - origin)[::-1] / spacing).astype(int)
        assert mask[k, j, i] == 1
        assert -200 < hu[k, j, i] < 200                               # solid core, even when part-solid
        assert n["kind"] == ("part_solid" if n["diameter_mm"] >= 6 else "solid")
    # Nodules sit wholly in lung: no nodule voxel outside the lung mask of its slice.
    z = origin[2] + np.arange(shape[0])[:, None, None] * spacing[0]
    y = origin[1] + np.arange(shape[1])[None, :, None] * spacing[1]
    x = origin[0] + np.arange(shape[2])[None, None, :] * spacing[2]
    assert not (mask.astype(bool) & ~anatomy.in_lung(x, y, z)).any()


def test_random_nodules_refuses_an_impossible_request() -> None:
    anatomy = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0), fov_mm=(60.0, 60.0, 20.0))
    with pytest.raises(ValueError, match="field of view"):
        random_nodules(np.random.default_rng(0), 4, anatomy, diameter_range_mm=(25.0, 30.0), max_tries=200)


def test_same_seed_same_files(tmp_path: Path) -> None:
    from synth.ct import generate

    def digest(d: Path) -> dict[str, str]:
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    a = generate(tmp_path / "a", studies=1, seed=5, rows=24, slices=6)
    b = generate(tmp_path / "b", studies=1, seed=5, rows=24, slices=6)
    assert a["files"] == b["files"] and digest(tmp_path / "a") == digest(tmp_path / "b")
    generate(tmp_path / "c", studies=1, seed=6, rows=24, slices=6)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
