"""The per-patient worklist: risk heads flagged on the screening list and open CT findings, side by side.

One row per patient of the as-of population who is on the screening list for
D or has CT findings in the findings partition for D (findings reach a patient
through LAKE/imaging/patient_link at CT scoring). "Open" findings are those of
the findings partition for D: CT scoring re-scores every eligible series up to
D, and no stage records a finding as closed.

Rules:

* risk heads come from LAKE/screening/as_of=D (whatever rule built the list);
  the three head scores from the scores partition it was built from;
* a finding whose series is not linked to an EMR patient has no row; the
  manifest counts them (``unlinked_findings``);
* a patient with findings but outside the as-of population (no timeline for D:
  deceased, not registered or not under observation) gets no row; counted
  in the ledger as ``not_in_population``.

Written atomically to LAKE/worklist/as_of=D with a manifest naming the
screening, scores, findings and timelines runs. Ledger ``worklist``: patients
in (on the list or with linked findings) = rows + ignored by reason.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from conf.settings import PseudonymSettings
from lake.commit import atomic_partition, is_committed, read_manifest, read_partition
from lake.files import write_json_atomic
from lake.ledger import StageLedger, write_ledger
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.paths import LakePaths, as_of_str
from lake.runs import new_run_id
from lake.schemas import HEADS, WORKLIST

STAGE = "worklist"
CT_MODEL = "ct_nodule"
EMR_MODEL = "emr_risk"
IGNORED_NOT_IN_POPULATION = "not_in_population"
log = logging.getLogger(__name__)



def worklist_rows(screening: pa.Table, scores: pa.Table, findings: pa.Table | None,
                  population: set[str], as_of: Any) -> tuple[pa.Table, dict[str, int]]:
    """The worklist table (schema :data:`WORKLIST`, sorted by patient_key) and its counts.

    ``population``: the patient keys with a timeline for D (the as-of population).
    """
    heads: dict[str, set[str]] = {}
    for k, h in zip(screening.column("patient_key").to_pylist(), screening.column("head").to_pylist()):
        heads.setdefault(k, set()).add(h)
    found: dict[str, list[dict[str, Any]]] = {}
    unlinked = 0
    if findings is not None:
        for f in findings.select(["patient_key", "series_key", "finding_id", "diameter_mm",
                                  "max_prob"]).to_pylist():
            if f["patient_key"] is None:
                unlinked += 1
                continue
            found.setdefault(f.pop("patient_key"), []).append(f)
    score_of = {r["patient_key"]: r for r in
                scores.select(["patient_key", *[f"score_{h}" for h in HEADS]]).to_pylist()}
    candidates = set(heads) | set(found)
    # List patients are in the population by construction (a list row needs a timeline);
    # checking them too keeps a list built from another timelines partition honest.
    keep = sorted(k for k in candidates if k in population)
    rows = []
    for k in keep:
        fs = sorted(found.get(k, []), key=lambda f: (f["series_key"], f["finding_id"]))
        s = score_of.get(k, {})
        rows.append({"patient_key": k, "as_of": as_of,
                     "risk_heads": [h for h in HEADS if h in heads.get(k, ())],
                     **{f"score_{h}": s.get(f"score_{h}") for h in HEADS},
                     "ct_series": len({f["series_key"] for f in fs}), "ct_findings": len(fs),
                     "ct_max_diameter_mm": max((f["diameter_mm"] for f in fs), default=None),
                     "ct_findings_list": fs})
    counts = {"patients_in": len(candidates), "rows": len(rows),
              IGNORED_NOT_IN_POPULATION: len(candidates) - len(keep),
              "with_risk_heads": sum(1 for r in rows if r["risk_heads"]),
              "with_ct_findings": sum(1 for r in rows if r["ct_findings"]),
              "with_both": sum(1 for r in rows if r["risk_heads"] and r["ct_findings"]),
              "unlinked_findings": unlinked}
    return pa.Table.from_pylist(rows, schema=WORKLIST), counts


def _required(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not is_committed(path):
        raise FileNotFoundError(f"{what} {path} is not committed; run {fix} first")
    return read_manifest(path)


def build(lake_root: Path, as_of: str, run_id: str | None = None,
          pseudonym: PseudonymSettings | None = None) -> tuple[Path, dict[str, int]]:
    """Commit LAKE/worklist/as_of=D from the committed screening list, scores, timelines and
    (when CT was scored for D) findings; return the partition and its counts.

    ``pseudonym``: the key settings (default: the environment's key); every
    input must have been written with that key (LakeKeyMismatch otherwise)."""
    as_of = as_of_str(as_of)
    lake = LakePaths(lake_root)
    screening_m = _required(lake.screening(as_of), "the screening list", "`medscreen score emr`")
    scores_m = _required(lake.scores(EMR_MODEL, as_of), "the EMR scores", "`medscreen score emr`")
    timelines_m = _required(lake.timelines(as_of), "the timelines", "`medscreen emr features`")
    findings_dir = lake.findings(CT_MODEL, as_of)
    inputs = {f"screening/as_of={as_of}": screening_m, f"scores/model={EMR_MODEL}/as_of={as_of}": scores_m,
              f"emr/timelines/as_of={as_of}": timelines_m}
    if is_committed(findings_dir):
        inputs[f"findings/model={CT_MODEL}/as_of={as_of}"] = read_manifest(findings_dir)
    key_fp = stage_key_fingerprint(pseudonym if pseudonym is not None else PseudonymSettings(), lake.root,
                                   inputs)
    findings = read_partition(findings_dir) if is_committed(findings_dir) else None
    population = set(read_partition(lake.timelines(as_of), columns=["patient_key"])
                     .column("patient_key").to_pylist())
    table, counts = worklist_rows(read_partition(lake.screening(as_of)), read_partition(lake.scores(EMR_MODEL, as_of)),
                                  findings, population, dt.date.fromisoformat(as_of))
    run_id = run_id or new_run_id(STAGE)
    run_dir = lake.run(run_id)
    ledger = StageLedger(STAGE, records_in=counts["patients_in"], records_out=counts["rows"], unit="patients",
                         ignored={k: counts[k] for k in (IGNORED_NOT_IN_POPULATION,) if counts[k]})
    write_ledger(run_dir, ledger)
    ledger.check()
    manifest = {"stage": STAGE, "run_id": run_id, "as_of": as_of, "counts": counts,
                "inputs": {"screening": screening_m.get("run_id"), "scores": scores_m.get("run_id"),
                           "timelines": timelines_m.get("run_id"),
                           "findings": read_manifest(findings_dir).get("run_id") if findings is not None else None},
                KEY_FIELD: key_fp}
    final = lake.worklist(as_of)
    with atomic_partition(final, manifest) as staging:
        pq.write_table(table, staging / "part-00000.parquet")
    write_json_atomic(run_dir / "manifest.json", {**manifest, "output": str(final)})
    log.info("worklist %s: %d patients (%d with risk heads, %d with CT findings, %d both)", as_of,
             counts["rows"], counts["with_risk_heads"], counts["with_ct_findings"], counts["with_both"])
    return final, counts
