"""Calibration and operating points: fitted values against known answers (a simulated truth, hand-worked
pool-adjacent-violators, hand-counted thresholds), and the card sidecar's refusals."""
from __future__ import annotations

import numpy as np
import pytest

from engines import calibration as cal
from engines import operating_points as op

HEADS = ("t2d", "ckd", "hf")


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_platt_recovers_the_miscalibration_it_was_simulated_with():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.5, 200_000)
    raw = _sigmoid(x)                      # what an over-weighted model outputs
    truth = _sigmoid(1.3 * x - 1.2)        # what the outcome rate really is
    y = (rng.random(len(x)) < truth).astype(int)
    fitted = cal.fit_platt(raw, y)
    assert fitted["a"] == pytest.approx(1.3, abs=0.03) and fitted["b"] == pytest.approx(-1.2, abs=0.03)


def test_isotonic_pools_adjacent_violators():
    # 0.2 → 1 then 0.3 → 0 violate order: pooled into one block at their mean.
    fitted = cal.fit_isotonic(np.array([0.1, 0.3, 0.2, 0.4]), np.array([0, 0, 1, 1]))
    assert fitted == {"x": [0.1, 0.25, 0.4], "y": [0.0, 0.5, 1.0]}
    c = cal.Calibration("isotonic", {"t2d": fitted}, "sha")
    np.testing.assert_allclose(c.apply_head("t2d", np.array([0.0, 0.1, 0.175, 0.25, 0.4, 0.9])),
                               [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-6)


def test_platt_keeps_the_ranking_and_a_nan_stays_nan():
    c = cal.Calibration("platt", {h: {"a": 1.2, "b": -0.7} for h in HEADS}, "sha")
    raw = np.array([[0.1, 0.5, 0.9], [0.2, 0.4, np.nan], [0.3, 0.3, 0.01]], np.float32)
    out = c.apply(raw, HEADS)
    expected = _sigmoid(1.2 * np.log(raw / (1 - raw)) - 0.7)
    np.testing.assert_allclose(out[:, :2], expected[:, :2], rtol=1e-5)
    assert np.isnan(out[1, 2]) and out[2, 2] == pytest.approx(expected[2, 2], rel=1e-5)
    assert (np.argsort(out[:, 0]) == np.argsort(raw[:, 0])).all()


def _card(c: cal.Calibration, onnx_sha: str = "sha") -> dict:
    return {"name": "emr_risk", "heads": list(HEADS), "onnx": {"sha256": onnx_sha}, "calibration": c.to_card()}


def test_the_card_sidecar_round_trips_and_is_refused_for_another_model_or_when_edited():
    c = cal.Calibration("platt", {h: {"a": 1.0, "b": -1.0} for h in HEADS}, "sha", {"split": "validation"})
    loaded = cal.from_card(_card(c))
    assert loaded is not None and loaded.id == c.id and loaded.heads == c.heads
    assert cal.from_card({"name": "emr_risk", "onnx": {"sha256": "sha"}}) is None
    with pytest.raises(cal.CalibrationError, match="fitted for ONNX .*recalibrate"):
        cal.from_card(_card(c, onnx_sha="another"))
    edited = _card(c)
    edited["calibration"]["heads"]["t2d"]["b"] = 0.0
    with pytest.raises(cal.CalibrationError, match="edited by hand"):
        cal.from_card(edited)


def test_reliability_bins_and_expected_calibration_error():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5])
    y = np.array([0, 1, 1, 1, -1])   # the last has no label
    r = cal.reliability(p, y)
    assert r["n"] == 4 and [(b["n"], b["mean_predicted"], b["observed_rate"]) for b in r["bins"]] == [
        (2, 0.05, 0.5), (2, 0.95, 1.0)]
    assert r["ece"] == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)


def test_list_size_rule_flags_at_most_n_per_1000_eligible():
    scores = np.arange(1, 1001) / 1000.0
    labels = np.zeros(1000, int)
    everyone = np.ones(1000, bool)
    assert op.choose(scores, labels, everyone, "list_size_per_1000", 100) == pytest.approx(0.901)
    # Only the even-numbered half is eligible: 50 per 1000 of 500 is 25 patients, the 25 highest even ones.
    even = np.arange(1000) % 2 == 1   # scores 0.002, 0.004, ...
    t = op.choose(scores, labels, even, "list_size_per_1000", 50)
    assert t == pytest.approx(0.952) and ((scores >= t) & even).sum() == 25
    # A tie across the cut raises the threshold past it rather than overflowing the list.
    tied = np.array([0.9, 0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert op.choose(tied, np.zeros(10, int), np.ones(10, bool), "list_size_per_1000", 200) == 0.9


def test_target_ppv_rule_and_the_measured_sensitivity_and_ppv():
    # 100 patients ranked by score; positives at ranks 0-29 every other one, then none.
    scores = np.linspace(1, 0.01, 100)
    labels = np.zeros(100, int)
    labels[0:30:2] = 1          # 15 positives among the top 30: PPV 0.5 down to rank 30
    labels[60] = 1              # one more, far down
    labels[95:] = -1            # unlabelled
    t = op.choose(scores, labels, np.ones(100, bool), "target_ppv", 0.5)
    assert t == pytest.approx(scores[29])      # top 30: 15/30 = 0.5; top 31: 15/31 < 0.5
    m = op.measure(scores, labels, np.ones(100, bool), t)
    assert m == {"eligible": 100, "flagged": 30, "per_1000_eligible": 300.0, "labelled": 95, "tp": 15, "fp": 15,
                 "fn": 1, "sensitivity": round(15 / 16, 4), "ppv": 0.5}
    assert op.choose(scores, labels, np.ones(100, bool), "target_ppv", 0.99) is None
    assert op.measure(scores, labels, np.ones(100, bool), None)["flagged"] == 0


def test_thresholds_come_from_the_cards_operating_points():
    card = {"operating_points": {"heads": {"t2d": {"threshold": 0.2}, "ckd": {"threshold": None},
                                           "hf": {"threshold": 0.1}}}}
    assert op.thresholds_from_card(card) == {"t2d": 0.2, "hf": 0.1}


def test_training_writes_a_calibration_and_operating_points_the_scoring_path_accepts(tmp_path):
    """models.emr_risk.train's card sections for a real ONNX, on arrays with a known truth."""
    import argparse

    from engines.model_card import file_sha256
    from models.emr_risk.train import calibrate_sections
    from preprocessing.vocabulary import default_vocabulary
    from scoring_fixtures import build_model

    onnx_path = build_model(tmp_path / "m.onnx")
    enc = default_vocabulary().id_of("encounter")
    rng = np.random.default_rng(4)

    def arrays(n: int) -> dict[str, np.ndarray]:
        length = rng.integers(0, 12, n)
        tokens = np.zeros((n, 12), np.int64)
        for i, k in enumerate(length):
            tokens[i, :k] = rng.integers(1, 64, k)
        return {"tokens": tokens, "days_before": rng.uniform(0, 1800, (n, 12)).astype(np.float32) * (tokens > 0),
                "age_years": rng.uniform(5, 90, n).astype(np.float32), "sex": rng.integers(0, 3, n),
                "length": length, "prevalent": rng.random((n, 3)) < 0.1}

    def with_labels(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The truth: the model ranks well but is overconfident (true logit = 0.6 * its logit - 1).
        from models.emr_risk.train import predict_onnx

        p = predict_onnx(onnx_path, d).astype(np.float64)
        truth = 1 / (1 + np.exp(-(0.6 * np.log(p / (1 - p)) - 1)))
        y = (rng.random(truth.shape) < truth).astype(int)
        d["labels"] = np.where(rng.random(truth.shape) < 0.2, -1, y)
        return d

    val, hold = with_labels(arrays(3000)), with_labels(arrays(2000))
    args = argparse.Namespace(calibration="platt", operating_rule="list_size_per_1000", operating_target=100.0)
    meta = {"train_as_of": ["2023-06-30"], "holdout_as_of": "2024-06-30"}
    sections = calibrate_sections(onnx_path, val, hold, meta, 0.15, args)
    card = {"name": "emr_risk", "heads": list(HEADS), "onnx": {"sha256": file_sha256(onnx_path)}, **sections}
    fitted = cal.from_card(card)
    assert fitted is not None and sections["operating_points"]["calibration_id"] == fitted.id
    # The simulated miscalibration is what Platt scaling finds, and what it removes on the held-out rows.
    for h in HEADS:
        assert fitted.heads[h]["a"] == pytest.approx(0.6, abs=0.15) and fitted.heads[h]["b"] == pytest.approx(-1, abs=0.3)
        held = sections["calibration"]["holdout"][h]
        assert held["ece_calibrated"] < held["ece_raw"]
    assert sections["calibration"]["reliability"]["validation"]["t2d"]["n"] == int((val["labels"][:, 0] >= 0).sum())
    for j, h in enumerate(HEADS):
        rule = {"t2d": (35, 70), "ckd": (18, None), "hf": (40, None)}[h]
        age = np.floor(val["age_years"])
        eligible = ((age >= rule[0]) & ((age <= rule[1]) if rule[1] is not None else True)
                    & ((val["tokens"] == enc).sum(1) >= 1) & ~val["prevalent"][:, j])
        point = sections["operating_points"]["heads"][h]
        assert point["validation"]["eligible"] == int(eligible.sum())
        assert 0 < point["validation"]["flagged"] <= eligible.sum() // 10   # at most 100 per 1000 eligible
        assert point["holdout"]["eligible"] + point["holdout"]["flagged"] > 0
    assert sections["operating_points"]["rule"]["name"] == "list_size_per_1000"
