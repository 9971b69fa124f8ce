"""The accuracy gate, which is also the comparator: candidate vs the fp32 ONNX Runtime reference.

Like Polygraphy's ``Comparator``, it is handed its data and two active
runners and reads nothing itself (the engine cache's gate role,
:mod:`engines.cache.gate`, fetches the data). For the EMR model both runners
score the same held-out, labelled, stratified sample; per head we compare AUC
and Brier score against the labels and the probabilities against each other
(max |Δp|). For segmentation models, Dice against known masks. The verdict,
with metrics and thresholds, goes into the engine's metadata; engines that
did not pass are refused for scoring.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from conf.settings import Settings
from engines.metrics import brier, head_metrics, roc_auc  # noqa: F401 (re-exported)
from engines.runner import Runner
from lake.schemas import HEADS

log = logging.getLogger(__name__)

DEFAULT_GATE_ROWS = 2000


@dataclass(frozen=True)
class GateThresholds:
    max_abs_delta_auc: float
    max_abs_delta_brier: float
    max_abs_delta_p: float | None      # None: reported, not judged
    min_holdout_rows: int
    max_p99_abs_delta_p: float | None = None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def thresholds_for(settings: Settings, precision: str) -> GateThresholds:
    """Gate thresholds for a candidate of ``precision`` (from settings.engines.gate)."""
    g = settings.engines.gate
    if precision == "fp16":
        return GateThresholds(g.fp16_max_abs_delta_auc, g.fp16_max_abs_delta_brier, g.fp16_max_abs_delta_p,
                              g.min_holdout_rows)
    if precision == "int8":
        return GateThresholds(g.int8_max_abs_delta_auc, g.int8_max_abs_delta_brier, None, g.min_holdout_rows,
                              g.int8_max_p99_abs_delta_p)
    return GateThresholds(g.fp32_max_abs_delta_auc, g.fp32_max_abs_delta_brier, g.fp32_max_abs_delta_p,
                          g.min_holdout_rows)


def run_batches(runner: Runner, batches: list[tuple[np.ndarray, dict[str, np.ndarray]]],
                rows: int, output: str = "probs") -> np.ndarray:
    """Run ``runner`` over ``batches`` and return ``output`` in the original row order."""
    out = None
    for idx, feed in batches:
        probs = np.asarray(runner.infer(feed)[output], dtype=np.float32)
        if out is None:
            out = np.full((rows,) + probs.shape[1:], np.nan, dtype=np.float32)
        out[idx] = probs
    return out


def compare(reference: np.ndarray, candidate: np.ndarray, y: np.ndarray,
            thresholds: GateThresholds) -> dict[str, Any]:
    """Polygraphy-style comparison of two runners' probabilities plus the label metrics; the verdict."""
    ref_m, cand_m = head_metrics(reference, y), head_metrics(candidate, y)
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    failures: list[str] = []
    metrics: dict[str, Any] = {"rows": int(len(reference)), "heads": {}}
    for j, head in enumerate(HEADS):
        r, c = ref_m[head], cand_m[head]
        d_auc = c["auc"] - r["auc"]
        d_brier = c["brier"] - r["brier"]
        max_dp = float(np.max(diff[:, j])) if len(diff) else math.nan
        p99_dp = float(np.percentile(diff[:, j], 99)) if len(diff) else math.nan
        metrics["heads"][head] = {
            "auc_reference": r["auc"], "auc_candidate": c["auc"], "delta_auc": d_auc,
            "brier_reference": r["brier"], "brier_candidate": c["brier"], "delta_brier": d_brier,
            "max_abs_delta_p": max_dp, "p99_abs_delta_p": p99_dp,
            "mean_abs_delta_p": float(np.mean(diff[:, j])),
            "prevalence": r["prevalence"], "n": r["n"]}
        # A head with one class only has no AUC; then |Δp| and Brier still judge it.
        if not math.isnan(r["auc"]) and not abs(d_auc) <= thresholds.max_abs_delta_auc:
            failures.append(f"{head}: |ΔAUC| {abs(d_auc):.4g} > {thresholds.max_abs_delta_auc}")
        if not abs(d_brier) <= thresholds.max_abs_delta_brier:
            failures.append(f"{head}: |ΔBrier| {abs(d_brier):.4g} > {thresholds.max_abs_delta_brier}")
        if thresholds.max_abs_delta_p is not None and not max_dp <= thresholds.max_abs_delta_p:
            failures.append(f"{head}: max |Δp| {max_dp:.4g} > {thresholds.max_abs_delta_p}")
        if thresholds.max_p99_abs_delta_p is not None and not p99_dp <= thresholds.max_p99_abs_delta_p:
            failures.append(f"{head}: p99 |Δp| {p99_dp:.4g} > {thresholds.max_p99_abs_delta_p}")
        if not np.all(np.isfinite(candidate[:, j])):
            failures.append(f"{head}: candidate produced non-finite probabilities")
    metrics["max_abs_delta_p"] = float(np.max(diff)) if diff.size else math.nan
    if len(reference) < thresholds.min_holdout_rows:
        failures.append(f"held-out sample has {len(reference)} rows < min_holdout_rows "
                        f"{thresholds.min_holdout_rows}")
    return {"passed": not failures, "failures": failures, "metrics": metrics,
            "thresholds": thresholds.to_dict(),
            "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


@dataclass(frozen=True)
class GateData:
    """What the comparator is handed for the EMR model: feeds in batches (row indices, feed), labels
    ``[rows, heads]`` (-1 unknown), and the as-of date they came from (recorded with the verdict)."""

    batches: list[tuple[np.ndarray, dict[str, np.ndarray]]]
    labels: np.ndarray
    rows: int
    as_of: str | None = None


def gate(reference: Runner, candidate: Runner, precision: str, data: GateData,
         thresholds: GateThresholds) -> dict[str, Any]:
    """Score ``data`` with both (active) runners and return the verdict dict."""
    ref = run_batches(reference, data.batches, data.rows)
    cand = run_batches(candidate, data.batches, data.rows)
    verdict = compare(ref, cand, data.labels, thresholds)
    verdict.update({"as_of": data.as_of, "reference": reference.name, "candidate": candidate.name,
                    "precision": precision})
    log.info("gate %s vs %s at %s: %s %s", candidate.name, reference.name, data.as_of,
             "PASSED" if verdict["passed"] else "FAILED", "; ".join(verdict["failures"]))
    return verdict


# ------------------------------------------------------------------ segmentation models (CT)

SEGMENTATION_SAMPLE_VOLUMES = 4
_SEG_FP32_MAX_DELTA_DICE = 0.002


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


def segmentation_gate(card: dict[str, Any], reference: Runner, candidate: Runner, precision: str,
                      images: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Dice of candidate vs reference against known masks (ΔDice), their agreement, max |Δp|.

    ``images`` ``[n, 1, z, y, x]`` and their masks ``truth`` are handed in
    (:func:`engines.samples.planted_spheres`). Thresholds come from the card's
    ``gate.max_abs_delta_dice`` per precision.
    """
    spec = card["inputs"][0]
    count = len(images)
    out_name = card["outputs"][0]["name"]
    thr_p = float((card.get("postprocessing") or {}).get("probability_threshold", 0.5))
    limits = (card.get("gate") or {}).get("max_abs_delta_dice") or {}
    max_dd = float(limits.get(precision, _SEG_FP32_MAX_DELTA_DICE))
    ref_d, cand_d, agree, max_dp = [], [], [], 0.0
    for i in range(count):
        feed = {spec["name"]: images[i:i + 1]}
        r = np.asarray(reference.infer(feed)[out_name], np.float32)
        c = np.asarray(candidate.infer(feed)[out_name], np.float32)
        max_dp = max(max_dp, float(np.max(np.abs(r - c))) if np.all(np.isfinite(c)) else math.inf)
        ref_d.append(dice(r > thr_p, truth[i:i + 1]))
        cand_d.append(dice(c > thr_p, truth[i:i + 1]))
        agree.append(dice(r > thr_p, c > thr_p))
    delta = float(np.mean(cand_d) - np.mean(ref_d))
    failures = []
    if not abs(delta) <= max_dd:
        failures.append(f"|ΔDice| {abs(delta):.4g} > {max_dd}")
    if not 1.0 - min(agree) <= 2 * max_dd:
        failures.append(f"candidate/reference mask agreement (Dice) {min(agree):.4g} < {1 - 2 * max_dd}")
    return {"passed": not failures, "failures": failures,
            "metrics": {"volumes": count, "dice_reference": float(np.mean(ref_d)),
                        "dice_candidate": float(np.mean(cand_d)), "delta_dice": delta,
                        "min_mask_agreement_dice": float(min(agree)), "max_abs_delta_p": max_dp,
                        "sample": "planted spheres in windowed lung background (engines.samples.planted_spheres)"},
            "thresholds": {"max_abs_delta_dice": max_dd, "min_mask_agreement_dice": 1 - 2 * max_dd},
            "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision, "reference": reference.name, "candidate": candidate.name}
