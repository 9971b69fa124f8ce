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
# PSI is a distribution statistic: a deterministic stride sample of this size is plenty.
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


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``reference`` over reference-quantile bins."""
    reference = _finite(reference)
    current = _finite(current)
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_frac = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    cur_frac = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    # A small floor keeps empty bins finite; 1e-4 is the customary choice.
    ref_p = np.maximum(ref_frac / ref_frac.sum(), 1e-4)
    cur_p = np.maximum(cur_frac / cur_frac.sum(), 1e-4)
    return float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) > PSI_MAX_ROWS:
        a = a[:: int(np.ceil(len(a) / PSI_MAX_ROWS))]
    return a


def evaluate(scores: dict[str, np.ndarray], settings: QCSettings,
             reference: dict[str, np.ndarray] | None = None, reference_name: str | None = None
             ) -> dict[str, Any]:
    """Run every check; return ``{passed, reasons, checks, reference}`` (never raises)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, head: str, value: float | None, threshold: float | None, ok: bool,
              reason: str) -> None:
        checks.append({"check": name, "head": head, "value": value, "threshold": threshold,
                       "passed": bool(ok), "reason": None if ok else reason})

    for head in HEADS:
        s = np.asarray(scores[f"score_{head}"], dtype=np.float64)
        n = len(s)
        bad = int(n - np.isfinite(s).sum())
        check("non_finite", head, bad, 0, bad == 0,
              f"{bad} of {n} {head} scores are NaN or infinite")
        fin = s[np.isfinite(s)]
        if n == 0:
            continue
        all_zero = bool(len(fin) and np.all(fin == 0))
        check("all_zero", head, float(np.abs(fin).max()) if len(fin) else None, 0.0, not all_zero,
              f"every {head} score is exactly 0")
        constant = bool(n > 1 and len(fin) and fin.min() == fin.max())
        # value = range of the scores: 0 means one value for everybody
        check("constant", head, float(fin.max() - fin.min()) if len(fin) else None, 0.0,
              not constant or all_zero,
              f"every {head} score is the same value {fin.min() if len(fin) else float('nan'):.6g}")
        std = float(fin.std()) if len(fin) else float("nan")
        collapsed = n > 1 and not (std >= settings.min_std)
        check("collapsed", head, std, settings.min_std, not collapsed,
              f"{head} score std {std:.3g} is below scoring.qc.min_std {settings.min_std:g} "
              "(the distribution has collapsed)")
        if reference is not None:
            value = psi(reference[f"score_{head}"], s)
            ok = not (value > settings.max_psi)
            check("psi", head, value, settings.max_psi, ok,
                  f"{head} PSI {value:.3f} against {reference_name} exceeds scoring.qc.max_psi "
                  f"{settings.max_psi:g} (the score distribution moved)")
    reasons = [c["reason"] for c in checks if not c["passed"]]
    return {"passed": not reasons, "reasons": reasons, "checks": checks,
            "reference": reference_name, "psi_checked": reference is not None}


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
