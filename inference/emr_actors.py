"""The EMR scoring pipeline's callables: a CPU packer, the engine actor and a CPU fragment writer.

``pack_fragments`` runs as plain Ray tasks (CPU): read one fragment of the
timelines partition, validate, length-sort, pad into token-budget batches,
and ship them as one row per fragment. ``ScoreActor`` holds one engine for its
whole life (the shared lifecycle of :class:`inference.actors.EngineActor`);
``score`` feeds a fragment's pre-padded arrays to ``infer``. Where the
fragment is written depends on ``ray.fragment_writers``: by ``write_fragments``
CPU tasks beside the actor (the default), to which the actor hands the
fragment's scores (:class:`ScoredFragment`) so that its process does nothing
but feed the device, or by the actor itself
(:class:`inference.fragments.FragmentSink`), returning only a small marker
record. Either way the scored rows never pass through
the driver. :mod:`inference.emr_feed` wires them together with Ray tasks and actors.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engines.source import EngineSource
from inference.actors import EngineActor
from inference.batching import batches_to_table, binary_column, iter_batches, pack_fragment
from inference.fragments import FragmentSink
from lake.schemas import PREVALENT_COLUMNS
from preprocessing.eligibility import encounters_of

TIMELINE_COLUMNS = ["patient_key", "length", "tokens", "days_before", "age_years", "sex"]
# Read beside them where the partition has them: the eligibility facts screening needs.
FACT_COLUMNS = ["encounters", *PREVALENT_COLUMNS]
UNKNOWN_FACT = np.uint8(0x80)
# The GIL switch interval of a threaded engine actor (Python's default is 5 ms). A call leaving the
# device (a synchronise releases the GIL) waits for the GIL while another call runs Python code, up to
# one interval (with the default, on an H200, a batch's device section took 9.3 ms in the pipeline
# against 6.9 ms for the ORT engine alone, 8.5 ms at 0.2 ms; docs/benchmarks.md).
THREADED_SWITCH_INTERVAL_S = 0.0002


PACKED_SCHEMA = pa.schema([("fragment", pa.int32()), ("rows_in", pa.int64()), ("n_batches", pa.int32()),
                           ("batches", pa.large_binary())])


def pack_fragments(spec: dict[str, Any], length_buckets: list[int], token_budget: int,
                   vocab_size: int | None = None) -> pa.Table:
    """CPU task: one fragment of the timelines partition (a :func:`inference.fragments.spec_dicts`
    entry) in, one :data:`PACKED_SCHEMA` row out.

    ``batches`` holds the fragment's padded batches (:func:`inference.batching.batches_to_table`)
    as one Arrow IPC stream, so a fragment reaches one actor whole and that actor can write it.
    """
    f = pq.ParquetFile(spec["path"])
    present = set(f.schema_arrow.names)
    table = f.read_row_groups(list(spec["row_groups"]),
                              columns=TIMELINE_COLUMNS + [c for c in FACT_COLUMNS if c in present])
    # A fragment cut by a row limit takes only the first num_rows of its row groups.
    table = table.slice(0, int(spec["num_rows"]))
    batches = batches_to_table(pack_fragment(table, int(spec["fragment"]), length_buckets,
                                             token_budget, vocab_size, facts=eligibility_facts(table)))
    return pa.table({"fragment": pa.array([int(spec["fragment"])], pa.int32()),
                     "rows_in": pa.array([int(spec["num_rows"])], pa.int64()),
                     "n_batches": pa.array([batches.num_rows], pa.int32()),
                     "batches": binary_column([_ipc(batches)])}, schema=PACKED_SCHEMA)


def eligibility_facts(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per timeline row, encounter tokens (int32, -1 where null) and the prevalence flags as bits
    (bit j: ``prevalent_<HEADS[j]>``; :data:`UNKNOWN_FACT` where one is null or the partition
    predates them): what screening needs of each scored patient, for the actor that scores them."""
    n = table.num_rows
    encounters = np.asarray(encounters_of(table).fill_null(-1).to_numpy(), np.int32)
    bits = np.zeros(n, np.uint8)
    for j, col in enumerate(PREVALENT_COLUMNS):
        if col not in table.column_names:
            bits |= UNKNOWN_FACT
            continue
        values = table.column(col)
        bits |= np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), bool).astype(np.uint8) << j
        bits[np.asarray(values.is_null().to_numpy(zero_copy_only=False), bool)] |= UNKNOWN_FACT
    return encounters, bits


MARKER_SCHEMA = pa.schema([("fragment", pa.int32()), ("rows_out", pa.int64()),
                           ("engine_fingerprint", pa.string()), ("record", pa.string())])
# What an actor hands a writer task per fragment (ray.fragment_writers: tasks): the scored rows and
# the quarantine as Arrow IPC streams, and the record (per-batch timings, the actor) as JSON.
SCORED_SCHEMA = pa.schema([("fragment", pa.int32()), ("rows_in", pa.int64()),
                           ("engine_fingerprint", pa.string()), ("scored", pa.large_binary()),
                           ("quarantine", pa.large_binary()), ("record", pa.string())])


@dataclass
class ScoredFragment:
    """One fragment after the engine, before it is written: what :meth:`FragmentSink.write` takes."""

    fragment: int
    rows_in: int
    keys: np.ndarray  # numpy S (UTF-8 bytes), one per scored row
    probs: np.ndarray  # [rows, heads] float32, the engine's raw outputs
    quarantine_keys: np.ndarray
    quarantine_reasons: np.ndarray
    batches: list[dict[str, Any]]
    # Per scored row: age (float32), encounters (int32, -1 unknown), prevalence bits (uint8).
    facts: tuple[np.ndarray, np.ndarray, np.ndarray]

    def write(self, sink: FragmentSink) -> dict[str, Any]:
        """Write through ``sink``; return the fragment's marker record."""
        return sink.write(self.fragment, self.rows_in, self.keys, self.probs, self.quarantine_keys,
                          self.quarantine_reasons, self.batches, self.facts)

    def to_row(self, fingerprint: str, actor: dict[str, Any]) -> dict[str, Any]:
        """One row of :data:`SCORED_SCHEMA` (buffers, no per-row Python)."""
        age, encounters, prevalent = self.facts
        scored = pa.table({"key": _fixed_binary(self.keys),
                           **{f"p{j}": _numeric(self.probs[:, j]) for j in range(self.probs.shape[1])},
                           "age_years": _numeric(age), "encounters": _numeric(encounters),
                           "prevalent": _numeric(prevalent)})
        quarantine = pa.table({"key": _fixed_binary(self.quarantine_keys),
                               "reason": _fixed_binary(self.quarantine_reasons)})
        return {"fragment": self.fragment, "rows_in": self.rows_in, "engine_fingerprint": fingerprint,
                "scored": _ipc(scored), "quarantine": _ipc(quarantine),
                "record": json.dumps({"batches": self.batches, "actor": actor})}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> tuple["ScoredFragment", dict[str, Any]]:
        """The fragment and its actor's description back from one :data:`SCORED_SCHEMA` row."""
        scored = pa.ipc.open_stream(row["scored"]).read_all().combine_chunks()
        quarantine = pa.ipc.open_stream(row["quarantine"]).read_all().combine_chunks()
        heads = sorted(c for c in scored.column_names if c.startswith("p") and c[1:].isdigit())
        probs = np.stack([scored.column(c).to_numpy() for c in heads], axis=1) if heads \
            else np.zeros((scored.num_rows, 0), np.float32)
        record = json.loads(row["record"])
        fragment = cls(int(row["fragment"]), int(row["rows_in"]), _numpy_bytes(scored.column("key")),
                       probs.astype(np.float32, copy=False), _numpy_bytes(quarantine.column("key")),
                       _numpy_bytes(quarantine.column("reason")), record["batches"],
                       (scored.column("age_years").to_numpy(), scored.column("encounters").to_numpy(),
                        scored.column("prevalent").to_numpy()))
        return fragment, record["actor"]


def _fixed_binary(values: np.ndarray) -> pa.Array:
    """numpy S as Arrow fixed-size binary over the same bytes (no decode, no per-row objects)."""
    width = max(values.dtype.itemsize, 1)
    data = np.ascontiguousarray(values.astype(f"S{width}", copy=False)).view(np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(data)])


def _numeric(values: np.ndarray) -> pa.Array:
    """A numeric numpy array (not bool: Arrow packs those into bits) as an Arrow array over its
    bytes, copied only where it is strided.

    Unlike ``pa.array``, this does not import pandas (pyarrow checks every numpy input against
    pandas' types): in an engine actor that import took 0.44 s of its first fragment on an H200's
    host (under a profiler), with the actor's next batches waiting."""
    data = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(data.dtype), len(data), [None, pa.py_buffer(data)])


def _numpy_bytes(column: pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`_fixed_binary`: numpy S of the column's width, viewing its data buffer."""
    width = column.type.byte_width
    if len(column) == 0:
        return np.zeros(0, f"S{width}")
    arr = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    return np.frombuffer(arr.buffers()[1], dtype=f"S{width}", count=len(arr), offset=arr.offset * width)


def _ipc(table: pa.Table) -> pa.Buffer:
    """``table`` as one Arrow IPC stream (how a fragment travels between pipeline stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a table of ``schema``; binary columns from their Arrow buffers without copies to Python."""
    return pa.table({f.name: binary_column([r[f.name] for r in rows]) if f.type == pa.large_binary()
                     else pa.array([r[f.name] for r in rows], f.type) for f in schema}, schema=schema)


def write_fragments(block: pa.Table, sink: FragmentSink) -> pa.Table:
    """CPU task (``ray.fragment_writers: tasks``): rows of :data:`SCORED_SCHEMA` in, their fragments
    written through ``sink``, one :data:`MARKER_SCHEMA` row each out."""
    rows = []
    for i in range(block.num_rows):
        row = {name: (block.column(name)[i].as_buffer() if block.schema.field(name).type == pa.large_binary()
                      else block.column(name)[i].as_py()) for name in block.column_names}
        fragment, actor = ScoredFragment.from_row(row)
        rows.append(_marker(fragment, sink, row["engine_fingerprint"], actor))
    return _rows_table(rows, MARKER_SCHEMA)


def _marker(fragment: ScoredFragment, sink: FragmentSink, fingerprint: str, actor: dict[str, Any]
            ) -> dict[str, Any]:
    """Write ``fragment`` through ``sink``; its :data:`MARKER_SCHEMA` row, the record naming the actor."""
    record = fragment.write(sink)
    record["actor"] = actor
    return {"fragment": fragment.fragment, "rows_out": record["rows_out"], "engine_fingerprint": fingerprint,
            "record": json.dumps(record)}


class ScoreActor(EngineActor):
    """Holds one activated engine (:class:`inference.actors.EngineActor`); ``score`` scores whole
    fragments.

    Each input row is one fragment (:func:`pack_fragments`). With a ``sink`` the
    actor writes the fragment and each output row is its marker record (rows,
    quarantine counts, per-batch timings split into host decode and device
    ``infer`` time), as JSON, beside the engine fingerprint the driver checks
    (:data:`MARKER_SCHEMA`). Without one, each output row is the scored fragment
    for a :func:`write_fragments` task (:data:`SCORED_SCHEMA`).
    """

    def __init__(self, source: EngineSource, precision: str, sink: FragmentSink | None, threads: int = 1):
        super().__init__(source, precision)
        self.sink = sink
        if threads > 1:
            sys.setswitchinterval(THREADED_SWITCH_INTERVAL_S)
        self.calls = 0  # calls started (a count only: several may run at once, ray.actor_threads)

    def score(self, block: pa.Table) -> pa.Table:
        """Score the fragments in ``block`` (:data:`PACKED_SCHEMA` rows): the method
        :mod:`inference.emr_feed` calls."""
        self.calls += 1
        actor = {"id": self.actor_id, "incarnation": self.incarnation, "engine_load_s": self.engine_load_s,
                 "ready_at": self.ready_at, "init_started_at": self.init_started_at, "engine_load": self.engine_load}
        rows = []
        for i in range(block.num_rows):
            scored = self._score_fragment(int(block.column("fragment")[i].as_py()),
                                          int(block.column("rows_in")[i].as_py()),
                                          block.column("batches")[i].as_buffer())
            rows.append(scored.to_row(self.fingerprint, actor) if self.sink is None
                        else _marker(scored, self.sink, self.fingerprint, actor))
        return _rows_table(rows, MARKER_SCHEMA if self.sink is not None else SCORED_SCHEMA)

    def _score_fragment(self, frag: int, rows_in: int, packed: pa.Buffer) -> ScoredFragment:
        table = pa.ipc.open_stream(packed).read_all()
        keys, probs, qkeys, qreasons, records, encounters, prevalent, ages = [], [], [], [], [], [], [], []
        batches = iter_batches(table)
        for _ in range(table.num_rows):
            t0 = time.perf_counter()
            batch = next(batches)
            feed = batch.feed()
            t1 = time.perf_counter()
            if batch.n_rows:
                # Other calls of this actor decode or write meanwhile; the device runs one at a time.
                with self.device_lock:
                    t_lock = time.perf_counter()
                    p = np.array(self.runner.infer(feed)["probs"], dtype=np.float32)
                    t2 = time.perf_counter()
                if p.shape != (batch.n_rows, 3):
                    raise ValueError(f"engine returned probs of shape {p.shape} for a batch of "
                                     f"{batch.n_rows} rows; the model must output [batch, 3]")
            else:
                p = np.zeros((0, 3), np.float32)
                t_lock = t2 = time.perf_counter()
            keys.append(batch.keys)
            probs.append(p)
            ages.append(batch.age_years)
            encounters.append(batch.encounters)
            prevalent.append(batch.prevalent)
            qkeys.append(batch.quarantine_keys)
            qreasons.append(batch.quarantine_reasons)
            records.append({"batch_index": batch.batch_index, "n_rows": batch.n_rows,
                            "seq_len": batch.seq_len,
                            "real_tokens": batch.real_tokens, "prep_s": batch.prep_s,
                            "host_s": t1 - t0, "device_wait_s": t_lock - t1, "device_s": t2 - t_lock,
                            "done_at": time.time(),
                            "actor_id": self.actor_id, "incarnation": self.incarnation})

        def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
            parts = [a for a in parts if len(a)]
            return np.concatenate(parts) if parts else empty

        facts = (cat(ages, np.zeros(0, np.float32)), cat(encounters, np.zeros(0, np.int32)),
                 cat(prevalent, np.zeros(0, np.uint8)))
        return ScoredFragment(frag, rows_in, cat(keys, np.zeros(0, "S1")), cat(probs, np.zeros((0, 3), np.float32)),
                              cat(qkeys, np.zeros(0, "S1")), cat(qreasons, np.zeros(0, "S1")), records, facts)
