"""The two callables of the EMR scoring pipeline: a CPU packer and the engine actor.

``pack_fragments`` runs as plain Ray tasks (CPU): read one fragment of the
timelines partition, validate, length-sort, pad into token-budget batches.
``ScoreActor`` holds one engine for its whole life: ``__init__`` loads and
activates it once, ``__call__`` only feeds pre-padded arrays to ``infer``.
Both are plain Python (Ray is consulted only to name the actor); the pipeline
builder in :mod:`inference.emr` wires them into Ray Data.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.settings import Settings
from engines.runner import Runner
from inference.batching import batch_from_table, batches_to_table, pack_fragment

TIMELINE_COLUMNS = ["patient_key", "length", "tokens", "days_before", "age_years", "sex"]


class EngineSource(Protocol):
    """Where actors get their engine: ``load`` returns a runner (not yet activated) and its metadata."""

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]: ...


@dataclass(frozen=True)
class CachedEngine:
    """The engine cache (:mod:`engines.cache`): gated engines only, unless forced."""

    settings: Settings
    model: str = "emr_risk"
    backend: str | None = None
    force_ungated: bool = False

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]:
        from engines import cache

        return cache.load_runner(self.settings, model=self.model, backend=self.backend,
                                 precision=precision, force_ungated=self.force_ungated)


@dataclass(frozen=True)
class FragmentSpec:
    """A unit of work and of resume: row groups of one Parquet file of the timelines partition."""

    fragment: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int  # the first num_rows rows of those row groups (fewer than all only under a limit)


def engine_actor_pool(settings: Settings, gpus: int) -> tuple[int, dict[str, float]]:
    """Size and per-actor resources of an engine actor pool (EMR and CT scoring).

    With GPUs, ``ray.actors_per_gpu`` actors share each one, so one actor's host
    work overlaps another's kernels; without, actors take fractional CPUs so a
    pool cannot starve the read tasks. ``ray.num_actors`` overrides the size.
    """
    if gpus:
        per_gpu = settings.ray.actors_per_gpu
        return (settings.ray.num_actors or gpus * per_gpu,
                {"num_gpus": 1 / per_gpu, "num_cpus": settings.ray.actor_num_cpus})
    return settings.ray.num_actors or 1, {"num_cpus": settings.ray.actor_num_cpus}


def pack_fragments(specs: pa.Table, length_buckets: list[int], token_budget: int,
                   vocab_size: int | None = None) -> pa.Table:
    """Ray Data batch fn (CPU task): fragment specs in, one row per padded batch out."""
    out = []
    for row in specs.to_pylist():
        table = pq.ParquetFile(row["path"]).read_row_groups(list(row["row_groups"]), columns=TIMELINE_COLUMNS)
        # A fragment cut by a row limit takes only the first num_rows of its row groups.
        table = table.slice(0, int(row["num_rows"]))
        out.append(batches_to_table(pack_fragment(table, int(row["fragment"]), length_buckets,
                                                  token_budget, vocab_size)))
    return pa.concat_tables(out) if out else batches_to_table([])


class ScoreActor:
    """Holds one activated engine; ``__call__`` scores every padded batch of a block.

    Output rows carry the batch identity, the keys (passed through untouched),
    the probabilities as a float32 buffer, and timings split into host (decode)
    and device (``infer``) time.
    """

    def __init__(self, source: EngineSource, precision: str):
        self.runner, self.metadata = source.load(precision)
        self.fingerprint = str(self.metadata.get("fingerprint"))
        self.runner.activate()
        # A restarted actor runs __init__ again: a fresh incarnation id under the same actor id.
        self.incarnation = uuid.uuid4().hex[:12]
        self.actor_id = _actor_id()
        self.calls = 0

    def __call__(self, block: pa.Table) -> pa.Table:
        self.calls += 1
        probs, host_s, device_s, done_at = [], [], [], []
        for i in range(block.num_rows):
            t0 = time.perf_counter()
            batch = batch_from_table(block, i)
            feed = batch.feed()
            t1 = time.perf_counter()
            if batch.n_rows:
                p = np.asarray(self.runner.infer(feed)["probs"], dtype=np.float32)
                if p.shape != (batch.n_rows, 3):
                    raise ValueError(f"engine returned probs of shape {p.shape} for a batch of "
                                     f"{batch.n_rows} rows; the model must output [batch, 3]")
            else:
                p = np.zeros((0, 3), np.float32)
            t2 = time.perf_counter()
            probs.append(np.ascontiguousarray(p).tobytes())
            host_s.append(t1 - t0)
            device_s.append(t2 - t1)
            done_at.append(time.time())
        keep = ["fragment", "batch_index", "n_batches", "n_rows", "seq_len", "real_tokens", "prep_s",
                "key_width", "keys", "qkey_width", "quarantine_keys", "qreason_width", "quarantine_reasons"]
        n = block.num_rows
        return block.select(keep).append_column("probs", pa.array(probs, pa.large_binary())) \
            .append_column("host_s", pa.array(host_s, pa.float64())) \
            .append_column("device_s", pa.array(device_s, pa.float64())) \
            .append_column("done_at", pa.array(done_at, pa.float64())) \
            .append_column("actor_id", pa.array([self.actor_id] * n, pa.string())) \
            .append_column("engine_fingerprint", pa.array([self.fingerprint] * n, pa.string())) \
            .append_column("incarnation", pa.array([self.incarnation] * n, pa.string()))

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            try:
                runner.deactivate()
            except Exception:  # noqa: BLE001 — best effort at interpreter teardown
                pass


def _actor_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # noqa: BLE001 — outside Ray (benchmarks, unit use)
        return f"pid-{os.getpid()}"
