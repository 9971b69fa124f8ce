"""``medscreen demo`` — the whole pipeline on the embedded default, end to end.

synthetic EMR → ingest → point-in-time features → engine build + gate → Ray
scoring → screening list; synthetic CT → DICOM index → Ray CT scoring →
findings. Prints a progress line per stage and a summary: counts per stage,
quarantine reasons, output paths, and how the outputs compare with what the
generators planted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from conf.settings import Settings, load_settings
from medscreen import demo_checks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on synthetic data (embedded default)")
    p.add_argument("--workdir", type=Path, default=Path("work/demo"),
                   help="where inputs, the lake and the key file go (default: work/demo)")
    p.add_argument("--patients", type=int, help="synthetic patients (default: demo.patients)")
    p.add_argument("--ct-studies", type=int, help="synthetic CT studies (default: demo.ct_studies)")
    p.add_argument("--as-of", dest="as_of", help="as-of date (default: demo.as_of)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ct-rows", type=int, help="CT matrix size (default: demo.ct_rows)")
    p.add_argument("--ct-slices", type=int, help="slices per axial CT series (default: demo.ct_slices)")
    p.set_defaults(func=run_demo)


class _Progress:
    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.monotonic()

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.step += 1
        print(f"[{self.step}/{self.total}] {title} …", flush=True)
        t = time.monotonic()
        result = fn()
        print(f"[{self.step}/{self.total}] {title}: done in {time.monotonic() - t:.1f} s "
              f"(total {time.monotonic() - self.t0:.0f} s)", flush=True)
        return result


def demo_settings(workdir: Path, args: argparse.Namespace | None = None) -> Settings:
    """Settings for a demo in ``workdir``: its own lake, its own 0600 key file."""
    from lake.keys import create_key_file

    workdir = workdir.resolve()
    key_file = workdir / "pseudonym.key"
    if not key_file.exists():
        # The demo's own throwaway lake gets its own key, said out loud (never made behind a lake's back).
        create_key_file(key_file)
        print(f"medscreen demo: new pseudonymisation key for this demo's lake: {key_file} (mode 0600)")
    overrides: dict[str, Any] = {
        "lake.root": str(workdir / "lake"),
        "inputs.emr_dir": str(workdir / "input" / "emr"),
        "inputs.dicom_dir": str(workdir / "input" / "dicom"),
        "inputs.emr_format": "fhir",
    }
    if not os.environ.get("MEDSCREEN_PSEUDONYM_KEY"):
        overrides["pseudonym.key_file"] = str(key_file)
    if args is not None:
        overrides.update({"demo.patients": args.patients, "demo.ct_studies": args.ct_studies,
                          "demo.as_of": args.as_of, "demo.seed": args.seed,
                          "demo.ct_rows": args.ct_rows, "demo.ct_slices": args.ct_slices})
    return load_settings(overrides)


def run_demo(args: argparse.Namespace) -> int:
    """Run every stage; print the summary; exit non-zero if any stage fails its ledger or QC."""
    settings = demo_settings(args.workdir, args)
    d = settings.demo
    emr_dir, dicom_dir = Path(settings.inputs.emr_dir), Path(settings.inputs.dicom_dir)
    ct = d.ct_studies > 0
    progress = _Progress(8 + (3 if ct else 0))
    summary: dict[str, Any] = {"workdir": str(args.workdir.resolve()), "as_of": d.as_of}

    from synth import emr as synth_emr
    summary["synth_emr"] = progress.run(
        f"synthetic EMR: {d.patients} patients (seed {d.seed}, {d.bad_record_share:.0%} bad records)",
        lambda: synth_emr.generate(emr_dir, patients=d.patients, seed=d.seed,
                                   bad_share=d.bad_record_share, fmt="fhir"))

    from jobs import emr_features, emr_ingest
    summary["ingest"] = progress.run("EMR ingest (Spark)", lambda: emr_ingest.run(
        settings, emr_dir, "fhir"))
    summary["features"] = progress.run(f"point-in-time timelines as of {d.as_of} (Spark)",
                                       lambda: emr_features.run(settings, d.as_of, with_labels=True))
    summary["notes"] = demo_checks.notes_diagnoses(settings)
    _stop_spark()

    from engines import cache
    summary["engine_emr"] = str(progress.run(
        "engine build + accuracy gate (emr_risk)",
        lambda: cache.ensure(settings, model="emr_risk", as_of=d.as_of)))

    from inference import emr
    run_dir = progress.run("Ray scoring (emr_risk) + QC + screening list",
                           lambda: emr.score(settings, d.as_of))
    summary["score_emr_run"] = str(run_dir)
    summary["emr_check"] = progress.run("checking scores against labels and the model card",
                                        lambda: demo_checks.check_emr(settings, d.as_of))
    summary["operating_points"] = demo_checks.operating_points(settings, d.as_of)

    if ct:
        from synth import ct as synth_ct
        summary["synth_ct"] = progress.run(f"synthetic CT: {d.ct_studies} studies",
                                           lambda: synth_ct.generate(dicom_dir, studies=d.ct_studies,
                                                                     seed=d.seed, rows=d.ct_rows,
                                                                     slices=d.ct_slices,
                                                                     emr_dir=emr_dir))
        from jobs import dicom_index
        summary["dicom_index"] = progress.run("DICOM index (Spark, headers only)",
                                              lambda: dicom_index.run(settings, dicom_dir))
        from jobs import imaging_link
        summary["imaging_link"] = imaging_link.run(settings)  # series → EMR patient by keyed MRN
        _stop_spark()
        from inference import ct as ct_inference
        ct_run = progress.run("Ray CT scoring (ct_nodule) → findings",
                              lambda: ct_inference.score(settings, d.as_of))
        summary["score_ct_run"] = str(ct_run)
        summary["ct_check"] = demo_checks.check_ct(settings, d.as_of, dicom_dir)
        from inference import worklist
        summary["worklist"] = worklist.build(settings.lake.root, d.as_of, pseudonym=settings.pseudonym)[1]

    from medscreen.phi_audit import audit
    audit_inputs = [emr_dir, dicom_dir] if ct else [emr_dir]
    phi = progress.run("PHI audit: the inputs' identifiers in the lake",
                       lambda: audit(Path(settings.lake.root), audit_inputs))
    summary["phi_audit"] = {"identifiers": phi.identifiers, "kinds": phi.identifier_kinds,
                            "files_scanned": phi.files_scanned, "not_scanned": phi.not_scanned,
                            "findings": [vars(f) for f in phi.findings]}
    progress.run("summary", lambda: None)
    summary["checks"] = demo_checks.verdicts(summary)
    demo_checks.print_summary(settings, summary)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    failed = [c for c in summary["checks"] if c["passed"] is False]
    for c in failed:
        print(f"medscreen demo: check failed: {c['check']}: {c['detail']}", file=sys.stderr)
    return 1 if failed else 0


def _stop_spark() -> None:
    # Free the JVM before Ray starts its workers: the embedded default has 2 cores.
    try:
        from pyspark.sql import SparkSession
        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()
    except Exception:  # pragma: no cover - best effort
        pass
