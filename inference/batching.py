"""Token-budget batching: length-sorted rows, padded to small length buckets.

A transformer's cost grows with the padded sequence length, so a fixed row
count per batch either wastes the device on padding (long bucket, few real
tokens) or starves it (short rows, tiny batch). Instead rows are sorted by
length, each row is assigned the smallest bucket that holds it, and each
bucket is cut into batches of ``token_budget // bucket_len`` rows, so every
batch costs about the same device time and shapes come from a small fixed
set (good for TensorRT profiles and CUDA graphs).

Everything here is pure numpy/pyarrow (no Ray): the same functions run in a
Ray task, the benchmark and a unit test. The packed batch travels through Ray
Data as ONE row whose array columns are raw little-endian buffers, so a block
can hold batches of different shapes and the actor reads them zero-copy.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SEX_CODES = {"U": 0, "F": 1, "M": 2}

# Reason codes for timeline rows that cannot be scored (machine-readable; see ledger).
Q_MISSING_KEY = "missing_patient_key"
Q_MISSING_TOKENS = "missing_tokens"
Q_LENGTH_MISMATCH = "length_mismatch"
Q_TOO_LONG = "length_exceeds_max_bucket"
Q_MISSING_AGE = "missing_age"
Q_INVALID_SEX = "invalid_sex"
Q_TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"


@dataclass(frozen=True)
class BatchPlan:
    """One batch: positions (into the fragment's rows) and the padded length they share."""

    rows: np.ndarray     # int64 indices into the fragment table, in length order
    seq_len: int         # bucket length every row is padded to

    @property
    def padded_tokens(self) -> int:
        return int(len(self.rows) * self.seq_len)


def validate_buckets(length_buckets: Sequence[int], token_budget: int) -> np.ndarray:
    """Sorted unique buckets; raise ValueError naming the settings when they cannot work."""
    buckets = np.array(sorted(set(int(b) for b in length_buckets)), dtype=np.int64)
    if len(buckets) == 0 or buckets[0] < 1:
        raise ValueError(f"scoring.length_buckets must be positive lengths, got {list(length_buckets)}")
    if buckets[-1] > token_budget:
        raise ValueError(f"scoring.token_budget ({token_budget}) is smaller than the largest length "
                         f"bucket ({int(buckets[-1])}); raise the budget or lower the bucket")
    return buckets


def bucket_lengths(lengths: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """The smallest bucket >= each length (length 0 gets the smallest bucket); -1 if none fits."""
    idx = np.searchsorted(buckets, np.asarray(lengths, dtype=np.int64), side="left")
    out = np.full(len(idx), -1, dtype=np.int64)
    ok = idx < len(buckets)
    out[ok] = buckets[idx[ok]]
    return out


def plan_batches(lengths: np.ndarray, length_buckets: Sequence[int], token_budget: int) -> list[BatchPlan]:
    """Cut rows into batches of one bucket each, every batch within ``token_budget`` padded tokens.

    Rows longer than the largest bucket are left out (the caller quarantines them).
    Ties in length keep their input order (stable sort), so the plan is deterministic.
    """
    buckets = validate_buckets(length_buckets, token_budget)
    lengths = np.asarray(lengths, dtype=np.int64)
    bucket = bucket_lengths(lengths, buckets)
    order = np.argsort(lengths, kind="stable")
    order = order[bucket[order] > 0]
    plans: list[BatchPlan] = []
    sorted_buckets = bucket[order]
    # Rows are length-sorted, so each bucket is one contiguous run of `order`.
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]) if len(order) else []
    ends = list(starts[1:]) + [len(order)] if len(order) else []
    for s, e in zip(starts, ends):
        seq_len = int(sorted_buckets[s])
        per_batch = max(1, token_budget // seq_len)
        for b in range(s, e, per_batch):
            plans.append(BatchPlan(rows=order[b:min(b + per_batch, e)], seq_len=seq_len))
    return plans


@dataclass
class PaddedBatch:
    """Model-ready arrays for one batch plus what is needed to write and account for it."""

    fragment: int
    batch_index: int
    n_batches: int
    keys: np.ndarray          # fixed-width bytes (S*), one per row
    tokens: np.ndarray        # int64 [n, seq_len], 0 = padding
    days_before: np.ndarray   # float32 [n, seq_len]
    age_years: np.ndarray     # float32 [n]
    sex: np.ndarray           # int64 [n]
    real_tokens: int
    prep_s: float
    # Eligibility facts of the rows (screening, made where the rows are scored): encounter tokens
    # (-1: null) and the prevalence flags as bits (bit j: head j; bit 7: a flag null or absent).
    encounters: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    prevalent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    # Quarantined rows of the fragment ride on its batch 0 so an all-bad fragment still reports.
    quarantine_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S1"))
    quarantine_reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S1"))

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def feed(self) -> dict[str, np.ndarray]:
        """The engine feed (model I/O contract)."""
        return {"tokens": self.tokens, "days_before": self.days_before,
                "age_years": self.age_years, "sex": self.sex}


def _check_rows(table: pa.Table, max_len: int, vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row reason code ('' = scoreable) and the list lengths, vectorised."""
    n = table.num_rows
    reasons = np.full(n, "", dtype=object)

    def mark(mask: np.ndarray, reason: str) -> None:
        reasons[(reasons == "") & mask] = reason

    key = table.column("patient_key")
    mark(np.asarray(key.is_null().to_numpy(zero_copy_only=False)), Q_MISSING_KEY)
    tokens = table.column("tokens")
    days = table.column("days_before")
    mark(np.asarray(tokens.is_null().to_numpy(zero_copy_only=False)) |
         np.asarray(days.is_null().to_numpy(zero_copy_only=False)), Q_MISSING_TOKENS)
    tok_len = np.asarray(pc.list_value_length(tokens).fill_null(0).to_numpy(), dtype=np.int64)
    day_len = np.asarray(pc.list_value_length(days).fill_null(0).to_numpy(), dtype=np.int64)
    length = np.asarray(table.column("length").fill_null(-1).to_numpy(), dtype=np.int64)
    mark((tok_len != day_len) | (tok_len != length), Q_LENGTH_MISMATCH)
    mark(tok_len > max_len, Q_TOO_LONG)
    age = np.asarray(table.column("age_years").cast(pa.float32()).fill_null(np.nan).to_numpy(), dtype=np.float32)
    mark(~np.isfinite(age), Q_MISSING_AGE)
    sex = np.asarray(table.column("sex").fill_null("?").to_numpy(zero_copy_only=False))
    mark(~np.isin(sex, list(SEX_CODES)), Q_INVALID_SEX)
    if vocab_size is not None and n:
        flat = _flat_values(tokens)
        if len(flat):
            bad_tok = (flat < 0) | (flat >= vocab_size)
            if bad_tok.any():
                owners = np.repeat(np.arange(n), tok_len)
                bad_rows = np.zeros(n, dtype=bool)
                bad_rows[owners[bad_tok]] = True
                mark(bad_rows, Q_TOKEN_OUT_OF_VOCAB)
    return reasons, tok_len


def _flat_values(col: pa.ChunkedArray) -> np.ndarray:
    """All list values in row order, in their stored dtype (nulls contribute nothing)."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return np.asarray(pc.list_flatten(arr).to_numpy())


def _gather_rows(flats: Sequence[np.ndarray], lengths: np.ndarray, starts: np.ndarray,
                 rows: np.ndarray) -> list[np.ndarray]:
    """Each flat list column's values of ``rows``, in that order, back to back: one gather per
    column for the whole fragment, after which each batch's values are one contiguous slice."""
    lens = lengths[rows]
    total = int(lens.sum())
    if not total:
        return [f[:0] for f in flats]
    src = np.arange(total, dtype=np.int64) + np.repeat(starts[rows] - (np.cumsum(lens) - lens), lens)
    return [f[src] for f in flats]


def _pad(values: np.ndarray, lens: np.ndarray, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Rows of ``lens`` values each (``values`` back to back) into a zero-padded [len(lens), seq_len] matrix."""
    out = np.zeros((len(lens), seq_len), dtype=dtype)
    if len(values):
        # A boolean mask fills row-major: each row's values land left-aligned, in order.
        out[np.arange(seq_len) < lens[:, None]] = values
    return out


def pack_fragment(table: pa.Table, fragment: int, length_buckets: Sequence[int], token_budget: int,
                  vocab_size: int | None = None,
                  facts: tuple[np.ndarray, np.ndarray] | None = None) -> list[PaddedBatch]:
    """Validate, length-sort and pad one fragment of timelines into token-budget batches.

    Returns at least one batch (possibly with zero rows) so the fragment's
    quarantined rows and completion always reach the writer. ``facts``
    (encounters, prevalence bits; one per table row, see :class:`PaddedBatch`)
    are handed out with each batch's rows.
    """
    t0 = time.perf_counter()
    buckets = validate_buckets(length_buckets, token_budget)
    reasons, lengths = _check_rows(table, int(buckets[-1]), vocab_size)
    ok = reasons == ""
    ok_idx = np.flatnonzero(ok)
    plans = [BatchPlan(rows=ok_idx[p.rows], seq_len=p.seq_len)
             for p in plan_batches(lengths[ok_idx], buckets, token_budget)]

    keys_col = table.column("patient_key").fill_null("")
    keys = np.asarray(keys_col.to_numpy(zero_copy_only=False)).astype(np.bytes_)
    tok_flat = _flat_values(table.column("tokens"))
    day_flat = _flat_values(table.column("days_before"))
    tok_lens = np.asarray(pc.list_value_length(table.column("tokens")).fill_null(0).to_numpy(),
                          dtype=np.int64)
    starts = np.cumsum(tok_lens) - tok_lens
    # Rows whose token and day lists disagree are quarantined, so one offset array serves both lists.
    age = np.asarray(table.column("age_years").cast(pa.float32()).fill_null(0).to_numpy(), dtype=np.float32)
    sex_str = np.asarray(table.column("sex").fill_null("U").to_numpy(zero_copy_only=False))
    sex = np.zeros(len(sex_str), dtype=np.int64)
    for code, value in SEX_CODES.items():
        sex[sex_str == code] = value

    safe_lens = np.where(ok, lengths, 0)
    # The fragment's scored rows in batch order, values gathered once; batch i is a slice of each.
    in_order = np.concatenate([p.rows for p in plans]) if plans else np.zeros(0, np.int64)
    tok_vals, day_vals = _gather_rows([tok_flat, day_flat], safe_lens, starts, in_order)
    value_end = np.cumsum(safe_lens[in_order])
    batches = []
    first = 0
    for i, p in enumerate(plans):
        last = first + len(p.rows)
        lo, hi = (int(value_end[first - 1]) if first else 0), int(value_end[last - 1])
        lens = safe_lens[p.rows]
        batches.append(PaddedBatch(
            fragment=fragment, batch_index=i, n_batches=max(1, len(plans)), keys=keys[p.rows],
            tokens=_pad(tok_vals[lo:hi], lens, p.seq_len, np.int64),
            days_before=_pad(day_vals[lo:hi], lens, p.seq_len, np.float32),
            age_years=age[p.rows], sex=sex[p.rows], real_tokens=hi - lo, prep_s=0.0,
            **({"encounters": facts[0][p.rows], "prevalent": facts[1][p.rows]} if facts is not None else {})))
        first = last
    if not batches:
        batches.append(PaddedBatch(
            fragment=fragment, batch_index=0, n_batches=1, keys=np.zeros(0, dtype="S1"),
            tokens=np.zeros((0, int(buckets[0])), np.int64), days_before=np.zeros((0, int(buckets[0])), np.float32),
            age_years=np.zeros(0, np.float32), sex=np.zeros(0, np.int64), real_tokens=0, prep_s=0.0))
    bad = ~ok
    batches[0].quarantine_keys = keys[bad]
    batches[0].quarantine_reasons = reasons[bad].astype(np.bytes_)
    # Host prep time is shared out by padded tokens: that is what each batch's padding cost.
    elapsed = time.perf_counter() - t0
    total_padded = sum(b.n_rows * b.seq_len for b in batches) or 1
    for b in batches:
        b.prep_s = elapsed * (b.n_rows * b.seq_len) / total_padded if total_padded else elapsed
    return batches


# --- Ray Data row encoding -------------------------------------------------------------------
# One padded batch = one row; arrays as raw buffers so rows of different shapes share a block.

_ARRAY_FIELDS = ("keys", "tokens", "days_before", "age_years", "sex", "encounters", "prevalent",
                 "quarantine_keys", "quarantine_reasons")


def batches_to_table(batches: Sequence[PaddedBatch]) -> pa.Table:
    """Encode padded batches as an Arrow table, one row per batch (buffers, no per-value objects)."""
    cols: dict[str, list] = {name: [] for name in (
        "fragment", "batch_index", "n_batches", "n_rows", "seq_len", "real_tokens", "prep_s",
        "key_width", "qkey_width", "qreason_width", *_ARRAY_FIELDS)}
    for b in batches:
        cols["fragment"].append(b.fragment)
        cols["batch_index"].append(b.batch_index)
        cols["n_batches"].append(b.n_batches)
        cols["n_rows"].append(b.n_rows)
        cols["seq_len"].append(b.seq_len)
        cols["real_tokens"].append(b.real_tokens)
        cols["prep_s"].append(b.prep_s)
        cols["key_width"].append(b.keys.dtype.itemsize)
        cols["qkey_width"].append(b.quarantine_keys.dtype.itemsize)
        cols["qreason_width"].append(b.quarantine_reasons.dtype.itemsize)
        for name in _ARRAY_FIELDS:
            cols[name].append(getattr(b, name))
    types = {"fragment": pa.int32(), "batch_index": pa.int32(), "n_batches": pa.int32(),
             "n_rows": pa.int32(), "seq_len": pa.int32(), "real_tokens": pa.int64(), "prep_s": pa.float64(),
             "key_width": pa.int32(), "qkey_width": pa.int32(), "qreason_width": pa.int32()}
    arrays = {k: binary_column(v) if k in _ARRAY_FIELDS else pa.array(v, type=types[k]) for k, v in cols.items()}
    return pa.table(arrays)


def binary_column(values: Sequence[np.ndarray | pa.Buffer]) -> pa.Array:
    """A large_binary array, one value per array (its raw bytes) or Arrow buffer: the bytes are laid
    back to back once (a single value is used as it is), never copied into Python bytes objects."""
    views = [np.frombuffer(v, np.uint8) if isinstance(v, pa.Buffer)
             else np.ascontiguousarray(v).view(np.uint8).reshape(-1) for v in values]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([v.size for v in views], out=offsets[1:])
    if len(values) == 1 and isinstance(values[0], pa.Buffer):
        data = values[0]
    else:
        data = pa.py_buffer(np.concatenate(views) if views else np.zeros(0, np.uint8))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(views), [None, pa.py_buffer(offsets), data])


def _binary_values(column: pa.ChunkedArray) -> Callable[[int], pa.Buffer | None]:
    """Row i's value of a large_binary column as a zero-copy slice of its data buffer (the column's
    buffers are looked up once, not per row: a scalar lookup per value costs more than the batch)."""
    chunk = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    _, offsets_buf, data = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
    return lambda i: data.slice(int(offsets[i]), int(offsets[i + 1] - offsets[i])) if data is not None else None


def iter_batches(table: pa.Table) -> Iterator[PaddedBatch]:
    """Decode the rows of a table made by :func:`batches_to_table`, in order (zero-copy views)."""
    meta = {name: table.column(name).to_pylist() for name in (
        "fragment", "batch_index", "n_batches", "n_rows", "seq_len", "real_tokens", "prep_s",
        "key_width", "qkey_width", "qreason_width")}
    values = {name: _binary_values(table.column(name)) for name in _ARRAY_FIELDS}
    for i in range(table.num_rows):
        n, seq = meta["n_rows"][i], meta["seq_len"][i]

        def arr(name: str, dtype, shape=None) -> np.ndarray:
            buf = values[name](i)
            a = np.frombuffer(buf, dtype=dtype) if buf is not None and buf.size else np.zeros(0, dtype=dtype)
            return a.reshape(shape) if shape is not None else a

        yield PaddedBatch(
            fragment=meta["fragment"][i], batch_index=meta["batch_index"][i], n_batches=meta["n_batches"][i],
            keys=arr("keys", f"S{meta['key_width'][i]}"),
            tokens=arr("tokens", np.int64, (n, seq)), days_before=arr("days_before", np.float32, (n, seq)),
            age_years=arr("age_years", np.float32), sex=arr("sex", np.int64),
            encounters=arr("encounters", np.int32), prevalent=arr("prevalent", np.uint8),
            real_tokens=meta["real_tokens"][i], prep_s=meta["prep_s"][i],
            quarantine_keys=arr("quarantine_keys", f"S{meta['qkey_width'][i]}"),
            quarantine_reasons=arr("quarantine_reasons", f"S{meta['qreason_width'][i]}"))
