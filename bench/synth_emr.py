"""Benchmark: synthetic EMR generation (``synth.emr.generate``), FHIR and OMOP.

Target: 20 000 patients well under 60 s on one core. Compares, in one run:

- ``fhir_s`` / ``omop_s``: ``generate`` end to end (simulation + rendering + atomic swap);
- ``simulate_s``: the simulation alone (shared by both formats);
- ``baseline_json_dumps_s``: the naive renderer's cost for the same FHIR records,
  i.e. ``json.dumps`` of every resource dict (the dicts are decoded from the export
  first, outside the timer), against ``fhir_render_s`` = ``fhir_s`` − ``simulate_s``.

Prints one JSON object last.

    python bench/synth_emr.py --quick
    python bench/synth_emr.py --patients 20000
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth.emr import generate  # noqa: E402
from synth.emr_sim import simulate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2000 patients")
    args = ap.parse_args(argv)
    n = 2000 if args.quick else args.patients
    scratch = Path(tempfile.mkdtemp(prefix="bench-synth-emr-"))
    try:
        t = time.perf_counter()
        simulate(n, args.seed)
        simulate_s = time.perf_counter() - t
        out: dict[str, object] = {"bench": "synth_emr", "patients": n, "seed": args.seed,
                                  "python": platform.python_version(),
                                  "simulate_s": round(simulate_s, 2)}
        for fmt in ("fhir", "omop"):
            t = time.perf_counter()
            summary = generate(scratch / fmt, patients=n, seed=args.seed, bad_share=0.02, fmt=fmt)
            out[f"{fmt}_s"] = round(time.perf_counter() - t, 2)
            out[f"{fmt}_records"] = sum(summary["records"].values())
            out[f"{fmt}_mb"] = round(sum(f.stat().st_size for f in (scratch / fmt).iterdir())
                                     / 2**20, 1)
        resources = []
        for f in sorted((scratch / "fhir").glob("*.ndjson")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    resources.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # the planted truncated lines
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        t = time.perf_counter()
        for res in resources:
            dumps(res)
        out["baseline_json_dumps_s"] = round(time.perf_counter() - t, 2)
        out["fhir_render_s"] = round(float(out["fhir_s"]) - simulate_s, 2)
        out["target_s"] = 60.0
        out["fhir_within_target"] = float(out["fhir_s"]) < 60.0
        out["omop_within_target"] = float(out["omop_s"]) < 60.0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
