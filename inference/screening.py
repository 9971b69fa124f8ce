"""The screening list: patients flagged for follow-up from a committed scores partition.

Per head, a patient is flagged when the score reaches
``scoring.screening_thresholds[head]``, or, when ``scoring.screening_top_k``
is set, when the score is among the head's top k (ties broken by
patient_key so the list is deterministic). One row per (patient, head) with
the score and full provenance. Written atomically to LAKE/screening/as_of=D/.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conf.settings import Settings
from lake.commit import atomic_partition, read_manifest, read_partition
from lake.ledger import StageLedger
from lake.paths import LakePaths, as_of_str
from lake.schemas import HEADS

MODEL = "emr_risk"

SCREENING = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("head", pa.string()),            # t2d | ckd | hf
    ("score", pa.float32()),
    ("rank", pa.int32()),             # 1 = highest score within the head
    ("criterion", pa.string()),       # "threshold>=0.5" or "top_k=100"
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
])


def select(scores: pa.Table, thresholds: dict[str, float], top_k: int | None) -> pa.Table:
    """Flagged (patient, head) rows of a scores table, schema :data:`SCREENING`, sorted by head then rank."""
    unknown = set(thresholds) - set(HEADS)
    if unknown:
        raise ValueError(f"scoring.screening_thresholds names unknown heads {sorted(unknown)}; "
                         f"heads are {list(HEADS)}")
    scores = scores.combine_chunks()  # one chunk per column: gathers below are plain array takes
    # Patients in key order once (Arrow sorts strings in C++); a stable sort by score over that
    # order breaks ties by patient_key without comparing strings again for every head.
    by_key = pc.sort_indices(scores.column("patient_key")).to_numpy()
    parts = []
    for head in HEADS:
        if top_k is None and head not in thresholds:
            continue
        s = scores.column(f"score_{head}").to_numpy().astype(np.float32)
        # Highest score first; NaN never qualifies; ties by patient_key.
        finite = np.isfinite(s)
        order = by_key[np.argsort(-np.where(finite, s, -np.inf)[by_key], kind="stable")]
        order = order[finite[order]]
        if top_k is not None:
            chosen = order[:top_k]
            criterion = f"top_k={top_k}"
        else:
            chosen = order[s[order] >= thresholds[head]]
            criterion = f"threshold>={thresholds[head]:g}"
        if not len(chosen):
            continue
        take = pa.array(chosen)
        n = len(chosen)
        parts.append(pa.table({
            "patient_key": scores.column("patient_key").take(take),
            "as_of": scores.column("as_of").take(take),
            "head": pa.repeat(pa.scalar(head, pa.string()), n),
            "score": pa.array(s[chosen], pa.float32()),
            "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "criterion": pa.repeat(pa.scalar(criterion, pa.string()), n),
            **{c: scores.column(c).take(take) for c in
               ("model", "model_version", "engine_fingerprint", "precision", "run_id")},
        }, schema=SCREENING))
    return pa.concat_tables(parts) if parts else SCREENING.empty_table()


def build(settings: Settings, as_of: str, run_id: str | None = None) -> tuple[Path, StageLedger]:
    """Write LAKE/screening/as_of=D/ from the committed emr_risk scores; return it and its ledger.

    Ledger unit is patients: in = scored patients, out = patients flagged on
    any head, the rest ignored by rule ``below_threshold`` / ``outside_top_k``.
    """
    as_of = as_of_str(as_of)
    lake = LakePaths(settings.lake.root)
    scores_dir = lake.scores(MODEL, as_of)
    scores_manifest = read_manifest(scores_dir)
    scores = read_partition(scores_dir)
    cfg = settings.scoring
    flagged = select(scores, cfg.screening_thresholds, cfg.screening_top_k)
    n_flagged = len(pc.unique(flagged.column("patient_key"))) if flagged.num_rows else 0
    rule = "outside_top_k" if cfg.screening_top_k is not None else "below_threshold"
    ledger = StageLedger("screening", records_in=scores.num_rows, records_out=n_flagged,
                         ignored={rule: scores.num_rows - n_flagged}, unit="patients")
    ledger.check()
    manifest: dict[str, Any] = {
        "as_of": as_of, "run_id": run_id or scores_manifest.get("run_id"), "model": MODEL,
        "scores_run_id": scores_manifest.get("run_id"),
        # From a --limit smoke run: a list of the first N timelines only, never the outreach list.
        "limit": scores_manifest.get("limit"),
        "criterion": {"top_k": cfg.screening_top_k} if cfg.screening_top_k is not None
        else {"thresholds": dict(cfg.screening_thresholds)},
        "rows": flagged.num_rows, "patients": n_flagged,
        "per_head": {h: int(pc.sum(pc.equal(flagged.column("head"), h)).as_py() or 0) for h in HEADS},
    }
    final = lake.screening(as_of)
    with atomic_partition(final, manifest) as staging:
        pq.write_table(flagged, staging / "part-00000.parquet", compression="zstd")
    return final, ledger
