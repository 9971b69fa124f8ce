"""Per-fragment score statistics that merge: what QC, drift and the report need, made where the scores are.

The engine actor that writes a fragment (inference.fragments.FragmentSink)
also summarises its scores per head — counts, non-finite count, min, max,
largest magnitude, mean and sum of squared deviations (merged with Chan's
parallel update), a fixed-bin histogram over [0, 1] for the report, and the
counts in the drift reference's bins for PSI — and puts that summary in the
fragment's marker record. The driver merges a few hundred bytes per fragment
instead of reading every score back; :func:`qc_verdict` and :func:`histograms`
give the same verdicts and numbers as a full read of the scores
(inference.qc.evaluate and inference.metrics.score_histograms, which the
tests hold them to).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from conf.settings import QCSettings
from inference.metrics import HIST_BINS
from inference.qc import bin_counts, psi_from_counts, verdict_of
from lake.schemas import HEADS


def of_scores(probs: np.ndarray, psi_edges: dict[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """The mergeable summary of one fragment's scores (``probs``: rows × heads, as written: float32).

    ``psi_edges`` are the drift reference's bin edges per head (inference.qc.psi_reference);
    the summary records them so a merge never mixes counts over different bins.
    """
    probs = np.asarray(probs, dtype=np.float32)
    out: dict[str, Any] = {"psi_edges": {h: list(map(float, e)) for h, e in psi_edges.items()}
                           if psi_edges else None, "heads": {}}
    for j, head in enumerate(HEADS):
        s = probs[:, j].astype(np.float64) if len(probs) else np.zeros(0, np.float64)
        fin = s[np.isfinite(s)]
        mean = float(fin.mean()) if len(fin) else 0.0
        hist, _ = np.histogram(np.clip(fin, 0, 1), bins=HIST_BINS, range=(0.0, 1.0))
        out["heads"][head] = {
            "n": int(len(s)), "finite": int(len(fin)),
            "min": float(fin.min()) if len(fin) else None, "max": float(fin.max()) if len(fin) else None,
            "abs_max": float(np.abs(fin).max()) if len(fin) else None,
            "mean": mean, "m2": float(np.sum((fin - mean) ** 2)) if len(fin) else 0.0,
            "hist": hist.tolist(),
            "psi_counts": bin_counts(psi_edges[head], fin).tolist() if psi_edges else None}
    return out


def merge(summaries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One summary of many fragments' summaries (all made over the same drift bins)."""
    merged: dict[str, Any] | None = None
    for s in summaries:
        if merged is None:
            merged = {"psi_edges": s["psi_edges"],
                      "heads": {h: {**v, "hist": list(v["hist"]),
                                    "psi_counts": list(v["psi_counts"]) if v["psi_counts"] is not None else None}
                                for h, v in s["heads"].items()}}
            continue
        if s["psi_edges"] != merged["psi_edges"]:
            raise ValueError("fragment summaries were made over different drift bins; recompute them")
        for h, b in s["heads"].items():
            a = merged["heads"][h]
            na, nb = a["finite"], b["finite"]
            if nb:
                if na:
                    delta = b["mean"] - a["mean"]
                    n = na + nb
                    a["mean"], a["m2"] = (a["mean"] + delta * nb / n,
                                          a["m2"] + b["m2"] + delta * delta * na * nb / n)
                    a["min"], a["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
                    a["abs_max"] = max(a["abs_max"], b["abs_max"])
                else:
                    a.update({k: b[k] for k in ("mean", "m2", "min", "max", "abs_max")})
            a["n"] += b["n"]
            a["finite"] += nb
            a["hist"] = [x + y for x, y in zip(a["hist"], b["hist"])]
            if a["psi_counts"] is not None:
                a["psi_counts"] = [x + y for x, y in zip(a["psi_counts"], b["psi_counts"])]
    if merged is None:
        return of_scores(np.zeros((0, len(HEADS)), np.float32))
    return merged


def std(head: dict[str, Any]) -> float:
    return float(np.sqrt(head["m2"] / head["finite"])) if head["finite"] else float("nan")


def qc_verdict(merged: dict[str, Any], settings: QCSettings, reference: dict[str, Any] | None = None,
               reference_name: str | None = None) -> dict[str, Any]:
    """The QC verdict (inference.qc) from a merged summary; ``reference`` is the drift reference's
    inference.qc.psi_reference, whose edges the summary's PSI counts were made over."""
    heads = {}
    for head, v in merged["heads"].items():
        drift = None
        if reference is not None:
            ref = reference[head]
            drift = (psi_from_counts(ref["counts"], v["psi_counts"])
                     if ref is not None and v["psi_counts"] is not None else float("nan"))
        heads[head] = {"n": v["n"], "finite": v["finite"], "abs_max": v["abs_max"], "min": v["min"],
                       "max": v["max"], "std": std(v), "psi": drift}
    return verdict_of(heads, settings, reference is not None, reference_name)


def histograms(merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's per-head histograms (inference.metrics.score_histograms) from a merged summary."""
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    return {head: {"counts": list(v["hist"]), "edges": [round(float(e), 4) for e in edges],
                   "n": v["n"], "non_finite": v["n"] - v["finite"],
                   "mean": v["mean"] if v["finite"] else None, "std": std(v) if v["finite"] else None}
            for head, v in merged["heads"].items()}
