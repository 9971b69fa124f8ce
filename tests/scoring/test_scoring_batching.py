"""Token-budget batching: every row exactly once, budget and buckets respected, padding exact."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.batching import (Q_INVALID_SEX, Q_LENGTH_MISMATCH, Q_MISSING_AGE, Q_TOO_LONG, iter_batches,
                                batches_to_table, pack_fragment, plan_batches, validate_buckets)
from scoring_fixtures import random_timelines

BUCKETS = [16, 32, 64, 128, 256]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=400),
       budget=st.sampled_from([256, 300, 1000, 4096]))
def test_scoring_plan_every_row_once_within_budget(lengths, budget):
    plans = plan_batches(np.array(lengths, dtype=np.int64), BUCKETS, budget)
    seen = np.concatenate([p.rows for p in plans]) if plans else np.zeros(0, np.int64)
    fits = [i for i, n in enumerate(lengths) if n <= 256]
    assert sorted(seen.tolist()) == fits  # every row that fits a bucket, exactly once
    for p in plans:
        assert p.padded_tokens <= budget
        row_lengths = np.array(lengths)[p.rows]
        # the batch's bucket is the smallest one holding its longest row
        assert p.seq_len == min(b for b in BUCKETS if b >= row_lengths.max())
        assert all(min(b for b in BUCKETS if b >= n) == p.seq_len for n in row_lengths)
    # a bucket's batches are full except the last: rows are not scattered over half-empty batches
    per_bucket: dict[int, list[int]] = {}
    for p in plans:
        per_bucket.setdefault(p.seq_len, []).append(len(p.rows))
    for seq_len, sizes in per_bucket.items():
        assert all(s == budget // seq_len for s in sizes[:-1])


def test_scoring_buckets_must_fit_budget():
    with pytest.raises(ValueError, match="token_budget"):
        validate_buckets([16, 512], 256)


def test_scoring_pack_pads_exactly_and_quarantines_bad_rows():
    table = random_timelines(300, seed=3, bad_rows=True)
    batches = pack_fragment(table, fragment=7, length_buckets=BUCKETS, token_budget=1024)
    reasons = dict(zip(batches[0].quarantine_keys.astype(str), batches[0].quarantine_reasons.astype(str)))
    keys = table.column("patient_key").to_pylist()
    assert reasons == {keys[1]: Q_LENGTH_MISMATCH, keys[2]: Q_MISSING_AGE, keys[3]: Q_INVALID_SEX,
                       keys[4]: Q_TOO_LONG}
    rows = {r["patient_key"]: r for r in table.to_pylist()}
    scored = [k for b in batches for k in b.keys.astype(str)]
    assert sorted(scored) == sorted(set(keys) - set(reasons))
    sex_codes = {"U": 0, "F": 1, "M": 2}
    for b in batches:
        assert b.fragment == 7 and b.n_batches == len(batches)
        assert b.tokens.dtype == np.int64 and b.days_before.dtype == np.float32
        assert b.tokens.shape[0] * b.tokens.shape[1] <= 1024
        for j, key in enumerate(b.keys.astype(str)):
            r = rows[key]
            n = len(r["tokens"])
            assert b.tokens[j, :n].tolist() == r["tokens"] and not b.tokens[j, n:].any()
            assert b.days_before[j, :n].tolist() == r["days_before"] and not b.days_before[j, n:].any()
            assert b.age_years[j] == np.float32(r["age_years"]) and b.sex[j] == sex_codes[r["sex"]]
    assert sum(b.real_tokens for b in batches) == sum(len(rows[k]["tokens"]) for k in scored)


def test_scoring_batches_roundtrip_through_arrow_rows():
    timelines = random_timelines(120, seed=5, bad_rows=True)
    # Facts of each row (what screening needs) travel with that row, whatever batch it lands in.
    facts = (np.arange(120, dtype=np.int32) * 3, (np.arange(120) % 7).astype(np.uint8))
    batches = pack_fragment(timelines, 2, BUCKETS, 512, facts=facts)
    row_of = {k.encode(): i for i, k in enumerate(timelines.column("patient_key").to_pylist())}
    for b in batches:
        rows = [row_of[k] for k in b.keys]
        assert b.encounters.tolist() == facts[0][rows].tolist() and b.prevalent.tolist() == facts[1][rows].tolist()
    table = batches_to_table(batches)
    assert table.num_rows == len(batches)
    decoded = list(iter_batches(table))
    assert len(decoded) == len(batches)
    for b, back in zip(batches, decoded):
        for name in ("keys", "tokens", "days_before", "age_years", "sex", "encounters", "prevalent",
                     "quarantine_keys", "quarantine_reasons"):
            assert np.array_equal(getattr(back, name), getattr(b, name)), name
        assert (back.fragment, back.batch_index, back.n_batches, back.real_tokens) == \
            (b.fragment, b.batch_index, b.n_batches, b.real_tokens)


def test_scoring_all_bad_fragment_still_reports():
    table = random_timelines(5, seed=1, bad_rows=True).slice(1, 4)
    batches = pack_fragment(table, 0, BUCKETS, 512)
    assert len(batches) == 1 and batches[0].n_rows == 0 and len(batches[0].quarantine_keys) == 4
    # The report survives the trip through Arrow that carries it to the driver: each key with its reason.
    rows = batches_to_table(batches)
    assert rows.num_rows == 1
    back, = iter_batches(rows)
    keys = table.column("patient_key").to_pylist()
    assert dict(zip(back.quarantine_keys.astype(str), back.quarantine_reasons.astype(str))) == {
        keys[0]: Q_LENGTH_MISMATCH, keys[1]: Q_MISSING_AGE, keys[2]: Q_INVALID_SEX, keys[3]: Q_TOO_LONG}
