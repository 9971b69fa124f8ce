"""Fragments: the unit of work, of output files and of resume for EMR scoring.

A fragment is a run of consecutive row groups of one Parquet file of the
timelines partition, so the plan depends only on the committed input (same
input → same fragments → same output files). Each finished fragment is
written by the engine actor that scored it (:class:`FragmentSink`) to a
run-scoped staging directory beside the final partition as
``part-NNNNN.parquet``; the driver, told by a small manifest row, then writes
its ``_work/NNNNN.done.json`` marker. Only marked fragments count: a driver
that crashed is resumed with the same ``run_id`` and re-scores only fragments
without a marker (their stray files are dropped). The final commit
(lake.commit.commit) swaps the whole directory in at once. The record
carries the fragment's score summary (inference.score_stats), so QC, drift
and the report's histograms never read the scores back.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from inference import score_stats, screening
from lake.commit import partition_files
from lake.files import write_bytes_atomic
from lake.schemas import HEADS, PREVALENT_COLUMNS, SCORES

DEFAULT_FRAGMENT_ROWS = 65_536
WORK = "_work"
PLAN = "plan.json"


@dataclass(frozen=True)
class FragmentSpec:
    """A unit of work and of resume: row groups of one Parquet file of the timelines partition."""

    fragment: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int  # the first num_rows rows of those row groups (fewer than all only under a limit)


def plan_fragments(partition: Path, fragment_rows: int = DEFAULT_FRAGMENT_ROWS,
                   limit: int | None = None) -> list[FragmentSpec]:
    """Fragments of a committed partition, from Parquet footers only (no data is read).

    Plan order is files by name, then row groups in file order. ``limit`` keeps
    only the first ``limit`` rows in that order (smoke runs): fragments after it
    are left out and the last one kept is truncated (its ``num_rows`` says how
    many of its row groups' rows it takes).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 row, got {limit}")
    files = partition_files(partition)
    if not files:
        raise FileNotFoundError(f"timelines partition {partition} holds no Parquet files; "
                                "rerun `medscreen emr features` for this as-of date")
    specs: list[FragmentSpec] = []
    left = limit
    for path in files:
        md = pq.ParquetFile(path).metadata
        groups: list[int] = []
        rows = 0
        for rg in range(md.num_row_groups):
            if left == 0:
                break
            n = md.row_group(rg).num_rows if left is None else min(md.row_group(rg).num_rows, left)
            groups.append(rg)
            rows += n
            left = None if left is None else left - n
            if rows >= fragment_rows:
                specs.append(FragmentSpec(len(specs), str(path), tuple(groups), rows))
                groups, rows = [], 0
        if groups:
            specs.append(FragmentSpec(len(specs), str(path), tuple(groups), rows))
        if left == 0:
            break
    return specs


def fragment_name(fragment: int) -> str:
    return f"part-{fragment:05d}.parquet"


class RunStaging:
    """The run-scoped staging directory of one scoring attempt (one engine precision)."""

    def __init__(self, final: Path, run_id: str, attempt: str):
        self.final = Path(final)
        self.path = self.final.parent / f".staging-{self.final.name}-{run_id}-{attempt}"
        self.work = self.path / WORK

    def open(self, plan: dict[str, Any]) -> set[int]:
        """Create or resume; return fragments already done. Refuse a resume under another plan."""
        plan_file = self.work / PLAN
        if plan_file.is_file():
            old = json.loads(plan_file.read_text())
            if old != _jsonable(plan):
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != _jsonable(plan).get(k))
                raise RuntimeError(f"cannot resume: staging {self.path.name} was planned with different "
                                   f"{', '.join(changed)}; start a new run (omit run_id) instead")
        else:
            self.work.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(plan_file, json.dumps(_jsonable(plan), indent=2, sort_keys=True).encode())
        done = set()
        for marker in self.work.glob("*.done.json"):
            done.add(int(marker.name.split(".")[0]))
        # A part file without its marker is from a crash mid-write: it is redone, so drop it now.
        for part in self.path.glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) not in done:
                part.unlink()
        return done

    def write_parts(self, fragment: int, scores: pa.Table, quarantine: pa.Table,
                    candidates: pa.Table | None = None) -> None:
        """Write one fragment's data files (and its screening candidates, beside the resume bookkeeping);
        they count only once :meth:`mark_done` writes its marker.

        Safe to repeat (a retried actor task rewrites the same content): each
        file is written under a unique temporary name and renamed into place.
        """
        unique = uuid.uuid4().hex[:8]
        tmp = self.path / f".{fragment_name(fragment)}.{unique}.tmp"
        # Row groups of a fixed size keep the file layout independent of batch scheduling.
        pq.write_table(scores, tmp, row_group_size=1 << 17, compression="zstd")
        os.replace(tmp, self.path / fragment_name(fragment))
        if quarantine.num_rows:
            qtmp = self.work / f".{fragment:05d}.quarantine.{unique}.tmp"
            pq.write_table(quarantine, qtmp)
            os.replace(qtmp, self._quarantine_file(fragment))
        if candidates is not None:
            ctmp = self.work / f".{fragment:05d}.candidates.{unique}.tmp"
            pq.write_table(candidates, ctmp)
            os.replace(ctmp, self._candidates_file(fragment))

    def mark_done(self, fragment: int, record: dict[str, Any]) -> None:
        write_bytes_atomic(self.work / f"{fragment:05d}.done.json", json.dumps(record).encode())

    def drop_parts(self, fragment: int) -> None:
        """Remove data files of a fragment that was never marked done (a resume redoes it)."""
        for path in (self.path / fragment_name(fragment), self._quarantine_file(fragment),
                     self._candidates_file(fragment)):
            path.unlink(missing_ok=True)

    def _quarantine_file(self, fragment: int) -> Path:
        return self.work / f"{fragment:05d}.quarantine.parquet"

    def _candidates_file(self, fragment: int) -> Path:
        return self.work / f"{fragment:05d}.candidates.parquet"

    def candidates(self, fragment: int) -> pa.Table:
        """The screening candidates a fragment's actor staged (read before :meth:`seal` removes them)."""
        return pq.read_table(self._candidates_file(fragment))

    def records(self) -> list[dict[str, Any]]:
        """Every done marker's record, in fragment order."""
        return [json.loads(p.read_text()) for p in sorted(self.work.glob("*.done.json"))]

    def quarantine(self) -> pa.Table | None:
        files = sorted(self.work.glob("*.quarantine.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]) if files else None

    def part_files(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def seal(self) -> Path:
        """Remove the resume bookkeeping so only data files are left to commit."""
        shutil.rmtree(self.work, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def exists(self) -> bool:
        return self.path.is_dir()


@dataclass(frozen=True)
class FragmentSink:
    """Where the fragments an engine actor scored are written (by a writer task beside it, or by the
    actor itself): one attempt's run staging.

    Built by the driver, shipped to every writer: the scored rows never travel
    back through the driver, only the marker record :meth:`write` returns.
    """

    final: str
    run_id: str
    precision: str
    attempt_id: str
    as_of: str
    model: str
    model_version: str
    engine_fingerprint: str
    # The model card's calibration (engines.calibration.Calibration), applied to the engine's
    # raw outputs before they are written; None writes raw outputs.
    calibration: Any = None
    # The drift reference's PSI bin edges per head (inference.qc.psi_reference); None: no drift check.
    psi_edges: Any = None
    # The screening list's criteria (inference.screening.Criteria); None: the list reads every score.
    screening_criteria: Any = None

    def staging(self) -> RunStaging:
        return RunStaging(Path(self.final), self.run_id, self.precision)

    def write(self, fragment: int, rows_in: int, keys: np.ndarray, probs: np.ndarray,
              quarantine_keys: np.ndarray, quarantine_reasons: np.ndarray,
              batches: list[dict[str, Any]],
              facts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """Write one fragment's scores (sorted by key) and quarantine; return its marker record.

        ``facts`` (age, encounters, prevalence bits of each scored row; inference.emr_actors.eligibility_facts)
        let the fragment's screening candidates be staged beside it, so the list never reads every score.
        """
        t0 = time.perf_counter()
        if self.calibration is not None:
            probs = self.calibration.apply(probs, HEADS)
        # UTF-8 bytes sort in code-point order, as the decoded strings would: no decode to sort.
        order = np.argsort(keys, kind="stable")
        n = len(order)

        def const(value: Any, typ: pa.DataType) -> pa.Array:
            return pa.repeat(pa.scalar(value, typ), n)

        # What QC, drift and the report need, summarised here so the driver never reads the scores back.
        stats = score_stats.of_scores(probs.astype(np.float32, copy=False), self.psi_edges)
        table = pa.table({
            "patient_key": _utf8(keys[order]),
            "as_of": const(dt.date.fromisoformat(self.as_of), pa.date32()),
            "model": const(self.model, pa.string()),
            "model_version": const(self.model_version, pa.string()),
            "engine_fingerprint": const(self.engine_fingerprint, pa.string()),
            "precision": const(self.precision, pa.string()),
            "run_id": const(self.run_id, pa.string()),
            **{f"score_{h}": pa.array(probs[order, j], pa.float32()) for j, h in enumerate(HEADS)},
        }, schema=SCORES)
        quarantine = pa.table({"patient_key": _utf8(quarantine_keys), "reason": _utf8(quarantine_reasons)})
        reasons, counts = (np.unique(quarantine_reasons, return_counts=True) if len(quarantine_reasons)
                           else ([], []))
        candidates, screening_record = self._candidates(table, order, facts)
        self.staging().write_parts(fragment, table, quarantine, candidates)
        return {"fragment": fragment, "rows_in": rows_in, "rows_out": n,
                "quarantined": {r.decode(): int(c) for r, c in zip(reasons, counts)},
                "attempt_id": self.attempt_id, "batches": batches, "stats": stats,
                "screening": screening_record, "write_s": round(time.perf_counter() - t0, 6)}

    def _candidates(self, table: pa.Table, order: np.ndarray,
                    facts: tuple[np.ndarray, np.ndarray, np.ndarray] | None
                    ) -> tuple[pa.Table | None, dict[str, Any] | None]:
        """The fragment's screening candidates and population counts (inference.screening), or
        (None, None) when a fact is missing: the driver then makes them from the files."""
        if self.screening_criteria is None or facts is None or any(len(f) != len(order) for f in facts):
            return None, None
        age, encounters, bits = (f[order] for f in facts)
        if (encounters < 0).any() or (self.screening_criteria.exclude_prevalent and (bits & 0x80).any()):
            return None, None
        named = {"age_years": age.astype(np.float64), "encounters": encounters.astype(np.int64),
                 **{c: (bits >> j) & 1 == 1 for j, c in enumerate(PREVALENT_COLUMNS)}}
        candidates, population = screening.fragment_candidates(self.screening_criteria, table, named)
        return candidates, {"criteria": self.screening_criteria.to_dict(), "population": population}


def _utf8(values: np.ndarray) -> pa.Array:
    """Fixed-width UTF-8 bytes (numpy S) as an Arrow string array, without a Python-level decode."""
    return pa.array(values if len(values) else [], pa.string())


def spec_dicts(specs: list[FragmentSpec]) -> list[dict[str, Any]]:
    return [asdict(s) for s in specs]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))

