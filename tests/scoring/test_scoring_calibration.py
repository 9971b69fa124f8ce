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
