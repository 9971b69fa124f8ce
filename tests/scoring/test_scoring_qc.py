"""The QC gate's checks, and the screening list's selection rules, on known inputs."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from conf.settings import QCSettings
from inference import qc
from inference.screening import select
from scoring_fixtures import same_verdict
from lake.schemas import SCORES


def _scores(t2d, ckd=None, hf=None):
    t2d = np.asarray(t2d, np.float32)
    return {"score_t2d": t2d, "score_ckd": np.asarray(ckd if ckd is not None else t2d, np.float32),
            "score_hf": np.asarray(hf if hf is not None else t2d, np.float32)}


def _failed(verdict):
    return {(c["check"], c["head"]) for c in verdict["checks"] if not c["passed"]}


def test_scoring_qc_passes_healthy_scores():
    rng = np.random.default_rng(0)
    v = qc.evaluate(_scores(rng.beta(2, 8, 5000)), QCSettings(),
                    reference=_scores(rng.beta(2, 8, 5000)), reference_name="as_of=2024-03-31")
    assert v["passed"] and v["reasons"] == [] and v["psi_checked"]


def test_scoring_qc_trips_on_nan_constant_zero_and_collapse():
    rng = np.random.default_rng(1)
    good = rng.beta(2, 8, 1000)
    with_nan = good.copy()
    with_nan[5] = np.nan
    v = qc.evaluate(_scores(with_nan, np.full(1000, 0.3), np.zeros(1000)), QCSettings())
    assert not v["passed"]
    # Exactly these: a NaN fails only non_finite; a constant 0.3 is constant and has no spread; all
    # zeros is its own check (not "constant") and has no spread either.
    assert _failed(v) == {("non_finite", "t2d"), ("constant", "ckd"), ("collapsed", "ckd"),
                          ("all_zero", "hf"), ("collapsed", "hf")}
    assert any("NaN" in r for r in v["reasons"])
    collapsed = 0.5 + rng.normal(0, 1e-6, 1000)
    v = qc.evaluate(_scores(good, collapsed, good), QCSettings(min_std=1e-4))
    assert _failed(v) == {("collapsed", "ckd")}
    with pytest.raises(qc.QCFailed, match="collapsed"):
        qc.raise_if_failed(v, "test")


def test_scoring_qc_psi_detects_a_moved_distribution():
    rng = np.random.default_rng(2)
    ref = rng.beta(2, 8, 20000)
    assert qc.psi(ref, rng.beta(2, 8, 20000)) < 0.02
    assert qc.psi(ref, np.clip(ref + 0.3, 0, 1)) > 1.0
    v = qc.evaluate(_scores(np.clip(ref + 0.3, 0, 1), ref, ref), QCSettings(max_psi=0.25),
                    reference=_scores(ref), reference_name="as_of=2024-03-31")
    assert _failed(v) == {("psi", "t2d")}


def _score_table(values: dict[str, list[float]]) -> pa.Table:
    n = len(values["t2d"])
    return pa.table({
        "patient_key": [f"p{i:03d}" for i in range(n)],
        "as_of": pa.array([dt.date(2024, 6, 30)] * n, pa.date32()),
        "model": ["emr_risk"] * n, "model_version": ["v1"] * n, "engine_fingerprint": ["ort-fp32-x"] * n,
        "precision": ["fp32"] * n, "run_id": ["r1"] * n,
        **{f"score_{h}": pa.array(values[h], pa.float32()) for h in ("t2d", "ckd", "hf")}}, schema=SCORES)


def test_scoring_screening_thresholds_and_top_k():
    t = _score_table({"t2d": [0.9, 0.2, 0.6, 0.6, float("nan")], "ckd": [0.1, 0.8, 0.1, 0.1, 0.1],
                      "hf": [0.0, 0.0, 0.0, 0.0, 0.0]})
    flagged = select(t, {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}, None)
    rows = [(r["head"], r["patient_key"], r["rank"]) for r in flagged.to_pylist()]
    # highest first, ties by key, NaN never flagged, provenance carried
    assert rows == [("t2d", "p000", 1), ("t2d", "p002", 2), ("t2d", "p003", 3), ("ckd", "p001", 1)]
    assert set(flagged.column("criterion").to_pylist()) == {"threshold>=0.5"}
    assert set(flagged.column("engine_fingerprint").to_pylist()) == {"ort-fp32-x"}
    top = select(t, {"t2d": 0.5}, top_k=2)
    assert [(r["head"], r["patient_key"]) for r in top.to_pylist()] == [
        ("t2d", "p000"), ("t2d", "p002"), ("ckd", "p001"), ("ckd", "p000"), ("hf", "p000"), ("hf", "p001")]
    with pytest.raises(ValueError, match="unknown heads"):
        select(t, {"stroke": 0.5}, None)


def test_scoring_screening_list_is_the_same_whatever_the_row_order_or_file_split():
    # Scores arrive as one chunk per fragment file, keys sorted only within a file.
    rng = np.random.default_rng(3)
    n = 600
    keys = [f"{k:032x}" for k in rng.permutation(n) * 2654435761 % (1 << 61)] + ["é-key", "e-key"]
    t2d = np.round(rng.random(len(keys)), 1).astype(np.float32)  # many exact ties
    t2d[::13] = np.nan
    table = _score_table({"t2d": t2d.tolist(), "ckd": t2d[::-1].tolist(), "hf": [0.0] * len(keys)})
    table = table.set_column(0, "patient_key", pa.array(keys, pa.string()))
    split = pa.concat_tables([table.slice(0, 200).sort_by("patient_key"), table.slice(200).sort_by("patient_key")])
    for thresholds, top_k in (({"t2d": 0.5, "ckd": 0.7}, None), ({}, 25)):
        expected = []
        for head in ("t2d", "ckd", "hf"):
            if top_k is None and head not in thresholds:
                continue
            ranked = sorted(((-s, k) for k, s in zip(table.column("patient_key").to_pylist(),
                                                      table.column(f"score_{head}").to_pylist()) if s == s))
            ranked = ranked[:top_k] if top_k else [r for r in ranked if -r[0] >= np.float32(thresholds[head])]
            expected += [(head, k, i + 1) for i, (_, k) in enumerate(ranked)]
        for scores in (table, split, table.take(pa.array(rng.permutation(table.num_rows)))):
            flagged = select(scores, thresholds, top_k)
            assert [(r["head"], r["patient_key"], r["rank"]) for r in flagged.to_pylist()] == expected


def test_scoring_qc_merged_fragment_summaries_judge_as_the_full_read():
    from inference import score_stats
    from inference.metrics import score_histograms

    rng = np.random.default_rng(3)
    ref = _scores(rng.beta(2, 8, 3000), rng.beta(2, 5, 3000), np.full(3000, np.nan))
    cases = {
        "healthy": _scores(rng.beta(2, 8, 2500), rng.beta(2, 5, 2500), rng.beta(1, 9, 2500)),
        "nan, constant, zero": _scores(np.where(rng.random(2500) < 0.01, np.nan, rng.random(2500)),
                                       np.full(2500, 0.3), np.zeros(2500)),
        "drifted": _scores(np.clip(rng.beta(2, 8, 2500) + 0.3, 0, 1), rng.beta(2, 5, 2500), rng.random(2500)),
    }
    bins = {h: qc.psi_reference(ref[f"score_{h}"]) for h in ("t2d", "ckd", "hf")}
    edges = {h: (b["edges"] if b is not None else []) for h, b in bins.items()}
    for name, scores in cases.items():
        probs = np.stack([scores[f"score_{h}"] for h in ("t2d", "ckd", "hf")], axis=1)
        # Uneven fragments, one of them empty, merged in plan order.
        cuts = [0, 1, 700, 700, 1900, 2500]
        merged = score_stats.merge(score_stats.of_scores(probs[a:b], edges) for a, b in zip(cuts, cuts[1:]))
        same_verdict(score_stats.qc_verdict(merged, QCSettings(), bins, "as_of=2024-03-31"),
                      qc.evaluate(scores, QCSettings(), ref, "as_of=2024-03-31"))
        full, ours = score_histograms(scores), score_stats.histograms(merged)
        for h in full:
            assert {k: v for k, v in ours[h].items() if k not in ("mean", "std")} == \
                {k: v for k, v in full[h].items() if k not in ("mean", "std")}, name
            assert ours[h]["mean"] == pytest.approx(full[h]["mean"], rel=1e-12)
            assert ours[h]["std"] == pytest.approx(full[h]["std"], rel=1e-9)


def test_scoring_qc_summarises_again_a_fragment_staged_without_a_summary_over_these_bins(tmp_path):
    """A resumed fragment marked by a run with another drift reference (or none) is summarised from its file."""
    from inference import emr, score_stats
    from inference.fragments import FragmentSink

    rng = np.random.default_rng(7)
    sink = FragmentSink(final=str(tmp_path / "as_of=2024-06-30"), run_id="r", precision="fp32", attempt_id="a",
                        as_of="2024-06-30", model="emr_risk", model_version="1", engine_fingerprint="onn-x")
    sink.staging().open({"plan": 1})
    probs = rng.random((300, 3)).astype(np.float32)
    keys = np.array([f"{i:032x}".encode() for i in range(300)])
    record = sink.write(0, 300, keys, probs, np.zeros(0, "S1"), np.zeros(0, "S1"), [])
    assert record["stats"]["psi_edges"] is None
    edges = {h: [0.25, 0.5, 0.75] for h in ("t2d", "ckd", "hf")}
    merged = emr._merged_stats([record], sink.staging(), edges)
    assert merged["psi_edges"] == edges
    assert merged == score_stats.merge([score_stats.of_scores(probs, edges)])
