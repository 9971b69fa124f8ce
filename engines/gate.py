"""The accuracy gate, which is also the comparator: candidate vs the fp32 ONNX Runtime reference.

Both runners score the same held-out, labelled, stratified lake sample; per
head we compare AUC and Brier score against the labels and the probabilities
against each other (max |Δp|). The verdict, with metrics and thresholds, goes
into the engine's metadata; engines that did not pass are refused for scoring.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from conf.settings import Settings
from engines import samples
from engines.metrics import brier, head_metrics, roc_auc  # noqa: F401 (re-exported)
from engines.model_card import load_card
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


def holdout_sample(settings: Settings, as_of: str | None, rows: int = DEFAULT_GATE_ROWS,
                   seed: int = 0, model: str = "emr_risk") -> tuple[str, pa.Table]:
    """The gate's labelled sample: half 1 of the key split (calibration uses half 0), stratified."""
    as_of = as_of or samples.latest_as_of(settings.lake.root, with_labels=True)
    if as_of is None:
        raise samples.SampleError(
            f"the accuracy gate needs labelled timelines in lake {settings.lake.root}; run "
            "`medscreen emr features --as-of D --with-labels` and pass --as-of D")
    table = samples.read_timelines(settings.lake.root, as_of, labels=True)
    samples.check_vocabulary(settings.lake.root, as_of, load_card(settings, model))
    return as_of, samples.stratified_sample(table, rows, seed=seed, half=1)


def gate(settings: Settings, reference: Runner, candidate: Runner, precision: str,
         as_of: str | None = None, rows: int = DEFAULT_GATE_ROWS,
         model: str = "emr_risk") -> dict[str, Any]:
    """Score the held-out sample with both (active) runners and return the verdict dict."""
    as_of, table = holdout_sample(settings, as_of, rows, model=model)
    y = samples.labels(table)
    batches = samples.feed_batches(table, settings.features.max_tokens)
    ref = run_batches(reference, batches, table.num_rows)
    cand = run_batches(candidate, batches, table.num_rows)
    verdict = compare(ref, cand, y, thresholds_for(settings, precision))
    verdict.update({"as_of": as_of, "reference": reference.name, "candidate": candidate.name,
                    "precision": precision})
    log.info("gate %s vs %s at %s: %s %s", candidate.name, reference.name, as_of,
             "PASSED" if verdict["passed"] else "FAILED", "; ".join(verdict["failures"]))
    return verdict


# ------------------------------------------------------------------ segmentation models (CT)

SEGMENTATION_SAMPLE_VOLUMES = 4
_SEG_FP32_MAX_DELTA_DICE = 0.002


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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


def segmentation_gate(card: dict[str, Any], reference: Runner, candidate: Runner, precision: str,
                      count: int = SEGMENTATION_SAMPLE_VOLUMES) -> dict[str, Any]:
    """Dice of candidate vs reference against planted spheres (ΔDice), their agreement, max |Δp|.

    Thresholds come from the card's ``gate.max_abs_delta_dice`` per precision.
    """
    spec = card["inputs"][0]
    shape = tuple(int(d) for d in spec["shape"][2:])
    out_name = card["outputs"][0]["name"]
    thr_p = float((card.get("postprocessing") or {}).get("probability_threshold", 0.5))
    limits = (card.get("gate") or {}).get("max_abs_delta_dice") or {}
    max_dd = float(limits.get(precision, _SEG_FP32_MAX_DELTA_DICE))
    images, truth = planted_spheres(shape, count)
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
                        "sample": "planted spheres in windowed lung background (engines.gate.planted_spheres)"},
            "thresholds": {"max_abs_delta_dice": max_dd, "min_mask_agreement_dice": 1 - 2 * max_dd},
            "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision, "reference": reference.name, "candidate": candidate.name}
