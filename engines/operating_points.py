"""Operating points: each head's screening threshold, chosen on validation data by a stated rule.

Rules (on calibrated scores of the patients ELIGIBLE for the head's list):

* ``list_size_per_1000`` (target N): the lowest threshold at which at most N of
  every 1 000 eligible patients are flagged — the outreach team's capacity.
* ``target_ppv`` (target P): the lowest threshold at which the positive
  predictive value among labelled flagged patients is at least P (at least
  ``MIN_FLAGGED`` labelled flagged patients, so one lucky patient does not
  set it); none when no threshold reaches P.

:func:`measure` gives a threshold's list size per 1 000 eligible, sensitivity
and PPV (with their counts) on another population — the held-out date.
Pure numpy; training chooses, the card records, screening reads.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

RULES = ("list_size_per_1000", "target_ppv")
MIN_FLAGGED = 20


def choose(scores: np.ndarray, labels: np.ndarray, eligible: np.ndarray, rule: str, target: float) -> float | None:
    """The threshold ``rule`` picks for one head (flag when score ≥ threshold); None if none qualifies.

    ``labels``: 1/0, -1 = unknown (counted for list size, not for PPV).
    """
    s = np.asarray(scores, dtype=np.float64)
    keep = np.asarray(eligible, dtype=bool) & np.isfinite(s)
    s, y = s[keep], np.asarray(labels)[keep]
    if not len(s):
        return None
    desc = np.sort(s)[::-1]
    if rule == "list_size_per_1000":
        if not 0 < target <= 1000:
            raise ValueError(f"list_size_per_1000 target must be in (0, 1000], got {target}")
        k = int(math.floor(target / 1000 * len(s)))
        if k <= 0:
            return None
        # Lowest value v with count(s >= v) <= k: the k-th score, raised past ties that would overflow.
        candidates = np.unique(desc[:k])  # ascending distinct values of the top k
        count_ge = len(s) - np.searchsorted(np.sort(s), candidates, side="left")
        fits = candidates[count_ge <= k]
        return float(fits.min()) if len(fits) else None
    if rule == "target_ppv":
        if not 0 < target < 1:
            raise ValueError(f"target_ppv must be in (0, 1), got {target}")
        order = np.argsort(-s, kind="stable")
        ys = y[order]
        labelled = np.cumsum(ys >= 0)
        tp = np.cumsum(ys == 1)
        ppv = np.where(labelled > 0, tp / np.maximum(labelled, 1), 0.0)
        ok = (ppv >= target) & (labelled >= MIN_FLAGGED)
        # Only at the last row of a run of equal scores is "flag all with score >= v" well defined.
        sorted_s = s[order]
        last_of_tie = np.r_[sorted_s[1:] != sorted_s[:-1], True]
        ok &= last_of_tie
        if not ok.any():
            return None
        return float(sorted_s[np.flatnonzero(ok)[-1]])
    raise ValueError(f"unknown operating-point rule {rule!r}; choose one of {RULES}")


def measure(scores: np.ndarray, labels: np.ndarray, eligible: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """List size per 1 000 eligible, sensitivity and PPV of ``threshold`` (None: nobody flagged)."""
    s = np.asarray(scores, dtype=np.float64)
    keep = np.asarray(eligible, dtype=bool)
    s, y = s[keep], np.asarray(labels)[keep]
    flagged = np.isfinite(s) & (s >= threshold) if threshold is not None else np.zeros(len(s), bool)
    tp = int(((y == 1) & flagged).sum())
    fp = int(((y == 0) & flagged).sum())
    fn = int(((y == 1) & ~flagged).sum())
    return {"eligible": int(len(s)), "flagged": int(flagged.sum()),
            "per_1000_eligible": round(1000 * float(flagged.sum()) / len(s), 1) if len(s) else None,
            "labelled": int((y >= 0).sum()), "tp": tp, "fp": fp, "fn": fn,
            "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
            "ppv": round(tp / (tp + fp), 4) if tp + fp else None}


def thresholds_from_card(card: dict[str, Any]) -> dict[str, float]:
    """Each head's threshold from the card's ``operating_points`` (heads without one are absent)."""
    points = (card.get("operating_points") or {}).get("heads") or {}
    return {h: float(p["threshold"]) for h, p in points.items() if p.get("threshold") is not None}
