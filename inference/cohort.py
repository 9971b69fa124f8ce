"""Research cohorts: the definition, its index dates, and member selection at each index date.

A cohort is defined by code groups (the concept sets of conf/code_groups.yaml:
ICD-10-CM, ICD-9-CM, SNOMED CT, OMOP concepts) a patient must have (any of
``include_groups``) and must not have (none of ``exclude_groups``) — affirmed
or history diagnoses whose clinical and known times are both on or before the
index date (end of day, UTC), so selection is point-in-time like the
timelines — and an age range at the index date. Membership is the events'
``code_groups`` column, which ingest filled with
``preprocessing.code_groups.groups_for``: the one definition the timelines'
flags and labels use too. Index dates run from ``index_start`` to
``index_end`` every ``step_days``. With ``require_ct_findings`` the members at a
date are further restricted to patients with CT findings in that date's
findings partition (joined to the EMR patient through LAKE/imaging/patient_link
at CT scoring).

Results live under ``LAKE/cohorts/<name>/``: ``definition.json`` beside one
committed partition per index date (``index_date=D/``: members + their EMR
scores, and CT findings when CT was scored) and ``summary.json``.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from conf.settings import PseudonymSettings
from lake.commit import (atomic_partition, is_committed, partition_files, read_manifest, reading,
                         reading_together)
from lake.files import write_json_atomic
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.paths import LakePaths, as_of_date, as_of_str

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Longest range one cohort run may expand into (each date is a Spark job + a scoring run).
MAX_INDEX_DATES = 366
# Assertions that count a diagnosis (preprocessing.vocabulary.TOKEN_ASSERTIONS, the timelines' rule).
COUNTED_ASSERTIONS = ("affirmed", "history")
DX_KINDS = ("dx", "dx_text")


class CohortDefinitionError(ValueError):
    """A cohort parameter is invalid; the message names it and what is allowed."""


def code_group_names(code_groups_file: Path) -> list[str]:
    """The group names of ``conf/code_groups.yaml``, validated by the one loader; [] if it is absent."""
    from preprocessing.code_groups import load_code_groups

    if not Path(code_groups_file).is_file():
        return []
    return sorted(load_code_groups(code_groups_file).names)


@dataclass(frozen=True)
class CohortDefinition:
    """A validated cohort definition (what the trigger form asked for)."""

    name: str
    include_groups: list[str]
    exclude_groups: list[str] = field(default_factory=list)
    age_min_years: float = 0.0
    age_max_years: float = 120.0
    index_start: str = ""
    index_end: str = ""
    step_days: int = 30
    models: list[str] = field(default_factory=lambda: ["emr_risk"])
    require_ct_findings: bool = False

    def index_dates(self) -> list[str]:
        """Every index date from start to end (inclusive) every ``step_days``."""
        start, end = dt.date.fromisoformat(self.index_start), dt.date.fromisoformat(self.index_end)
        days = (end - start).days
        return [(start + dt.timedelta(days=d)).isoformat() for d in range(0, days + 1, self.step_days)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def define_cohort(params: dict[str, Any], known_groups: list[str],
                  known_models: tuple[str, ...] = ("emr_risk", "ct_nodule")) -> CohortDefinition:
    """Validate the trigger-form params into a CohortDefinition; raise CohortDefinitionError naming the bad one."""
    errors: list[str] = []
    name = str(params.get("cohort_name") or "")
    if not NAME_PATTERN.match(name):
        errors.append(f"cohort_name {name!r}: use 1-64 lowercase letters, digits, '_' or '-', "
                      "starting with a letter or digit")
    include = list(params.get("include_groups") or [])
    exclude = list(params.get("exclude_groups") or [])
    if not include:
        errors.append("include_groups: name at least one ICD code group")
    known = set(known_groups)
    for key, groups in (("include_groups", include), ("exclude_groups", exclude)):
        unknown = sorted(set(groups) - known)
        if unknown:
            errors.append(f"{key}: unknown code group(s) {unknown}; known: {sorted(known)} "
                          "(conf/code_groups.yaml)")
    both = sorted(set(include) & set(exclude))
    if both:
        errors.append(f"groups {both} are both included and excluded")
    age_min = float(params.get("age_min_years", 0) or 0)
    age_max = float(params.get("age_max_years", 120) if params.get("age_max_years") is not None else 120)
    if not 0 <= age_min <= age_max:
        errors.append(f"age range [{age_min}, {age_max}]: need 0 <= age_min_years <= age_max_years")
    try:
        start = dt.date.fromisoformat(str(params.get("index_start")))
        end = dt.date.fromisoformat(str(params.get("index_end")))
    except ValueError:
        errors.append(f"index_start/index_end {params.get('index_start')!r}/{params.get('index_end')!r}: "
                      "give both as YYYY-MM-DD")
        start = end = None
    step = int(params.get("step_days") or 0)
    if step < 1:
        errors.append(f"step_days {step}: must be at least 1")
    if start and end:
        if end < start:
            errors.append(f"index_end {end} is before index_start {start}")
        elif step >= 1 and (end - start).days // step + 1 > MAX_INDEX_DATES:
            errors.append(f"{(end - start).days // step + 1} index dates: at most {MAX_INDEX_DATES} "
                          "per run; widen step_days or split the range")
    models = list(params.get("models") or [])
    if not models or set(models) - set(known_models):
        errors.append(f"models {models}: choose one or more of {list(known_models)}")
    require_ct = bool(params.get("require_ct_findings", False))
    if require_ct and "ct_nodule" not in models:
        errors.append("require_ct_findings: add ct_nodule to models (findings come from CT scoring)")
    if errors:
        raise CohortDefinitionError("invalid cohort definition:\n" + "\n".join(f"- {e}" for e in errors))
    return CohortDefinition(name=name, include_groups=sorted(include), exclude_groups=sorted(exclude),
                            age_min_years=age_min, age_max_years=age_max,
                            index_start=start.isoformat(), index_end=end.isoformat(),
                            step_days=step, models=sorted(models), require_ct_findings=require_ct)


def store_definition(lake_root: Path, definition: CohortDefinition, replace: bool = False) -> Path:
    """Write ``LAKE/cohorts/<name>/definition.json``.

    A cohort name is not silently reused for a different definition: that
    fails unless ``replace`` is set, in which case the old results are removed.
    """
    cohort_dir = LakePaths(lake_root).cohort(definition.name)
    path = cohort_dir / "definition.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != definition.to_dict():
            if not replace:
                raise CohortDefinitionError(
                    f"cohort {definition.name!r} already exists with a different definition; "
                    "choose another cohort_name or trigger with replace=true")
            import shutil
            shutil.rmtree(cohort_dir)
    return write_json_atomic(path, definition.to_dict())


def _end_of_day_utc(as_of: str) -> pa.Scalar:
    day = as_of_date(as_of)
    eod = dt.datetime.combine(day, dt.time.max, tzinfo=dt.timezone.utc)
    return pa.scalar(eod, type=pa.timestamp("us", tz="UTC"))


def _patients_with_groups(events: ds.Dataset, as_of: str, groups: list[str]) -> set[str]:
    """Patients with an affirmed or history diagnosis in any of ``groups`` whose clinical and known
    times are both on or before as-of (end of day UTC)."""
    if not groups:
        return set()
    eod = _end_of_day_utc(as_of)
    flt = ((ds.field("event_time") <= eod)
           & (ds.field("known_time").is_null() | (ds.field("known_time") <= eod))
           & ds.field("kind").isin(list(DX_KINDS))
           & ds.field("assertion").isin(list(COUNTED_ASSERTIONS)))
    table = events.to_table(columns=["patient_key", "code_groups"], filter=flt)
    if table.num_rows == 0:
        return set()
    groups_col = table.column("code_groups").combine_chunks()
    flat = pc.list_flatten(groups_col)
    parents = pc.list_parent_indices(groups_col)
    hit = pc.is_in(flat, value_set=pa.array(groups, pa.string()))
    rows = pc.filter(parents, hit)
    keys = pc.take(table.column("patient_key"), rows)
    return set(pc.unique(keys).to_pylist())


def select_members(lake_root: Path, definition: CohortDefinition, as_of: str) -> pa.Table:
    """Cohort members at index date ``as_of``: patient_key, sex, age_years (sorted by key).

    In: any include group, none of the exclude groups (point-in-time), age at
    the index date within [age_min_years, age_max_years].
    """
    lake = LakePaths(lake_root)
    for table_dir in (lake.events, lake.patients):
        if not is_committed(table_dir):
            raise FileNotFoundError(f"{table_dir} is not committed; run `medscreen emr ingest` "
                                    "(the emr_ingest task) first")
    # Events and patients of one ingest (one reading of its set pointer), leased while read: a
    # commit during the selection cannot mix versions.
    with reading_together(lake.events, lake.patients) as (events_version, patients_version):
        events = ds.dataset(partition_files(events_version), format="parquet", exclude_invalid_files=True)
        included = _patients_with_groups(events, as_of, definition.include_groups)
        excluded = _patients_with_groups(events, as_of, definition.exclude_groups)
        candidates = sorted(included - excluded)
        patients = ds.dataset(partition_files(patients_version), format="parquet",
                              exclude_invalid_files=True).to_table(
            columns=["patient_key", "birth_date", "sex"],
            filter=ds.field("patient_key").isin(candidates) if candidates else None)
    if not candidates:
        patients = patients.slice(0, 0)
    index_day = as_of_date(as_of)
    births = patients.column("birth_date").to_pylist()
    ages = [None if b is None else (index_day - b).days / 365.25 for b in births]
    age_arr = pa.array(ages, pa.float64())
    keep = pc.and_(pc.greater_equal(age_arr, definition.age_min_years),
                   pc.less_equal(age_arr, definition.age_max_years))
    keep = pc.fill_null(keep, False)  # no birth date: age unknown, not in an age-bounded cohort
    members = pa.table({"patient_key": patients.column("patient_key"),
                        "sex": patients.column("sex"),
                        "age_years": age_arr}).filter(keep)
    return members.sort_by("patient_key")


def _read_committed(path: Path, keys: pa.Array) -> tuple[pa.Table, dict[str, Any]] | None:
    """The rows of ``keys`` in one committed version of ``path``, and that version's manifest."""
    if not is_committed(path):
        return None
    with reading(path) as version:
        table = ds.dataset(partition_files(version), format="parquet", exclude_invalid_files=True).to_table(
            filter=ds.field("patient_key").isin(keys))
        return table, read_manifest(version)


def write_index_date(lake_root: Path, definition: CohortDefinition, as_of: str,
                     trial: bool = False, run_id: str | None = None,
                     pseudonym: PseudonymSettings | None = None) -> dict[str, Any]:
    """Select members at ``as_of`` and commit ``LAKE/cohorts/<name>/index_date=D/``.

    The partition holds ``members.parquet`` (members left-joined to their EMR
    scores for D) and, when CT was scored, ``findings.parquet`` (members'
    findings for D). Returns counts for the summary. ``pseudonym``: the key
    settings (default: the environment's key); every input must have been
    written with that key (:class:`lake.keys.LakeKeyMismatch` otherwise).
    """
    lake = LakePaths(lake_root)
    as_of = as_of_str(as_of)
    pseudonym = pseudonym if pseudonym is not None else PseudonymSettings()
    key_fp = stage_key_fingerprint(pseudonym, lake.root, {
        name: read_manifest(path) for name, path in (("emr/events", lake.events), ("emr/patients", lake.patients))
        if is_committed(path)})
    members = select_members(lake_root, definition, as_of)
    counts: dict[str, Any] = {"index_date": as_of}
    versions: dict[str, Any] = {}
    findings = None
    if "ct_nodule" in definition.models:
        findings_dir = lake.findings("ct_nodule", as_of, trial=trial)
        read = _read_committed(findings_dir, members.column("patient_key"))
        if read is None:
            raise FileNotFoundError(f"{findings_dir} is not committed; the score_ct task for {as_of} "
                                    "must succeed first")
        findings, findings_manifest = read
        stage_key_fingerprint(pseudonym, lake.root, {f"{findings_dir.relative_to(lake.root)}": findings_manifest})
        versions["findings"] = findings_manifest.get("version")
        if definition.require_ct_findings:
            # Findings of unlinked series have no patient_key and match no member.
            with_findings = pc.unique(findings.column("patient_key").drop_null())
            members = members.filter(pc.is_in(members.column("patient_key"), value_set=with_findings))
        counts["findings"] = findings.num_rows
    keys = members.column("patient_key")
    counts["members"] = members.num_rows
    scores_run = None
    versions: dict[str, Any] = {}
    if "emr_risk" in definition.models:
        scores_dir = lake.scores("emr_risk", as_of, trial=trial)
        read = _read_committed(scores_dir, keys)
        if read is None:
            raise FileNotFoundError(f"{scores_dir} is not committed; the score_emr task for {as_of} "
                                    "must succeed first")
        scores, scores_manifest = read
        stage_key_fingerprint(pseudonym, lake.root, {f"{scores_dir.relative_to(lake.root)}": scores_manifest})
        score_cols = [c for c in scores.column_names if c != "patient_key" and c != "as_of"]
        members = members.join(scores.select(["patient_key", *score_cols]), "patient_key",
                               join_type="left outer").sort_by("patient_key")
        counts["members_scored"] = members.num_rows - members.column(score_cols[0]).null_count
        scores_run = scores_manifest.get("run_id")
        versions["scores"] = scores_manifest.get("version")
    final = lake.cohort(definition.name) / f"index_date={as_of}"
    with atomic_partition(final, {"cohort": definition.name, "index_date": as_of,
                                  "definition": definition.to_dict(), "scores_run_id": scores_run,
                                  "input_versions": versions, "trial": trial, KEY_FIELD: key_fp, **counts},
                          run_id=run_id) as staging:
        pq.write_table(members, staging / "members.parquet")
        if findings is not None:
            pq.write_table(findings, staging / "findings.parquet")
    return counts


def write_summary(lake_root: Path, definition: CohortDefinition,
                  per_date: list[dict[str, Any]], airflow_run_id: str | None = None) -> Path:
    """Write ``LAKE/cohorts/<name>/summary.json`` (counts per index date, sorted by date)."""
    path = LakePaths(lake_root).cohort(definition.name) / "summary.json"
    return write_json_atomic(path, {
        "cohort": definition.name, "definition": definition.to_dict(),
        "index_dates": sorted(per_date, key=lambda d: d["index_date"]),
        "airflow_run_id": airflow_run_id,
        "written_at_utc": dt.datetime.now(dt.timezone.utc).isoformat()})
