"""Test data for the scoring tests: a tiny ONNX model with the EMR I/O contract, its model card,
random committed timelines, and engine sources that swap in deliberately broken engines.

Everything is real: the models run in ONNX Runtime through the engines package's
OrtRunner, engines come from the real engine cache, timelines are Parquet
committed with lake.commit.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from onnx import TensorProto, helper, numpy_helper
from ray import cloudpickle

from engines.model_card import file_sha256
from engines.ort_runner import OrtRunner
from engines.source import CachedEngine
from inference.emr_actors import ScoreActor
from lake.commit import atomic_partition
from lake.paths import LakePaths
from lake.schemas import PREVALENT_COLUMNS, TIMELINES
from preprocessing.eligibility import ENCOUNTER_ID

# Ray workers cannot import this test module; ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VOCAB_SIZE = 64
VOCAB_SHA256 = hashlib.sha256(b"scoring-test-vocabulary-v1").hexdigest()


def build_model(path: Path, mode: str = "good", seed: int = 0) -> Path:
    """A small real model: decayed mean of token embeddings + age + sex → 3 sigmoid heads.

    ``mode``: good | constant (every output 0.3) | nan (every output NaN) | shift (logits + 4).
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1.5, (VOCAB_SIZE, 3)).astype(np.float32), "w_tok"),
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 3)).astype(np.float32), "w_sex"),
        numpy_helper.from_array(rng.normal(0, 0.03, (1, 3)).astype(np.float32), "w_age"),
        numpy_helper.from_array(np.array([-1.0, -1.5, -2.0], np.float32), "bias"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(-1.0 / 365.0, np.float32), "neg_inv_year"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"),
        numpy_helper.from_array(np.array([0.3, 0.3, 0.3], np.float32), "const_p"),
    ]
    nodes = [
        helper.make_node("Gather", ["w_tok", "tokens"], ["emb"]),                     # [B,S,3]
        helper.make_node("Greater", ["tokens", "zero_i"], ["is_tok"]),
        helper.make_node("Cast", ["is_tok"], ["mask"], to=TensorProto.FLOAT),          # [B,S]
        helper.make_node("Mul", ["days_before", "neg_inv_year"], ["scaled"]),
        helper.make_node("Exp", ["scaled"], ["decay"]),
        helper.make_node("Mul", ["mask", "decay"], ["w"]),
        helper.make_node("Unsqueeze", ["w", "axis1_2"], ["w3"]),                       # [B,S,1]
        helper.make_node("Mul", ["emb", "w3"], ["wemb"]),
        helper.make_node("ReduceSum", ["wemb", "axis1"], ["summed"], keepdims=0),      # [B,3]
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),       # [B,1]
        helper.make_node("Add", ["count", "one"], ["denom"]),
        helper.make_node("Div", ["summed", "denom"], ["pooled"]),
        helper.make_node("Unsqueeze", ["age_years", "axis1"], ["age2"]),               # [B,1]
        helper.make_node("Mul", ["age2", "w_age"], ["age_term"]),
        helper.make_node("Gather", ["w_sex", "sex"], ["sex_term"]),                    # [B,3]
        helper.make_node("Add", ["pooled", "age_term"], ["l1"]),
        helper.make_node("Add", ["l1", "sex_term"], ["l2"]),
        helper.make_node("Add", ["l2", "bias"], ["logits"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axis1_2"))
    if mode == "good":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["probs"]))
    elif mode == "shift":
        nodes += [helper.make_node("Add", ["logits", "four"], ["shifted"]),
                  helper.make_node("Sigmoid", ["shifted"], ["probs"])]
    elif mode == "constant":
        nodes += [helper.make_node("Mul", ["logits", "zero_f"], ["zeros"]),
                  helper.make_node("Add", ["zeros", "const_p"], ["probs"])]
    elif mode == "nan":
        nodes += [helper.make_node("Sqrt", ["minus_one"], ["nan"]),
                  helper.make_node("Add", ["logits", "nan"], ["probs"])]
    else:
        raise ValueError(mode)
    graph = helper.make_graph(
        nodes, f"emr_risk_test_{mode}",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("days_before", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("age_years", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("sex", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# A calibration sidecar for the test model: sigmoid(a * logit(p) + b) per head.
PLATT = {"t2d": {"a": 2.0, "b": -1.0}, "ckd": {"a": 0.5, "b": 0.3}, "hf": {"a": 1.5, "b": -2.0}}


def write_card(onnx_path: Path, card_path: Path, calibration: dict[str, dict[str, float]] | None = None) -> Path:
    """A model card for the test model, in the engines package's format (with a Platt calibration
    sidecar when ``calibration`` gives its parameters)."""
    card = {
        "name": "emr_risk", "version": "test-1",
        "onnx": {"path": str(onnx_path), "sha256": file_sha256(onnx_path), "opset": 18},
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "days_before", "dtype": "float32", "shape": ["batch", "seq"]},
                   {"name": "age_years", "dtype": "float32", "shape": ["batch"]},
                   {"name": "sex", "dtype": "int64", "shape": ["batch"]}],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": ["batch", 3]}],
        "heads": ["t2d", "ckd", "hf"],
        "vocab": {"size": VOCAB_SIZE, "version": "test-v1", "sha256": VOCAB_SHA256},
        "profiles": {"batch": {"min": 1, "opt": 256, "max": 2048}, "seq": {"min": 1, "opt": 64, "max": 256}},
    }
    cal_id = None
    if calibration is not None:
        from engines.calibration import Calibration

        card["calibration"] = Calibration("platt", calibration, card["onnx"]["sha256"]).to_card()
        cal_id = card["calibration"]["id"]
    # Operating points as training records them (thresholds on this card's calibration's scale).
    card["operating_points"] = {"calibration_id": cal_id, "rule": {"name": "list_size_per_1000", "target": 100},
                                "heads": {h: {"threshold": 0.5} for h in ("t2d", "ckd", "hf")}}
    card_path.write_text(yaml.safe_dump(card))
    return card_path


def random_timelines(n: int, seed: int = 0, bad_rows: bool = False, max_len: int = 200,
                     min_age_years: float = 18.0) -> pa.Table:
    """Timelines with a long-tailed length distribution (schema lake.schemas.TIMELINES), ages
    uniform from ``min_age_years`` to 95."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(2.8, 1.0, n).astype(np.int64), max_len)
    lengths[rng.random(n) < 0.05] = 0
    tokens = [rng.integers(1, VOCAB_SIZE, int(k)).astype(np.int32) for k in lengths]
    days = [np.sort(rng.integers(0, 1800, int(k)))[::-1].astype(np.int32) for k in lengths]
    keys = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[:32] for i in range(n)]
    age = rng.uniform(min_age_years, 95, n).astype(np.float32)
    sex = rng.choice(["F", "M", "U"], n, p=[0.5, 0.45, 0.05])
    if bad_rows:
        lengths[1] = lengths[1] + 1           # length disagrees with the token list
        age[2] = np.nan                       # no age
        sex[3] = "X"                          # not F/M/U
        tokens[4] = np.full(300, 5, np.int32)  # longer than the largest bucket
        days[4] = np.zeros(300, np.int32)
        lengths[4] = 300
    return pa.table({
        "patient_key": pa.array(keys, pa.string()),
        "as_of": pa.array([dt.date(2024, 6, 30)] * n, pa.date32()),
        "length": pa.array(lengths, pa.int32()),
        "tokens": pa.array(tokens, pa.list_(pa.int32())),
        "days_before": pa.array(days, pa.list_(pa.int32())),
        "age_years": pa.array(age, pa.float32()),
        "sex": pa.array(sex, pa.string()),
        # What the features job writes beside the tokens (the encounter token's id is fixed).
        "encounters": pa.array([int(np.count_nonzero(t == ENCOUNTER_ID)) for t in tokens], pa.int32()),
        # Already diagnosed (what screening leaves out): a third of the patients per head.
        **{col: pa.array(rng.random(n) < 1 / 3, pa.bool_()) for col in PREVALENT_COLUMNS},
    }, schema=TIMELINES)


def commit_timelines(lake_root: Path, as_of: str, table: pa.Table, files: int = 3,
                     row_group_rows: int = 64, vocab_sha256: str = VOCAB_SHA256) -> Path:
    """Commit ``table`` as LAKE/emr/timelines/as_of=D in ``files`` Parquet files (like Spark's parts)."""
    final = LakePaths(lake_root).timelines(as_of)
    table = table.set_column(1, "as_of", pa.array([dt.date.fromisoformat(as_of)] * table.num_rows, pa.date32()))
    manifest = {"run_id": "test-features", "as_of": as_of,
                "vocabulary": {"version": "test-v1", "sha256": vocab_sha256, "size": VOCAB_SIZE}}
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    with atomic_partition(final, manifest) as staging:
        for i in range(files):
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]),
                           staging / f"part-{i:05d}.parquet", row_group_size=row_group_rows)
    return final


def reference_scores(onnx_path: Path, table: pa.Table) -> dict[str, np.ndarray]:
    """The engine alone, one unpadded row at a time: what each patient's scores must be."""
    runner = OrtRunner(onnx_path, providers=["CPUExecutionProvider"])
    runner.activate()
    out = {}
    sex_codes = {"U": 0, "F": 1, "M": 2}
    for row in table.to_pylist():
        k = max(1, len(row["tokens"]))
        tok = np.zeros((1, k), np.int64)
        day = np.zeros((1, k), np.float32)
        tok[0, :len(row["tokens"])] = row["tokens"]
        day[0, :len(row["days_before"])] = row["days_before"]
        p = runner.infer({"tokens": tok, "days_before": day, "age_years": np.array([row["age_years"]], np.float32),
                          "sex": np.array([sex_codes.get(row["sex"], 0)], np.int64)})["probs"][0]
        out[row["patient_key"]] = p
    runner.deactivate()
    return out


@dataclass(frozen=True)
class BrokenLowPrecision:
    """The real engine cache, except that ``precision`` loads a deliberately broken ONNX model.

    Stands in for an fp16/int8 engine that passed its gate but misbehaves on
    this night's data — what the QC gate and FP32 safe mode exist for.
    """

    inner: CachedEngine
    broken_onnx: str
    precision: str = "fp16"

    def load(self, precision: str) -> tuple[Any, dict[str, Any]]:
        if precision != self.precision:
            return self.inner.load(precision)
        _, meta = self.inner.load("fp32")
        meta = {**meta, "precision": precision, "fingerprint": f"ort-{precision}-broken"}
        return OrtRunner(Path(self.broken_onnx), providers=["CPUExecutionProvider"]), meta


@dataclass(frozen=True)
class SlowEngine:
    """The real engine cache's engine, each ``infer`` taking ``delay_s`` longer: a device section long
    enough that an actor running several calls at once (``ray.actor_threads``) must queue for it."""

    inner: CachedEngine
    delay_s: float = 0.03

    def load(self, precision: str) -> tuple[Any, dict[str, Any]]:
        runner, meta = self.inner.load(precision)
        return SlowRunner(runner, self.delay_s), meta


class SlowRunner:
    """Delegates to a real runner; ``infer`` sleeps first and fails if two calls are ever inside at once."""

    def __init__(self, inner: Any, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self._inside = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._inside.acquire(blocking=False):
            raise RuntimeError("two engine calls ran at once in one actor")
        try:
            time.sleep(self.delay_s)
            return self.inner.infer(feed)
        finally:
            self._inside.release()


def crash_once_actor(marker: Path, crash_on_call: int) -> type:
    """A ScoreActor that kills its own process on its Nth call or later, in its first life only, once an
    earlier call of that life has returned (with ``ray.actor_threads`` > 1 calls overlap: the crash must
    not depend on which of them finishes first)."""

    class CrashOnceActor(ScoreActor):
        returned = 0

        def score(self, block):
            if self.calls + 1 >= crash_on_call and self.returned and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            out = super().score(block)
            self.returned += 1
            return out

    return CrashOnceActor


def crash_while_armed_actor(armed: Path) -> type:
    """A ScoreActor whose process dies on every call while ``armed`` exists, in every life: what a
    GPU that keeps failing does to a run."""

    class CrashWhileArmedActor(ScoreActor):
        def score(self, block):
            if armed.exists():
                os._exit(1)
            return super().score(block)

    return CrashWhileArmedActor


def marked_parts(final: Path) -> dict[str, int]:
    """Staged fragment files the driver marked done (name → mtime): what a resume keeps.

    Actors write fragments themselves, so a stopped run can leave a fragment file
    that was never marked; such files are scored again on resume and do not count.
    """
    marked = {f"part-{m.name.split('.')[0]}.parquet" for m in final.parent.glob(".staging-*/_work/*.done.json")}
    return {p.name: p.stat().st_mtime_ns for p in final.parent.glob(".staging-*/part-*.parquet")
            if p.name in marked}


def same_verdict(merged: dict, full: dict) -> None:
    """Identical verdicts and reasons; the same numbers (std and mean to float rounding)."""
    assert (merged["passed"], merged["reasons"], merged["reference"], merged["psi_checked"]) == \
        (full["passed"], full["reasons"], full["reference"], full["psi_checked"])
    assert len(merged["checks"]) == len(full["checks"])
    for a, b in zip(merged["checks"], full["checks"]):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        if a["check"] == "collapsed":
            assert a["value"] == pytest.approx(b["value"], rel=1e-9, nan_ok=True)
        else:
            assert a["value"] == b["value"] or (a["value"] != a["value"] and b["value"] != b["value"]), a

