"""The score QC gate: catch a broken engine before its scores reach a screening list.

Checks per head (t2d, ckd, hf): non-finite values, all-zero or constant
output, a collapsed distribution (std below ``scoring.qc.min_std``), and drift
against the previous as-of's committed scores (population stability index
above ``scoring.qc.max_psi``). The verdict is a plain dict that goes into
metrics.json, the run manifest and the report; :class:`QCFailed` carries it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.settings import CTQCSettings, QCSettings
from lake.commit import is_committed
from lake.paths import latest_as_of
from lake.schemas import HEADS

SCORE_COLUMNS = tuple(f"score_{h}" for h in HEADS)
PSI_BINS = 10
# The reference's quantiles (the PSI bins) come from a deterministic stride sample of at most this
# many values: a sort of every reference score buys nothing. The current scores are counted in full.
PSI_MAX_ROWS = 2_000_000


class QCFailed(RuntimeError):
    """The scores failed the QC gate; ``verdict`` says which check, which head, and by how much."""

    def __init__(self, message: str, verdict: dict[str, Any]):
        super().__init__(message)
        self.verdict = verdict


def read_scores(paths: Iterable[Path]) -> dict[str, np.ndarray]:
    """The score columns of the given Parquet files, concatenated in the given order."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in SCORE_COLUMNS}
    for p in paths:
        t = pq.read_table(p, columns=list(SCORE_COLUMNS))
        for c in SCORE_COLUMNS:
            parts[c].append(t.column(c).to_numpy().astype(np.float32, copy=False))
    return {c: (np.concatenate(v) if v else np.zeros(0, np.float32)) for c, v in parts.items()}


def previous_partition(model_dir: Path, as_of: str) -> Path | None:
    """The latest committed ``as_of=`` partition strictly before ``as_of`` (the PSI reference)."""
    return latest_as_of(model_dir, before=as_of, keep=is_committed)


def psi_reference(reference: np.ndarray, bins: int = PSI_BINS) -> dict[str, list] | None:
    """The drift reference of one head: reference-quantile bin edges and the reference's counts in them.

    The quantiles come from a deterministic stride sample of at most
    ``PSI_MAX_ROWS`` finite values; None when the reference has no finite value.
    """
    ref = _finite(reference)
    if len(ref) > PSI_MAX_ROWS:
        ref = ref[:: int(np.ceil(len(ref) / PSI_MAX_ROWS))]
    if len(ref) == 0:
        return None
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    return {"edges": edges.tolist(), "counts": bin_counts(edges, ref).tolist()}


def bin_counts(edges: Any, values: np.ndarray) -> np.ndarray:
    """Counts of the finite ``values`` in the bins that ``edges`` (sorted) cut."""
    edges = np.asarray(edges, dtype=np.float64)
    return np.bincount(np.searchsorted(edges, _finite(values), side="right"), minlength=len(edges) + 1)


def psi_from_counts(reference_counts: Any, current_counts: Any) -> float:
    """Population stability index from the counts of reference and current in the same bins."""
    ref = np.asarray(reference_counts, dtype=np.float64)
    cur = np.asarray(current_counts, dtype=np.float64)
    if ref.sum() == 0 or cur.sum() == 0:
        return float("nan")
    # A small floor keeps empty bins finite; 1e-4 is the customary choice.
    ref_p = np.maximum(ref / ref.sum(), 1e-4)
    cur_p = np.maximum(cur / cur.sum(), 1e-4)
    return float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` (every finite value) against ``reference``
    over reference-quantile bins (:func:`psi_reference`)."""
    ref = psi_reference(reference, bins)
    if ref is None:
        return float("nan")
    return psi_from_counts(ref["counts"], bin_counts(ref["edges"], current))


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a)]


def evaluate(scores: dict[str, np.ndarray], settings: QCSettings,
             reference: dict[str, np.ndarray] | None = None, reference_name: str | None = None
             ) -> dict[str, Any]:
    """Every check on scores held in memory; ``{passed, reasons, checks, reference}`` (never raises).

    Scoring runs judge merged per-fragment summaries instead
    (inference.score_stats.qc_verdict); this full read is their reference.
    """
    heads = {}
    for head in HEADS:
        s = np.asarray(scores[f"score_{head}"], dtype=np.float64)
        fin = s[np.isfinite(s)]
        heads[head] = {"n": len(s), "finite": len(fin),
                       "abs_max": float(np.abs(fin).max()) if len(fin) else None,
                       "min": float(fin.min()) if len(fin) else None,
                       "max": float(fin.max()) if len(fin) else None,
                       "std": float(fin.std()) if len(fin) else float("nan"),
                       "psi": psi(reference[f"score_{head}"], s) if reference is not None else None}
    return verdict_of(heads, settings, reference is not None, reference_name)


def verdict_of(heads: dict[str, dict[str, Any]], settings: QCSettings, psi_checked: bool,
               reference_name: str | None) -> dict[str, Any]:
    """The checks and verdict from per-head facts: n, finite, abs_max, min, max, std (finite values)
    and psi (against the reference; only read when ``psi_checked``)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, head: str, value: float | None, threshold: float | None, ok: bool,
              reason: str) -> None:
        checks.append({"check": name, "head": head, "value": value, "threshold": threshold,
                       "passed": bool(ok), "reason": None if ok else reason})

    for head in HEADS:
        f = heads[head]
        n, finite = int(f["n"]), int(f["finite"])
        bad = n - finite
        check("non_finite", head, bad, 0, bad == 0,
              f"{bad} of {n} {head} scores are NaN or infinite")
        if n == 0:
            continue
        all_zero = bool(finite and f["abs_max"] == 0)
        check("all_zero", head, f["abs_max"] if finite else None, 0.0, not all_zero,
              f"every {head} score is exactly 0")
        constant = bool(n > 1 and finite and f["min"] == f["max"])
        # value = range of the scores: 0 means one value for everybody
        check("constant", head, f["max"] - f["min"] if finite else None, 0.0,
              not constant or all_zero,
              f"every {head} score is the same value {f['min'] if finite else float('nan'):.6g}")
        std = f["std"]
        collapsed = n > 1 and not (std >= settings.min_std)
        check("collapsed", head, std, settings.min_std, not collapsed,
              f"{head} score std {std:.3g} is below scoring.qc.min_std {settings.min_std:g} "
              "(the distribution has collapsed)")
        if psi_checked:
            value = f["psi"]
            ok = not (value > settings.max_psi)
            check("psi", head, value, settings.max_psi, ok,
                  f"{head} PSI {value:.3f} against {reference_name} exceeds scoring.qc.max_psi "
                  f"{settings.max_psi:g} (the score distribution moved)")
    reasons = [c["reason"] for c in checks if not c["passed"]]
    return {"passed": not reasons, "reasons": reasons, "checks": checks,
            "reference": reference_name, "psi_checked": psi_checked}


def raise_if_failed(verdict: dict[str, Any], what: str) -> None:
    """Raise :class:`QCFailed` with a readable message when ``verdict`` did not pass."""
    if not verdict["passed"]:
        raise QCFailed(f"QC gate failed for {what}: " + "; ".join(verdict["reasons"]), verdict)


FINDING_VALUE_COLUMNS = ("centre_x_mm", "centre_y_mm", "centre_z_mm", "diameter_mm", "volume_mm3",
                         "max_prob", "mean_prob")


def evaluate_ct(findings: pa.Table, series_scored: int, series_failed: int, cfg: CTQCSettings) -> dict[str, Any]:
    """QC verdict of a CT scoring run: failed-series share, findings per series, finite values in range."""
    reasons: list[str] = []
    total = series_scored + series_failed
    failed_share = series_failed / total if total else 0.0
    if failed_share > cfg.max_failed_share:
        reasons.append(f"{series_failed} of {total} series could not be scored "
                       f"({failed_share:.0%} > {cfg.max_failed_share:.0%})")
    per_series = findings.num_rows / series_scored if series_scored else 0.0
    if per_series > cfg.max_findings_per_series:
        reasons.append(f"{per_series:.1f} findings per scored series > {cfg.max_findings_per_series:g}: "
                       "the engine marks far too much as nodule")
    for col in FINDING_VALUE_COLUMNS:
        values = np.asarray(findings.column(col).to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            reasons.append(f"{bad} findings with a non-finite {col}")
    probs = np.asarray(findings.column("max_prob").to_numpy(zero_copy_only=False), dtype=np.float64)
    out_of_range = int(((probs < 0) | (probs > 1)).sum())
    if out_of_range:
        reasons.append(f"{out_of_range} findings with max_prob outside [0, 1]")
    return {"passed": not reasons, "reasons": reasons,
            "checks": {"failed_share": round(failed_share, 4), "findings_per_series": round(per_series, 3),
                       "max_failed_share": cfg.max_failed_share,
                       "max_findings_per_series": cfg.max_findings_per_series}}
