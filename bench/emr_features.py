"""Benchmark: point-in-time EMR features, Spark job vs a single-process baseline.

Generates synthetic events + patients straight to Parquet (numpy/pyarrow,
committed like ingest leaves them), runs jobs/emr_features on Spark
(``local[2]`` by default) and the named baseline — the single-process
``preprocessing.timelines.timelines_table`` built on the same pure rules — in
the same run, checks that both give identical rows, and prints one JSON
object last: events/s per core for both, peak memory of the process tree
(driver + JVM), whether the target (≥ 250 k events/s per core, < 4 GiB) is met
and what limits it. Ingest throughput has its own benchmark (bench/emr_ingest.py).

    python bench/emr_features.py [--events 1000000] [--patients 20000]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conf.settings import load_settings  # noqa: E402
from lake.commit import atomic_partition  # noqa: E402
from lake.paths import LakePaths  # noqa: E402
from lake.schemas import EVENTS, PATIENTS  # noqa: E402
from preprocessing.code_groups import groups_for  # noqa: E402
from preprocessing.timelines import US_PER_DAY, epoch_day, timelines_table  # noqa: E402

AS_OF = dt.date(2024, 6, 30)
TARGET_EVENTS_PER_S_PER_CORE = 250_000
TARGET_PEAK_GIB = 4.0

DX = ["E11.9", "E11.65", "E11.22", "N18.3", "N18.4", "I50.9", "I50.22", "I10", "E78.5", "E66.9", "J44.9", "F32.9",
      "M54.5", "K21.9", "Z00.00", "R73.03", "N39.0", "J06.9", "I25.10", "G47.33", "E03.9", "R51.9", "ZZZ.1"]
LOINC = [("4548-4", 6.0, 1.0, "%"), ("2345-7", 105.0, 30.0, "mg/dL"), ("39156-5", 28.0, 6.0, "kg/m2"),
         ("8480-6", 128.0, 18.0, "mm[Hg]"), ("8462-4", 80.0, 10.0, "mm[Hg]"), ("62238-1", 80.0, 25.0, None),
         ("2160-0", 1.0, 0.4, "mg/dL"), ("2093-3", 195.0, 40.0, "mmol/L"), ("9999-9", 1.0, 1.0, "x")]


def patient_keys(n: int) -> np.ndarray:
    """Pseudonym-shaped keys for synthetic patients (no real identifier involved)."""
    return np.array([hashlib.sha256(f"bench-{i}".encode()).hexdigest()[:32] for i in range(n)], dtype=object)


def synth_tables(n_events: int, n_patients: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Vectorised synthetic EVENTS and PATIENTS tables (skewed events per patient)."""
    rng = np.random.default_rng(seed)
    keys = patient_keys(n_patients)
    # Skewed activity: a few patients have many events, most have a handful.
    weights = rng.pareto(1.5, n_patients) + 0.2
    pidx = rng.choice(n_patients, size=n_events, p=weights / weights.sum())
    end_us = (epoch_day(AS_OF) + 1) * US_PER_DAY
    t_us = end_us + rng.integers(-6 * 365 * US_PER_DAY, 2 * 365 * US_PER_DAY, n_events)
    kind_i = rng.choice(4, size=n_events, p=[0.35, 0.15, 0.35, 0.15])  # dx, dx_text, obs, encounter
    kinds = np.array(["dx", "dx_text", "obs", "encounter"], dtype=object)[kind_i]
    is_dx, is_obs = kind_i <= 1, kind_i == 2
    dx_code = np.array(DX, dtype=object)[rng.integers(0, len(DX), n_events)]
    lo = rng.integers(0, len(LOINC), n_events)
    mean = np.array([r[1] for r in LOINC])[lo]
    sd = np.array([r[2] for r in LOINC])[lo]
    values = np.where(is_obs, np.round(rng.normal(mean, sd), 2), np.nan)
    icd9 = is_dx & (rng.random(n_events) < 0.05)
    system = np.where(is_dx, np.where(icd9, "icd9cm", "icd10cm"),
                      np.where(is_obs, "loinc", "encounter-class")).astype(object)
    code = np.where(is_dx, np.where(icd9, "250.00", dx_code),
                    np.where(is_obs, np.array([r[0] for r in LOINC], dtype=object)[lo], "AMB")).astype(object)
    unit = np.where(is_obs, np.array([r[3] for r in LOINC], dtype=object)[lo], None)
    assertion = np.where(kind_i == 1, np.array(["affirmed", "negated", "history", "family"],
                                              dtype=object)[rng.choice(4, n_events, p=[0.6, 0.2, 0.15, 0.05])],
                         "affirmed").astype(object)
    events = pa.table({
        "patient_key": pa.array(keys[pidx], pa.string()),
        "event_time": pa.array(t_us, pa.int64()).cast(EVENTS.field("event_time").type),
        "kind": pa.array(kinds, pa.string()), "code_system": pa.array(system, pa.string()),
        "code": pa.array(code, pa.string()),
        "value": pa.array(values, pa.float64(), mask=~is_obs), "unit": pa.array(unit, pa.string()),
        "assertion": pa.array(assertion, pa.string()),
        # The groups ingest would put on each diagnosis (the one evaluator), so flags and labels
        # do real work; late recording on a tenth of the events.
        "code_groups": pa.array([groups_for(s, c) if d else [] for s, c, d in zip(system, code, is_dx)],
                                pa.list_(pa.string())),
        "concept_id": pa.nulls(n_events, pa.int64()),
        "source": pa.array(np.full(n_events, "fhir", dtype=object), pa.string()),
        "source_ref": pa.nulls(n_events, pa.string()),
        "known_time": pa.array(t_us + np.where(rng.random(n_events) < 0.1,
                                               rng.integers(0, 400 * 86_400_000_000, n_events), 0),
                               pa.int64()).cast(EVENTS.field("known_time").type),
    }, schema=EVENTS)
    birth = dt.date(1930, 1, 1) + np.array([dt.timedelta(days=int(d)) for d in rng.integers(0, 30000, n_patients)])
    patients = pa.table({
        "patient_key": pa.array(keys, pa.string()), "birth_date": pa.array(birth, pa.date32()),
        "sex": pa.array(np.array(["F", "M", "U"], dtype=object)[rng.choice(3, n_patients, p=[.5, .48, .02])]),
        "source": pa.array(np.full(n_patients, "fhir", dtype=object), pa.string()),
        # Nobody dies and no MRNs: the bench measures timelines, not the death rule or imaging links.
        "death_date": pa.nulls(n_patients, pa.date32()), "mrn_key": pa.nulls(n_patients, pa.string())},
        schema=PATIENTS)
    return events, patients


def write_lake(root: Path, events: pa.Table, patients: pa.Table, files: int = 4) -> None:
    paths = LakePaths(root)
    with atomic_partition(paths.events, {"run_id": "bench-synthetic"}) as staging:
        step = -(-events.num_rows // files)
        for i in range(files):
            pq.write_table(events.slice(i * step, step), staging / f"part-{i:05d}.parquet")
    with atomic_partition(paths.patients, {"run_id": "bench-synthetic"}) as staging:
        pq.write_table(patients, staging / "part-00000.parquet")
    with atomic_partition(paths.observation_periods, {"run_id": "bench-synthetic"}) as staging:
        pq.write_table(observed(patients), staging / "part-00000.parquet")


def observed(patients: pa.Table) -> pa.Table:
    """One open observation period from 1900 per patient: the whole synthetic population is in."""
    from lake.schemas import OBSERVATION_PERIODS

    n = patients.num_rows
    return pa.table({"patient_key": patients.column("patient_key"),
                     "start_date": pa.array([dt.date(1900, 1, 1)] * n, pa.date32()),
                     "end_date": pa.nulls(n, pa.date32()),
                     "source": pa.array(["bench"] * n, pa.string())}, schema=OBSERVATION_PERIODS)


class PeakRSS:
    """Samples the RSS of this process and all its children (the Spark JVM, Python workers)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def read_rows(path: Path) -> list[dict]:
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("*.parquet"))]).to_pylist()
    return sorted(rows, key=lambda r: r["patient_key"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--workdir", type=Path, help="lake directory (default: a temporary one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MEDSCREEN_PSEUDONYM_KEY", "bench-key-synthetic-data-only-000")
    cores = int(args.master[len("local["):-1]) if args.master.startswith("local[") and args.master[-2].isdigit() \
        else os.cpu_count() or 1

    tmp = tempfile.TemporaryDirectory(prefix="medscreen-bench-") if args.workdir is None else None
    root = Path(tmp.name) if tmp else args.workdir
    t0 = time.perf_counter()
    events, patients = synth_tables(args.events, args.patients, args.seed)
    write_lake(root, events, patients)
    gen_s = time.perf_counter() - t0

    settings = load_settings({"lake.root": str(root), "spark.master": args.master, "spark.shuffle_partitions": 4})
    from jobs import emr_features
    from jobs.spark_session import get_spark

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        spark = get_spark(settings.spark, "medscreen-bench-emr-features")
        start_s = time.perf_counter() - t0
        # Reference point for "what limits it": the same files scanned and reduced, no features.
        t0 = time.perf_counter()
        emr_features.read_table(spark, LakePaths(root).events, EVENTS).groupBy("patient_key").count().count()
        scan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        emr_features.run(settings, AS_OF.isoformat(), with_labels=True, run_id="bench-cold")
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = emr_features.run(settings, AS_OF.isoformat(), with_labels=True, run_id="bench-warm")
        warm_s = time.perf_counter() - t0
        spark.stop()
    peak_gib = mem.peak_bytes / 2**30

    t0 = time.perf_counter()
    baseline = timelines_table(events, patients, AS_OF, settings.features.lookback_days,
                               settings.features.max_tokens, settings.features.horizon_days,
                               periods=observed(patients))
    base_s = time.perf_counter() - t0
    spark_rows = read_rows(Path(summary["output"]))
    base_rows = baseline.to_pylist()
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(len(base_rows), size=min(2000, len(base_rows)), replace=False).tolist())
    identical = len(spark_rows) == len(base_rows) and all(spark_rows[i] == base_rows[i] for i in sample)

    n = args.events
    per_core = n / warm_s / cores
    load = os.getloadavg()[0]
    if load > 1.5 * (os.cpu_count() or 1):
        limited_by = (f"CPU contention: load average {load:.1f} on {os.cpu_count()} cores while measuring, "
                      "so these numbers understate the job")
    elif warm_s < 2 * scan_s:
        limited_by = "the Parquet scan + one shuffle by patient_key (job time is within 2x of a scan-and-group)"
    else:
        limited_by = ("per-event expression work (tokenising, window flags, label flags) and the sort of "
                      "per-patient event structs; the scan-and-group alone is faster")
    result = {
        "benchmark": "emr_features",
        "events": n, "patients": args.patients, "as_of": AS_OF.isoformat(), "master": args.master,
        "cores": cores, "generate_s": round(gen_s, 2), "spark_start_s": round(start_s, 2),
        "spark": {"cold_s": round(cold_s, 2), "warm_s": round(warm_s, 2),
                  "events_per_s": round(n / warm_s), "events_per_s_per_core": round(per_core),
                  "scan_group_only_s": round(scan_s, 2), "rows": summary["rows"],
                  "events_out": summary["events_out"], "length": summary["length"]},
        "baseline": {"name": "timelines_table (single-process numpy/pyarrow, same pure rules)",
                     "wall_s": round(base_s, 2), "events_per_s_per_core": round(n / base_s)},
        "speedup_per_core_vs_baseline": round(per_core / (n / base_s), 2),
        "rows_identical_on_sample": identical, "compared_rows": len(sample),
        "peak_rss_gib": round(peak_gib, 2),
        "target": {"events_per_s_per_core": TARGET_EVENTS_PER_S_PER_CORE, "peak_rss_gib": TARGET_PEAK_GIB},
        "meets_target": per_core >= TARGET_EVENTS_PER_S_PER_CORE and peak_gib < TARGET_PEAK_GIB,
        "load_average_1m": round(load, 1),
        "limited_by": limited_by,
        "ingest": "see bench/emr_ingest.py",
    }
    if tmp:
        tmp.cleanup()
    print(json.dumps(result))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
