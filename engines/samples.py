"""The data engines are calibrated and gated on: real timelines from the lake as model feeds (stratified
samples for int8 calibration and the accuracy gate), and planted spheres for segmentation models.

Calibration and gate samples come from disjoint halves of the patients (split
on the pseudonymised key), so the gate judges an int8 plan on rows it was not
calibrated on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.settings import Settings
from engines.model_card import load_card
from lake.commit import is_committed, partition_files
from lake.paths import LakePaths, as_of_of, as_of_str
from lake.schemas import LABEL_COLUMNS

SEX_CODES = {"F": 1, "M": 2}  # anything else (U, null) → 0 unknown, as the model contract says
FEED_COLUMNS = ["patient_key", "length", "tokens", "days_before", "age_years", "sex"]
AGE_EDGES_YEARS = (40.0, 60.0, 75.0)


class SampleError(ValueError):
    """The lake holds no usable timelines for a calibration or gate sample."""


def timelines_path(lake_root: Path, as_of: str) -> Path:
    return LakePaths(lake_root).timelines(as_of)


def latest_as_of(lake_root: Path, with_labels: bool = False) -> str | None:
    """Newest committed timelines partition (optionally one with label columns), or None."""
    base = LakePaths(lake_root).root / "emr" / "timelines"
    if not base.is_dir():
        return None
    dates = sorted((as_of_of(p) for p in base.glob("as_of=*") if is_committed(p)), reverse=True)
    for d in dates:
        if not with_labels or has_labels(lake_root, d):
            return d
    return None


def _parquet_files(part: Path) -> list[Path]:
    # One version of the partition, resolved once (lake.commit): a commit meanwhile cannot mix them.
    return partition_files(part)


def has_labels(lake_root: Path, as_of: str) -> bool:
    files = _parquet_files(timelines_path(lake_root, as_of))
    return bool(files) and all(c in pq.read_schema(files[0]).names for c in LABEL_COLUMNS)


def read_timelines(lake_root: Path, as_of: str, labels: bool = False) -> pa.Table:
    """The committed timelines partition for ``as_of`` (feed columns, plus labels when asked)."""
    as_of = as_of_str(as_of)
    part = timelines_path(lake_root, as_of)
    if not is_committed(part):
        raise SampleError(f"no committed timelines for as-of {as_of} under lake {lake_root}; "
                          f"run `medscreen emr features --as-of {as_of}"
                          f"{' --with-labels' if labels else ''}` first")
    files = _parquet_files(part)
    if not files:
        raise SampleError(f"timelines partition for as-of {as_of} holds no Parquet files")
    cols = FEED_COLUMNS + (list(LABEL_COLUMNS) if labels else [])
    schema = pq.read_schema(files[0])
    missing = [c for c in cols if c not in schema.names]
    if missing:
        hint = (f"; rebuild with `medscreen emr features --as-of {as_of} --with-labels`"
                if any(c in LABEL_COLUMNS for c in missing) else "")
        raise SampleError(f"timelines for as-of {as_of} lack columns {missing}{hint}")
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files])


def check_vocabulary(lake_root: Path, as_of: str, card: dict) -> None:
    """Refuse timelines built with another vocabulary than the model card's (when both record one)."""
    from lake.commit import read_manifest

    built = (read_manifest(timelines_path(lake_root, as_of)).get("vocabulary") or {}).get("sha256")
    wanted = (card.get("vocab") or {}).get("sha256")
    if built and wanted and built != wanted:
        raise SampleError(f"timelines for as-of {as_of} were built with vocabulary {built[:12]}…, "
                          f"model {card.get('name')!r} was trained on {wanted[:12]}…; rebuild the "
                          "features with this medscreen version or retrain the model")


def _key_half(keys: list[str]) -> np.ndarray:
    """0 or 1 per patient from a hash of its (already pseudonymised) key: a stable split."""
    return np.array([hashlib.sha256(k.encode()).digest()[0] & 1 for k in keys], dtype=np.int8)


def stratified_sample(table: pa.Table, n: int, seed: int = 0, half: int | None = None) -> pa.Table:
    """Up to ``n`` rows, allocated proportionally over strata of length quartile × age band × sex.

    Every non-empty stratum gets at least one row when ``n`` allows, so short
    and long timelines, young and old, F/M/U are all represented. ``half``
    (0 or 1) restricts to one half of the key split first.
    """
    if half is not None:
        mask = _key_half(table.column("patient_key").to_pylist()) == half
        table = table.filter(pa.array(mask))
    rows = table.num_rows
    if rows == 0:
        raise SampleError("no timelines to sample from")
    if rows <= n:
        return table
    length = np.asarray(table.column("length").to_numpy(zero_copy_only=False), dtype=np.int64)
    len_edges = np.unique(np.quantile(length, [0.25, 0.5, 0.75]))
    age = np.nan_to_num(np.asarray(table.column("age_years").to_numpy(zero_copy_only=False),
                                   dtype=np.float64), nan=-1.0)
    sex = np.array([SEX_CODES.get(s, 0) for s in table.column("sex").to_pylist()])
    stratum = (np.searchsorted(len_edges, length, side="right") * 100
               + np.searchsorted(AGE_EDGES_YEARS, age, side="right") * 10 + sex)
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(stratum, return_counts=True)
    share = counts / rows * n
    alloc = np.minimum(counts, np.maximum(1, np.floor(share))).astype(int)
    # Trim the largest allocations if the minimum-one rule overshot n ...
    while alloc.sum() > n:
        alloc[np.argmax(alloc)] -= 1
    # ... and hand flooring's remainder to the strata with the largest unmet share.
    while alloc.sum() < n:
        room = np.where(alloc < counts, share - alloc, -np.inf)
        alloc[np.argmax(room)] += 1
    chosen = []
    for sid, k in zip(ids, alloc):
        members = np.flatnonzero(stratum == sid)
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    idx = np.sort(np.concatenate(chosen))
    return table.take(pa.array(idx))


def _recent_positions(days: np.ndarray, max_tokens: int) -> np.ndarray:
    """Positions of the ``max_tokens`` most recent events, in their original order."""
    if len(days) <= max_tokens:
        return np.arange(len(days))
    return np.sort(np.argsort(days, kind="stable")[:max_tokens])


def to_feed(table: pa.Table, max_tokens: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Pad ``table``'s timelines into one feed of the model contract (0 = padding token).

    Timelines longer than ``max_tokens`` keep their most recent events. The
    sequence dimension is the longest timeline (at least 1), or ``pad_to``.
    """
    tokens = table.column("tokens").to_pylist()
    days = table.column("days_before").to_pylist()
    n = len(tokens)
    lengths = [min(len(t or []), max_tokens) for t in tokens]
    seq = max(1, max(lengths, default=1) if pad_to is None else pad_to)
    tok = np.zeros((n, seq), dtype=np.int64)
    dbf = np.zeros((n, seq), dtype=np.float32)
    for i, (t, d) in enumerate(zip(tokens, days)):
        if not t:
            continue
        t, d = np.asarray(t, dtype=np.int64), np.asarray(d, dtype=np.float32)
        keep = _recent_positions(d, max_tokens)
        tok[i, :len(keep)] = t[keep]
        dbf[i, :len(keep)] = d[keep]
    age = np.nan_to_num(np.asarray(table.column("age_years").to_numpy(zero_copy_only=False),
                                   dtype=np.float32), nan=0.0)
    sex = np.array([SEX_CODES.get(s, 0) for s in table.column("sex").to_pylist()], dtype=np.int64)
    return {"tokens": tok, "days_before": dbf, "age_years": age, "sex": sex}


def feed_batches(table: pa.Table, max_tokens: int, batch_rows: int = 256
                 ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Length-sorted batches (as scoring forms them): ``[(row_indices, feed), ...]``."""
    length = np.asarray(table.column("length").to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(length, kind="stable")
    out = []
    for start in range(0, len(order), batch_rows):
        idx = order[start:start + batch_rows]
        out.append((idx, to_feed(table.take(pa.array(idx)), max_tokens)))
    return out


def labels(table: pa.Table) -> np.ndarray:
    """[rows, 3] int8 labels in head order t2d, ckd, hf; nulls become -1 (excluded from metrics)."""
    cols = []
    for c in LABEL_COLUMNS:
        arr = table.column(c).to_numpy(zero_copy_only=False)
        cols.append(np.where(np.isnan(arr.astype(np.float64)), -1, arr).astype(np.int8))
    return np.stack(cols, axis=1)


def holdout_sample(settings: Settings, as_of: str | None, rows: int, seed: int = 0,
                   model: str = "emr_risk") -> tuple[str, pa.Table]:
    """The gate's labelled sample: half 1 of the key split (calibration uses half 0), stratified."""
    as_of = as_of or latest_as_of(settings.lake.root, with_labels=True)
    if as_of is None:
        raise SampleError(
            f"the accuracy gate needs labelled timelines in lake {settings.lake.root}; run "
            "`medscreen emr features --as-of D --with-labels` and pass --as-of D")
    table = read_timelines(settings.lake.root, as_of, labels=True)
    check_vocabulary(settings.lake.root, as_of, load_card(settings, model))
    return as_of, stratified_sample(table, rows, seed=seed, half=1)


def planted_spheres(shape_zyx: tuple[int, int, int], count: int, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Windowed [0, 1] patches of lung-like background with planted soft-tissue spheres, and their masks.

    Engines do not read DICOM (that is preprocessing's floor), so the segmentation
    gate judges candidate vs reference on these known-geometry inputs: lung
    parenchyma at about -850 HU, nodules at about 0 HU, window -1000..400 HU.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    images = np.empty((count, 1, *shape_zyx), np.float32)
    masks = np.zeros((count, 1, *shape_zyx), bool)
    for i in range(count):
        img = rng.normal(0.107, 0.02, shape_zyx).astype(np.float32)
        for _ in range(int(rng.integers(1, 4))):
            r = float(rng.uniform(3, 10))
            c = [float(rng.uniform(r + 2, s - r - 2)) for s in shape_zyx]
            sphere = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
            img[sphere] = rng.normal(0.714, 0.03, int(sphere.sum()))
            masks[i, 0] |= sphere
        images[i, 0] = np.clip(img, 0.0, 1.0)
    return images, masks


