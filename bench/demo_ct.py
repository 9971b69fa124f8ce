"""Benchmark: the demo's CT half, timed step by step, on a demo work directory whose EMR half has run.

The same calls as ``medscreen demo`` makes after its EMR steps: synthetic CT
studies (``synth.ct.generate``), the DICOM index (Spark), the imaging link,
CT scoring on Ray (every series scored: ``full=True``, as on a fresh demo
lake) and the demo's planted-nodule check. Run it once per configuration,
back to back under the same load, changing imaging settings through the
environment (``MEDSCREEN_IMAGING__PATCH_STRIDE='[32,64,64]'``,
``MEDSCREEN_IMAGING__CROP_TO_BODY=false``). Prints one JSON object last.

    medscreen demo --workdir W --patients 300      # once: the EMR half the CT half links to
    python bench/demo_ct.py --workdir W

It imports medscreen from ``PYTHONPATH`` first, so the same script times another checkout's code
(``PYTHONPATH=/other/checkout python bench/demo_ct.py …``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# PYTHONPATH first (the code timed), then this checkout; never bench/ itself (bench/engines.py would
# shadow the engines package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent] + [str(REPO)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="a demo work directory (its EMR half has run)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from inference import ct as ct_inference
    from jobs import dicom_index, imaging_link
    from medscreen import demo_checks
    from medscreen.cmd_demo import _stop_spark, demo_settings
    from synth import ct as synth_ct

    settings = demo_settings(args.workdir)
    d = settings.demo
    emr_dir, dicom_dir = Path(settings.inputs.emr_dir), Path(settings.inputs.dicom_dir)
    steps: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        steps[name] = round(time.perf_counter() - t0, 2)
        print(f"[bench demo_ct] {name}: {steps[name]} s", file=sys.stderr, flush=True)
        return out

    timed("synth_ct_s", lambda: synth_ct.generate(dicom_dir, studies=d.ct_studies, seed=d.seed, rows=d.ct_rows,
                                                 slices=d.ct_slices, emr_dir=emr_dir))
    timed("dicom_index_s", lambda: dicom_index.run(settings, dicom_dir))
    timed("imaging_link_s", lambda: imaging_link.run(settings))
    _stop_spark()
    run_dir = timed("ct_scoring_s", lambda: ct_inference.score(settings, d.as_of, full=True))
    check = demo_checks.check_ct(settings, d.as_of, dicom_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(json.dumps({
        "benchmark": "demo_ct_half", "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "imaging": settings.imaging.model_dump(include={"patch_size", "patch_stride", "crop_to_body",
                                                        "body_threshold_hu", "body_margin_mm"}),
        "ct_half_s": round(time.perf_counter() - t_all, 2), "steps_s": steps,
        "series_scored": metrics["series_scored"], "patches": metrics["patches"], "findings": metrics["findings"],
        "pipeline_s": metrics["pipeline_s"], "stage_s": metrics["stage_s"], "ct_check": check,
    }, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
