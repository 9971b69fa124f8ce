"""Benchmark: EMR ingest throughput (FHIR resources per second per core) on Spark local[2].

Generates a synthetic FHIR Bulk export, then measures

- ``spark_local2``: the whole ingest job (read, parse, de-duplicate, resolve,
  write three tables, read-back checks) on a warm SparkSession, and
- the named baseline ``python_parse_1core``: the same parser (parse_fhir_line
  + Arrow conversion) in one plain Python process over the same lines, no
  Spark — the floor cost of parsing the export,

and prints one JSON object last with both rates, per core, against the target
(50 000 resources/s per core). Usage: ``python bench/emr_ingest.py [--patients N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TARGET_PER_CORE = 50_000
CORES = 2


def _baseline(export: Path, groups_file: Path) -> tuple[int, float]:
    from conf.settings import ExtractionSettings
    from preprocessing.code_groups import load_code_groups
    from preprocessing.emr_record import ParseContext, now_us, records_to_arrow
    from preprocessing.fhir import parse_fhir_line
    from preprocessing.notes import NoteExtractor

    ctx = ParseContext(key=b"bench-key-not-secret-0001-padded-to-32-bytes", groups=load_code_groups(groups_file),
                       extractor=NoteExtractor.from_settings(ExtractionSettings()), now_us=now_us())
    files = sorted(export.glob("*.ndjson"))
    n = 0
    start = time.process_time()
    for f in files:
        with f.open() as fh:
            batch = []
            for line in fh:
                batch.append(parse_fhir_line(line.rstrip("\n"), ctx, f.name))
                if len(batch) == 10_000:
                    records_to_arrow(batch, list(range(len(batch))))
                    n += len(batch)
                    batch = []
            if batch:
                records_to_arrow(batch, list(range(len(batch))))
                n += len(batch)
    return n, time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=1500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    from conf.settings import load_settings
    from jobs import emr_ingest
    from jobs.spark_session import get_spark
    from synth.emr import generate

    os.environ.setdefault("MEDSCREEN_PSEUDONYM_KEY", "bench-key-not-secret-0001-padded-to-32-bytes")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medscreen-bench-ingest-"))
    export = work / "export"
    t = time.perf_counter()
    generate(export, patients=args.patients, seed=args.seed, bad_share=0.02, fmt="fhir")
    gen_s = time.perf_counter() - t
    settings = load_settings({"lake.root": str(work / "lake"), "spark.master": f"local[{CORES}]",
                              "spark.shuffle_partitions": CORES})
    get_spark(settings.spark, "medscreen-bench")  # JVM start-up is not ingest time
    emr_ingest.run(settings, export, "fhir")       # warm-up: Python workers, JIT
    t = time.perf_counter()
    summary = emr_ingest.run(settings, export, "fhir")
    spark_s = time.perf_counter() - t
    n = summary["counts"]["emr_ingest"]["records_in"]
    base_n, base_cpu_s = _baseline(export, settings.extraction.code_groups_file)

    spark_rate = n / spark_s / CORES
    base_rate = base_n / base_cpu_s
    result = {
        "bench": "emr_ingest",
        "patients": args.patients,
        "resources": n,
        "input_mb": round(sum(f.stat().st_size for f in export.glob("*.ndjson")) / 1e6, 1),
        "generate_s": round(gen_s, 2),
        "spark_local2": {"seconds": round(spark_s, 2), "resources_per_s_per_core": round(spark_rate)},
        "baseline": {"name": "python_parse_1core", "cpu_seconds": round(base_cpu_s, 2),
                     "resources_per_s_per_core": round(base_rate)},
        "spark_vs_baseline": round(spark_rate / base_rate, 3),
        "target_per_core": TARGET_PER_CORE,
        "meets_target": spark_rate >= TARGET_PER_CORE,
        "load_avg_1m": os.getloadavg()[0],
        "cpus_visible": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
