"""Benchmark: end-to-end EMR scoring (Parquet timelines in → committed Parquet scores out).

Compares, in one run and on the same engine and data:

- ``records_per_s``: medscreen's pipeline (inference.emr.score: token-budget
  batches pre-padded by CPU tasks, engine actors that only infer, commit, QC,
  screening, report);
- ``baseline_records_per_s``: a naive Ray Data pipeline (read_parquet →
  map_batches with a fixed batch size of 256 rows, pandas batches, every row
  padded in Python to max_tokens, no length bucketing → write_parquet);
- ``engine_only_records_per_s``: the engine alone on preloaded, pre-padded
  arrays (the ceiling); ``efficiency`` = records_per_s / engine_only;
  ``--engine-in-ray-worker`` times it again inside a Ray worker holding the
  engine actor's resources;
- with ``--ray-timeline``, ``pipeline.timeline``: where the end-to-end seconds
  went by Ray's task events (until the engine actors' first call, time inside
  and between their calls, the tail after the last fragment was written), and
  the events themselves as ``ray_timeline.json`` (Chrome tracing) in the
  workdir.

Runs unchanged on a CPU machine (ONNX Runtime CPU EP, fractional-CPU actors)
and on a GPU machine with onnxruntime-gpu (CUDA EP, ray.actors_per_gpu actors per
GPU); ``--backend inductor`` scores with the inductor plan (``auto`` tries ONNX Runtime first). It generates its own timelines and uses the committed model
(models/emr_risk/emr_risk.onnx, via the engine cache) or, when that is
absent, a small model it builds. Prints one JSON object last.

    python bench/emr_scoring.py --quick
    python bench/emr_scoring.py --rows 1000000 --precision fp16
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conf.settings import CONF_DIR, Settings, load_settings  # noqa: E402
from inference.fragments import DEFAULT_FRAGMENT_ROWS  # noqa: E402
from lake.commit import atomic_partition  # noqa: E402
from lake.paths import LakePaths  # noqa: E402
from lake.schemas import LABEL_COLUMNS, PREVALENT_COLUMNS, TIMELINES, TIMELINES_WITH_LABELS  # noqa: E402
from preprocessing.eligibility import ENCOUNTER_ID  # noqa: E402
from reporting import emit, reported  # noqa: E402  (bench/, beside this script)

AS_OF = "2024-06-30"
# A small labelled partition the engines are gated on before the scoring run (the scored
# partition, like a nightly one, has no labels).
GATE_AS_OF = "2024-03-31"
GATE_ROWS = 4_000
NAIVE_BATCH_ROWS = 256


def log(msg: str) -> None:
    print(f"[bench emr_scoring] {msg}", file=sys.stderr, flush=True)


# --- model ------------------------------------------------------------------------------------

def _tiny_model(path: Path, vocab_size: int) -> Path:
    """A small stand-in with the EMR I/O contract (embedding mean + linear + sigmoid)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (vocab_size, 3)).astype(np.float32), "w_tok"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 3)).astype(np.float32), "w_sex"),
             numpy_helper.from_array(rng.normal(0, 0.02, (1, 3)).astype(np.float32), "w_age"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(-1 / 365, np.float32), "k"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Gather", ["w_tok", "tokens"], ["e"]),
             helper.make_node("Greater", ["tokens", "zero"], ["m0"]),
             helper.make_node("Cast", ["m0"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["days_before", "k"], ["d0"]),
             helper.make_node("Exp", ["d0"], ["d"]),
             helper.make_node("Mul", ["m", "d"], ["w"]),
             helper.make_node("Unsqueeze", ["w", "ax2"], ["w3"]),
             helper.make_node("Mul", ["e", "w3"], ["we"]),
             helper.make_node("ReduceSum", ["we", "ax1"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["m", "ax1"], ["c"], keepdims=1),
             helper.make_node("Add", ["c", "one"], ["c1"]),
             helper.make_node("Div", ["s", "c1"], ["p"]),
             helper.make_node("Unsqueeze", ["age_years", "ax1"], ["a"]),
             helper.make_node("Mul", ["a", "w_age"], ["at"]),
             helper.make_node("Gather", ["w_sex", "sex"], ["st"]),
             helper.make_node("Add", ["p", "at"], ["l1"]),
             helper.make_node("Add", ["l1", "st"], ["l"]),
             helper.make_node("Sigmoid", ["l"], ["probs"])]
    graph = helper.make_graph(nodes, "emr_risk_bench", [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("days_before", TensorProto.FLOAT, ["batch", "seq"]),
        helper.make_tensor_value_info("age_years", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("sex", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def prepare_model(workdir: Path, model: str = "committed") -> tuple[Path, dict[str, Any], str]:
    """A model card in ``workdir`` for the committed model (or a stand-in); returns (card, vocab, source).

    ``model="standin"`` takes the tiny stand-in even when the committed model is
    present: an engine so fast that the pipeline's own overhead dominates.
    """
    from engines.model_card import file_sha256

    committed = CONF_DIR / "models" / "emr_risk.yaml"
    card: dict[str, Any] | None = None
    if model == "committed" and committed.is_file():
        card = yaml.safe_load(committed.read_text())
        onnx_path = Path(card["onnx"]["path"])
        onnx_path = onnx_path if onnx_path.is_absolute() else REPO / onnx_path
        if not onnx_path.is_file():
            card = None
    if card is None:
        vocab_size = 512
        onnx_path = _tiny_model(workdir / "emr_risk_bench.onnx", vocab_size)
        card = {"name": "emr_risk", "version": "bench-standin",
                "inputs": [], "outputs": [], "vocab": {"size": vocab_size}}
        source = "bench stand-in" + (" (committed model absent)" if model == "committed" else "")
    else:
        source = f"committed {card['version']}"
    vocab = dict(card.get("vocab") or {})
    vocab.setdefault("size", int((card.get("architecture") or {}).get("vocab_size", 512)))
    # An untrained export records no vocabulary hash; the bench's timelines and engine share a made-up one.
    vocab["sha256"] = vocab.get("sha256") or hashlib.sha256(b"bench-vocabulary").hexdigest()
    vocab["version"] = vocab.get("version") or "bench"
    card.update({"onnx": {**(card.get("onnx") or {}), "path": str(onnx_path), "sha256": file_sha256(onnx_path)},
                 "vocab": vocab})
    card.setdefault("inputs", [])
    card.setdefault("outputs", [])
    path = workdir / "emr_risk_card.yaml"
    path.write_text(yaml.safe_dump(card))
    return path, vocab, source


# --- data -------------------------------------------------------------------------------------

def generate_timelines(lake_root: Path, rows: int, vocab: dict[str, Any], max_tokens: int,
                       files: int = 8, row_group_rows: int = 16_384, seed: int = 0,
                       as_of: str = AS_OF, labels_from: Any = None) -> Path:
    """Committed timelines with a long-tailed length distribution, built without per-row Python.

    ``labels_from`` (an fp32 reference runner): add label columns drawn from its own scores
    (the top 30 % per head positive, 10 % flipped), so an engine gate has a real AUC to keep.
    """
    rng = np.random.default_rng(seed)
    # Most patients have a few dozen events, a tail reaches max_tokens; ~4% have none.
    lengths = np.minimum(rng.lognormal(3.3, 1.0, rows), max_tokens).astype(np.int32)
    lengths[rng.random(rows) < 0.04] = 0
    offsets = np.zeros(rows + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    tokens = rng.integers(1, int(vocab["size"]), total, dtype=np.int32)
    days = rng.integers(0, 1825, total, dtype=np.int32)
    keys = np.char.mod("%032x", np.arange(rows, dtype=np.int64) * 2654435761 % (1 << 61))
    table = pa.table({
        "patient_key": pa.array(keys.astype(str), pa.string()),
        "as_of": pa.array(np.full(rows, np.datetime64(AS_OF, "D"))).cast(pa.date32()),
        "length": pa.array(lengths, pa.int32()),
        "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
        "days_before": pa.ListArray.from_arrays(pa.array(offsets), pa.array(days)),
        "age_years": pa.array(rng.uniform(18, 95, rows).astype(np.float32)),
        "sex": pa.array(rng.choice(np.array(["F", "M", "U"]), rows, p=[0.5, 0.47, 0.03]).astype(str)),
        "encounters": pa.array(np.bincount(np.repeat(np.arange(rows), lengths)[tokens == ENCOUNTER_ID],
                                           minlength=rows).astype(np.int32)),
        **{c: pa.array(rng.random(rows) < 0.2) for c in PREVALENT_COLUMNS},  # already diagnosed: not screened
    }).cast(TIMELINES).set_column(1, "as_of", pa.array(np.full(rows, np.datetime64(as_of, "D"))).cast(pa.date32()))
    if labels_from is not None:
        from engines import gate as gate_mod, samples

        probs = gate_mod.run_batches(labels_from, samples.feed_batches(table, max_tokens), rows)
        positive = probs > np.quantile(probs, 0.7, axis=0)
        positive ^= rng.random(positive.shape) < 0.1
        for j, c in enumerate(LABEL_COLUMNS):
            table = table.append_column(c, pa.array(positive[:, j].astype(np.int8)))
        table = table.cast(TIMELINES_WITH_LABELS)
    final = LakePaths(lake_root).timelines(as_of)
    manifest = {"run_id": "bench", "as_of": as_of,
                "vocabulary": {"sha256": vocab["sha256"], "version": vocab["version"], "size": vocab["size"]}}
    bounds = np.linspace(0, rows, files + 1).astype(int)
    with atomic_partition(final, manifest) as staging:
        for i in range(files):
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), staging / f"part-{i:05d}.parquet",
                           row_group_size=row_group_rows)
    return final


# --- the three measurements -------------------------------------------------------------------

def engine_only(settings: Settings, timelines: Path, precision: str) -> dict[str, Any]:
    """The engine alone over every batch, arrays already padded and in memory."""
    from engines import cache
    from inference.batching import pack_fragment

    table = pa.concat_tables(pq.read_table(f) for f in sorted(timelines.glob("*.parquet")))
    batches = pack_fragment(table, 0, settings.scoring.length_buckets, settings.scoring.token_budget)
    runner, meta = cache.load_runner(settings, precision=precision)
    runner.activate()
    try:
        runner.infer(batches[len(batches) // 2].feed())  # warm-up (kernel selection, allocations)
        rows = 0
        start = time.perf_counter()
        for b in batches:
            if b.n_rows:
                runner.infer(b.feed())
                rows += b.n_rows
        elapsed = time.perf_counter() - start
        providers = list(getattr(runner, "active_providers", []) or [])
    finally:
        runner.deactivate()
    return {"records_per_s": rows / elapsed, "rows": rows, "seconds": elapsed, "metadata": meta,
            "providers": providers}


def engine_only_in_ray_worker(settings: Settings, timelines: Path, precision: str) -> dict[str, Any]:
    """:func:`engine_only` in a Ray worker process holding the engine actor's resources (``num_gpus``,
    ``num_cpus``, its environment): tells the worker's setting apart from the pipeline's concurrency
    when the engine runs slower inside the pipeline than alone."""
    import ray

    from inference.actors import engine_actor_pool

    _, resources = engine_actor_pool(settings, int(ray.cluster_resources().get("GPU", 0)), 1)
    out = ray.get(ray.remote(**resources)(engine_only).remote(settings, timelines, precision))
    return {"records_per_s": out["records_per_s"], "seconds": out["seconds"], "providers": out["providers"]}


class NaiveScorer:
    """The usual first attempt: fixed-size pandas batches, pad every row in Python to max_tokens."""

    def __init__(self, settings: Settings, precision: str):
        from engines import cache

        self.runner, _ = cache.load_runner(settings, precision=precision)
        self.runner.activate()
        self.max_tokens = settings.features.max_tokens

    def __call__(self, df):
        n = len(df)
        tokens = np.zeros((n, self.max_tokens), np.int64)
        days = np.zeros((n, self.max_tokens), np.float32)
        for i, (t, d) in enumerate(zip(df["tokens"], df["days_before"])):
            k = min(len(t), self.max_tokens)
            tokens[i, :k] = t[:k]
            days[i, :k] = d[:k]
        sex = df["sex"].map({"F": 1, "M": 2}).fillna(0).astype(np.int64).to_numpy()
        probs = self.runner.infer({"tokens": tokens, "days_before": days,
                                   "age_years": df["age_years"].to_numpy(np.float32), "sex": sex})["probs"]
        out = df[["patient_key"]].copy()
        for j, head in enumerate(("t2d", "ckd", "hf")):
            out[f"score_{head}"] = probs[:, j]
        return out


def naive_pipeline(settings: Settings, timelines: Path, out_dir: Path, precision: str) -> dict[str, Any]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1, "num_cpus": settings.ray.actor_num_cpus} if gpus \
        else {"num_cpus": settings.ray.actor_num_cpus}
    start = time.perf_counter()
    ds = ray.data.read_parquet(str(timelines))
    ds = ds.map_batches(NaiveScorer, fn_constructor_kwargs={"settings": settings, "precision": precision},
                        batch_size=NAIVE_BATCH_ROWS, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=max(1, gpus)), **resources)
    ds.write_parquet(str(out_dir))
    elapsed = time.perf_counter() - start
    rows = sum(pq.read_metadata(f).num_rows for f in out_dir.glob("*.parquet"))
    return {"records_per_s": rows / elapsed, "rows": rows, "seconds": elapsed}


def medscreen_pipeline(settings: Settings, fragment_rows: int) -> dict[str, Any]:
    from inference import emr

    started_at = time.time()
    start = time.perf_counter()
    run_dir = emr.score(settings, AS_OF, fragment_rows=fragment_rows)
    elapsed = time.perf_counter() - start
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"records_per_s": m["throughput"]["rows_scored"] / elapsed, "seconds": elapsed,
            "started_at": started_at,
            "rows": m["throughput"]["rows_scored"], "metrics": m["throughput"], "settings": m["settings"],
            "qc_passed": m["qc"]["passed"]}


def _spans(events: list[dict[str, Any]], category_suffix: str) -> list[dict[str, Any]]:
    """Ray's complete events (``ph`` X) of one kind of task or call, by the end of their category
    (``.score``: the engine actors' calls; ``pack_fragments``, ``write_fragments``: the tasks)."""
    return [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).endswith(category_suffix)]


def settled_timeline(calls: int, wait_s: float = 20.0) -> list[dict[str, Any]]:
    """``ray.timeline()`` once it holds all ``calls`` engine calls: workers report task events in
    batches, the last ones after the run has returned."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        events = ray.timeline()
        if len(_spans(events, ".score")) >= calls or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


# Ray's phases of a task or call, as they are reported in the timeline.
_PHASES = {"task:deserialize_arguments": "deserialize_args_s", "task:execute": "execute_s",
           "task:store_outputs": "store_outputs_s"}


def call_timeline(events: list[dict[str, Any]], started_at: float, seconds: float) -> dict[str, Any]:
    """Where an end-to-end run's seconds went, from Ray's task profile events (``ray.timeline()``):
    until the engine actors' first ``score`` call began, the span of their calls (time inside calls,
    of which Ray's argument deserialisation and output storing, and the actor idle between calls),
    the pack and writer tasks, and the tail after the last fragment was written. Seconds, relative to
    the run's start (``started_at``, epoch)."""
    t0 = started_at * 1e6  # the events' ts and dur are microseconds, ts since the epoch
    workers: dict[str, list[dict[str, Any]]] = {}
    for e in _spans(events, ".score"):
        workers.setdefault(e["tid"], []).append(e)
    if not workers:
        return {}
    out: dict[str, Any] = {"actors": []}
    for tid, calls in workers.items():
        calls.sort(key=lambda e: e["ts"])
        windows = [(c["ts"], c["ts"] + c["dur"]) for c in calls]
        # The actor's process runs nothing but its __init__ and its calls: phases from the first
        # call on are the calls'.
        inside = {v: 0.0 for v in _PHASES.values()}
        for e in events:
            if e.get("tid") == tid and e.get("name") in _PHASES and e["ts"] >= windows[0][0]:
                inside[_PHASES[e["name"]]] += e["dur"] / 1e6
        gaps = [(b[0] - a[1]) / 1e6 for a, b in zip(windows, windows[1:])]
        out["actors"].append({
            "calls": len(calls), "first_call_s": round((windows[0][0] - t0) / 1e6, 3),
            "last_call_end_s": round((windows[-1][1] - t0) / 1e6, 3),
            "in_calls_s": round(sum(b - a for a, b in windows) / 1e6, 3),
            **{k: round(v, 3) for k, v in inside.items()},
            "idle_between_calls_s": round(sum(max(g, 0.0) for g in gaps), 3),
            "idle_gap_max_s": round(max(gaps, default=0.0), 3)})
    last_end = max(a["last_call_end_s"] for a in out["actors"])
    for cat, key in (("pack_fragments", "pack"), ("write_fragments", "write")):
        tasks = _spans(events, cat)
        if tasks:
            ends = [(e["ts"] + e["dur"] - t0) / 1e6 for e in tasks]
            out[f"{key}_tasks"] = {"n": len(tasks), "sum_s": round(sum(e["dur"] for e in tasks) / 1e6, 3),
                                   "first_end_s": round(min(ends), 3), "last_end_s": round(max(ends), 3)}
            if key == "write":
                last_end = max(last_end, max(ends))
    # After the last fragment was scored and written: the driver's marking, stats, commit, screening,
    # report. (An actor killed at the end of the feed may not have reported its last call's events:
    # the last writer task's end stands for it.)
    out["tail_s"] = round(seconds - last_end, 3)
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host_cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers_available"] = ort.get_available_providers()
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            info["gpus"] = "nvidia-smi failed"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300_000, help="timelines to generate (default 300k)")
    p.add_argument("--quick", action="store_true", help="a small run (8k rows) that finishes in minutes even on 2 CPUs")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--token-budget", type=int, default=None, help="override scoring.token_budget")
    p.add_argument("--fragment-rows", type=int, default=DEFAULT_FRAGMENT_ROWS,
                   help="rows per fragment (unit of CPU packing, output files and resume; default the "
                        f"pipeline's, {DEFAULT_FRAGMENT_ROWS})")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--model", default="committed", choices=["committed", "standin"],
                   help="committed: models/emr_risk (a stand-in when absent); standin: the tiny stand-in, "
                        "so pipeline overhead rather than the engine dominates")
    p.add_argument("--skip-baseline", action="store_true", help="skip the naive Ray Data baseline")
    p.add_argument("--backend", choices=["auto", "inductor", "onnxruntime"], default="auto",
                   help="engines.backend: auto = ONNX Runtime, then the inductor plan where torch sees a GPU "
                        "(engines.cache.key.backend_candidates); the engine used is named in the JSON")
    p.add_argument("--actors-per-gpu", type=int, default=None,
                   help="override ray.actors_per_gpu (engine actors sharing each GPU)")
    p.add_argument("--actor-threads", type=int, default=None,
                   help="override ray.actor_threads (calls one engine actor runs at once; the device one at a time)")
    p.add_argument("--fragment-writers", choices=["actor", "tasks"], default=None,
                   help="override ray.fragment_writers (who writes a scored fragment: the engine actor or "
                        "CPU tasks beside it)")
    p.add_argument("--inductor-compile", choices=["per_shape", "dynamic"], default=None,
                   help="override engines.inductor_compile (one compile per scoring shape, or one dynamic compile)")
    p.add_argument("--engine-in-ray-worker", action="store_true",
                   help="also time the engine alone inside a Ray worker with the engine actor's resources")
    p.add_argument("--ray-timeline", action="store_true",
                   help="also report where the pipeline's seconds went by Ray's task events: start-up until "
                        "the engine actors' first call, time in and between their calls, the tail")
    p.add_argument("--graph", choices=["auto", "fused", "reference"], default="auto",
                   help="engines.graph: the card's fused contrib-op graph or the reference export")
    args = p.parse_args(argv)
    rows = 8_000 if args.quick else args.rows

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MEDSCREEN_PSEUDONYM_KEY", "bench-only-key-not-for-patient-data")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medscreen-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bench": "emr_scoring", "rows": rows, "quick": args.quick,
                              "fragment_rows": args.fragment_rows,
                              "precision": args.precision, "backend_requested": args.backend,
                              "machine": machine()}
    import ray

    with reported(result, workdir, keep_workdir=args.workdir is not None):
        card, vocab, model_source = prepare_model(workdir, args.model)
        overrides: dict[str, Any] = {"lake.root": str(workdir / "lake"), "models": {"emr_risk": str(card)},
                                     "engines.cache_dir": str(workdir / "engines"),
                                     "engines.precision": args.precision, "ray.address": args.ray_address,
                                     "scoring.token_budget": args.token_budget, "engines.graph": args.graph,
                                     "engines.backend": args.backend, "ray.actors_per_gpu": args.actors_per_gpu,
                                     "ray.actor_threads": args.actor_threads,
                                     "ray.fragment_writers": args.fragment_writers,
                                     "engines.inductor_compile": args.inductor_compile}
        if model_source.startswith("bench stand-in"):
            # The stand-in's card has no operating points: the screening list needs thresholds.
            overrides["scoring.screening_thresholds"] = {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}
        settings = load_settings(overrides)
        from engines import cache
        from engines.hardware import gpu_info

        # The token budget the pipeline resolves for a cluster with (or without) GPUs, so the engine
        # alone runs the same batches (inference.emr.on_cluster_devices).
        settings = settings.on_device(gpu_info() is not None)
        result["token_budget"] = settings.scoring.token_budget

        log(f"engine: {model_source}; gating lake of {GATE_ROWS} labelled timelines")
        with cache.reference_runner(settings) as reference:
            generate_timelines(settings.lake.root, GATE_ROWS, vocab, settings.features.max_tokens, files=1,
                               seed=1, as_of=GATE_AS_OF, labels_from=reference)
        log(f"building/gating {args.precision} ({args.backend} backend, {settings.engines.graph} graph) "
            "in the engine cache")
        cache.ensure(settings, precision=args.precision, as_of=GATE_AS_OF)
        log(f"generating {rows} timelines")
        timelines = generate_timelines(settings.lake.root, rows, vocab, settings.features.max_tokens,
                                       row_group_rows=min(args.fragment_rows, 65_536))

        eng = engine_only(settings, timelines, args.precision)
        meta = eng.pop("metadata")
        result["engine"] = {"model": model_source, "backend": meta.get("backend"), "graph": meta.get("graph"),
                            "compile_mode": meta.get("compile_mode"), "shapes": meta.get("shapes"),
                            "gate_passed": (meta.get("gate") or {}).get("passed"),
                            "precision": meta.get("precision"), "fingerprint": meta.get("fingerprint"),
                            "providers": eng.pop("providers"), "platform": (meta.get("platform") or {}).get("id")}
        result["engine_only_records_per_s"] = round(eng["records_per_s"], 1)
        log(f"engine alone: {eng['records_per_s']:,.0f} records/s")

        t_ray = time.perf_counter()
        if args.ray_address:
            ray.init(address=args.ray_address, configure_logging=False)
        else:
            ray.init(include_dashboard=False, configure_logging=False)
        # Started here, so the pipeline's own start-up (metrics "startup") shows none of it.
        result["ray_init_s"] = round(time.perf_counter() - t_ray, 3)
        result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        ours = medscreen_pipeline(settings, args.fragment_rows)
        # What the run itself recorded (its metrics' settings), not what this script expects it to do.
        result["actors"] = {k: ours["settings"].get(k) for k in ("actors_per_gpu", "actor_threads",
                                                                 "fragment_writers")}
        result["records_per_s"] = round(ours["records_per_s"], 1)
        result["pipeline"] = {k: ours["metrics"].get(k) for k in (
            "records_per_s", "device_records_per_s", "padding_efficiency", "batches", "mean_rows_per_batch",
            "latency", "actors", "actor_restarts", "time_to_first_batch_s", "host_s_total",
            "prep_s_total", "device_s_total", "device_wait_s_total", "driver", "startup")}
        result["pipeline"]["seconds_end_to_end"] = round(ours["seconds"], 2)
        result["qc_passed"] = ours["qc_passed"]
        log(f"medscreen pipeline: {ours['records_per_s']:,.0f} records/s")
        if args.ray_timeline:
            events = settled_timeline(ours["metrics"]["fragments"])
            # Chrome tracing format (chrome://tracing, Perfetto): every task's and call's phases.
            (workdir / "ray_timeline.json").write_text(json.dumps(events))
            result["pipeline"]["timeline"] = call_timeline(events, ours["started_at"], ours["seconds"])
        if args.engine_in_ray_worker:
            in_worker = engine_only_in_ray_worker(settings, timelines, args.precision)
            result["engine_in_ray_worker_records_per_s"] = round(in_worker["records_per_s"], 1)
            log(f"engine alone in a Ray worker: {in_worker['records_per_s']:,.0f} records/s")

        if not args.skip_baseline:
            naive = naive_pipeline(settings, timelines, workdir / "naive_out", args.precision)
            result["baseline_records_per_s"] = round(naive["records_per_s"], 1)
            result["baseline"] = {"name": f"naive Ray Data map_batches, batch_size={NAIVE_BATCH_ROWS}, "
                                          "pad to max_tokens, no bucketing", "seconds": round(naive["seconds"], 2),
                                  "rows": naive["rows"]}
            result["speedup_vs_baseline"] = round(ours["records_per_s"] / naive["records_per_s"], 2)
            log(f"naive baseline: {naive['records_per_s']:,.0f} records/s")
        result["efficiency"] = round(ours["records_per_s"] / eng["records_per_s"], 4)
    return emit(result)


if __name__ == "__main__":
    raise SystemExit(main())
