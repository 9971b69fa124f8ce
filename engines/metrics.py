"""Per-head classification metrics (AUC, Brier) shared by the accuracy gate and model training.

Pure numpy/scipy so training code on a machine without the pipeline's settings stack can use it.
"""
from __future__ import annotations

import math

import numpy as np

from lake.schemas import HEADS


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank (Mann–Whitney) formula, ties averaged; NaN if one class is absent."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0 or not np.all(np.isfinite(p)):
        return math.nan
    # scipy.stats costs ~0.6 s to import; only AUC needs it, not every importer of this module.
    from scipy.stats import rankdata

    ranks = rankdata(p)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities against 0/1 labels."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def head_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
    """Per head: AUC, Brier, prevalence and n (rows with a label; -1 = no label)."""
    out = {}
    for j, head in enumerate(HEADS):
        ok = y[:, j] >= 0
        yy, pp = y[ok, j], probs[ok, j]
        out[head] = {"auc": roc_auc(yy, pp), "brier": brier(yy, pp) if len(yy) else math.nan,
                     "prevalence": float(yy.mean()) if len(yy) else math.nan, "n": int(ok.sum())}
    return out
