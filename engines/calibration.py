"""Score calibration: fitted per head on the validation split, shipped in the model card, applied after the engine.

The model is trained with a positive-class weight, so its raw outputs are not
probabilities. A calibration maps them to probabilities; it is a small,
versioned sidecar in the model card (``calibration``)::

    calibration:
      format: 1
      id: <sha256[:16] of the method and parameters>
      method: platt | isotonic
      onnx_sha256: <the ONNX it was fitted for>
      heads:
        t2d: {a: 1.2, b: -0.8}                  # platt: sigmoid(a * logit(p) + b)
        ckd: {x: [...], y: [...]}               # isotonic: piecewise linear through (x, y)

Why a sidecar and not in-graph: the same ONNX feeds every backend and
precision (ORT, TensorRT plans, fp16/int8 Q/DQ graphs); one numpy step after
any of them calibrates all alike, recalibration needs no engine rebuild or
re-gating, and the gates keep comparing the engines' raw outputs. Scoring
applies it in one place (inference.emr, where score rows are built).

Pure numpy: training (models/) and scoring share these functions.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = 1
METHODS = ("platt", "isotonic")
_EPS = 1e-7


class CalibrationError(ValueError):
    """A card's calibration is malformed or was fitted for another model."""


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(p: np.ndarray, y: np.ndarray, iterations: int = 100) -> dict[str, float]:
    """Platt scaling on the logit of ``p``: (a, b) of sigmoid(a·logit(p) + b), by Newton's method.

    Targets are Platt's smoothed labels ((N+ + 1)/(N+ + 2) and 1/(N- + 2)), which keep
    the fit finite when the classes separate.
    """
    x, y = logit(p), np.asarray(y, dtype=np.float64)
    pos, neg = float(y.sum()), float(len(y) - y.sum())
    if pos == 0 or neg == 0:
        raise CalibrationError(f"Platt scaling needs both classes; got {int(pos)} positives, {int(neg)} negatives")
    t = np.where(y > 0, (pos + 1) / (pos + 2), 1 / (neg + 2))
    a, b = 1.0, 0.0
    for _ in range(iterations):
        q = 1 / (1 + np.exp(-np.clip(a * x + b, -50, 50)))
        w = q * (1 - q)
        g = np.array([np.sum((q - t) * x), np.sum(q - t)])
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    return {"a": float(a), "b": float(b)}


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """Isotonic regression (pool adjacent violators) of ``y`` on ``p``: knots (x, y) of a
    non-decreasing step function, applied by linear interpolation between block centres."""
    order = np.argsort(p, kind="stable")
    xs, ys = np.asarray(p, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    if not len(xs):
        raise CalibrationError("isotonic calibration needs labelled rows")
    # Blocks as (sum_y, count, sum_x); merge while a block's mean exceeds the next one's.
    sums, counts, xsum = [], [], []
    for xi, yi in zip(xs, ys):
        sums.append(yi)
        counts.append(1.0)
        xsum.append(xi)
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            s, c, xx = sums.pop(), counts.pop(), xsum.pop()
            sums[-1] += s
            counts[-1] += c
            xsum[-1] += xx
    return {"x": [round(float(a / c), 7) for a, c in zip(xsum, counts)],
            "y": [round(float(s / c), 7) for s, c in zip(sums, counts)]}


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration for every head; ``apply`` maps raw engine outputs [n, heads] to probabilities."""

    method: str
    heads: dict[str, dict[str, Any]]
    onnx_sha256: str
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        body = json.dumps({"format": FORMAT, "method": self.method, "heads": self.heads,
                           "onnx_sha256": self.onnx_sha256}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def apply_head(self, head: str, p: np.ndarray) -> np.ndarray:
        params = self.heads[head]
        if self.method == "platt":
            out = 1 / (1 + np.exp(-np.clip(params["a"] * logit(p) + params["b"], -50, 50)))
        else:
            out = np.interp(np.asarray(p, dtype=np.float64), params["x"], params["y"])
        # NaN stays NaN (the QC gate must still see a broken engine).
        return np.where(np.isfinite(p), out, np.nan).astype(np.float32)

    def apply(self, probs: np.ndarray, heads: tuple[str, ...]) -> np.ndarray:
        """Calibrate a [n, len(heads)] array of raw outputs, column j being ``heads[j]``."""
        out = np.empty_like(probs, dtype=np.float32)
        for j, head in enumerate(heads):
            out[:, j] = self.apply_head(head, probs[:, j])
        return out

    def to_card(self, **extra: Any) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "method": self.method, "onnx_sha256": self.onnx_sha256,
                "fitted_on": self.fitted_on, "heads": self.heads, **extra}


def fit(method: str, probs: np.ndarray, labels: np.ndarray, heads: tuple[str, ...], onnx_sha256: str,
        fitted_on: dict[str, Any] | None = None) -> Calibration:
    """Fit ``method`` per head on rows with a label (labels -1 = unknown are skipped)."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    params = {}
    for j, head in enumerate(heads):
        ok = labels[:, j] >= 0
        fitter = fit_platt if method == "platt" else fit_isotonic
        params[head] = fitter(probs[ok, j], labels[ok, j])
    return Calibration(method, params, onnx_sha256, dict(fitted_on or {}))


def from_card(card: dict[str, Any]) -> Calibration | None:
    """The card's calibration (None when the card has none); refused when fitted for another ONNX."""
    c = card.get("calibration")
    if not c:
        return None
    where = f"model card {card.get('card_file', card.get('name'))}"
    if c.get("format") != FORMAT or c.get("method") not in METHODS or not isinstance(c.get("heads"), dict):
        raise CalibrationError(f"{where}: calibration has format {c.get('format')!r} / method "
                               f"{c.get('method')!r}; expected format {FORMAT} and one of {METHODS} — "
                               "recalibrate (python -m models.emr_risk.train --calibrate-only)")
    cal = Calibration(c["method"], c["heads"], c.get("onnx_sha256", ""), c.get("fitted_on") or {})
    if cal.onnx_sha256 != (card.get("onnx") or {}).get("sha256"):
        raise CalibrationError(f"{where}: calibration was fitted for ONNX {cal.onnx_sha256[:12]}… but the card "
                               f"describes {str((card.get('onnx') or {}).get('sha256'))[:12]}…; recalibrate "
                               "(python -m models.emr_risk.train --calibrate-only)")
    if c.get("id") != cal.id:
        raise CalibrationError(f"{where}: calibration id {c.get('id')!r} does not match its parameters "
                               f"({cal.id}); the card was edited by hand — recalibrate")
    missing = [h for h in card.get("heads") or [] if h not in cal.heads]
    if missing:
        raise CalibrationError(f"{where}: calibration lacks heads {missing}; recalibrate")
    return cal


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability curve on equal-width bins of the predicted probability, and the expected
    calibration error (ECE: count-weighted mean |observed − predicted|). Rows with y < 0 are skipped."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y)
    ok = (y >= 0) & np.isfinite(p)
    p, y = p[ok], y[ok].astype(np.float64)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        if not n:
            continue
        mean_p, rate = float(p[m].mean()), float(y[m].mean())
        ece += n * abs(rate - mean_p)
        rows.append({"bin": [b / bins, (b + 1) / bins], "n": n, "mean_predicted": round(mean_p, 4),
                     "observed_rate": round(rate, 4)})
    n = int(ok.sum())
    return {"bins": rows, "n": n, "ece": round(ece / n, 4) if n else math.nan}
