"""Fragments: the unit of work, of output files and of resume for EMR scoring.

A fragment is a run of consecutive row groups of one Parquet file of the
timelines partition, so the plan depends only on the committed input (same
input → same fragments → same output files). Each finished fragment is
written to a run-scoped staging directory beside the final partition as
``part-NNNNN.parquet`` followed by a ``_work/NNNNN.done.json`` marker; a
driver that crashed is resumed with the same ``run_id`` and re-scores only
fragments without a marker. The final commit (lake.commit.commit) swaps the
whole directory in at once.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from inference.actors import FragmentSpec
from lake.commit import partition_files

DEFAULT_FRAGMENT_ROWS = 65_536
WORK = "_work"
PLAN = "plan.json"


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
            _atomic_write(plan_file, json.dumps(_jsonable(plan), indent=2, sort_keys=True).encode())
        done = set()
        for marker in self.work.glob("*.done.json"):
            done.add(int(marker.name.split(".")[0]))
        # A part file without its marker is from a crash mid-write: it is redone, so drop it now.
        for part in self.path.glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) not in done:
                part.unlink()
        return done

    def write_parts(self, fragment: int, scores: pa.Table, quarantine: pa.Table) -> None:
        """Write one fragment's data files; they count only once :meth:`mark_done` writes its marker."""
        tmp = self.path / f".{fragment_name(fragment)}.tmp"
        # Row groups of a fixed size keep the file layout independent of batch scheduling.
        pq.write_table(scores, tmp, row_group_size=1 << 17, compression="zstd")
        os.replace(tmp, self.path / fragment_name(fragment))
        if quarantine.num_rows:
            qtmp = self.work / f".{fragment:05d}.quarantine.tmp"
            pq.write_table(quarantine, qtmp)
            os.replace(qtmp, self._quarantine_file(fragment))

    def mark_done(self, fragment: int, record: dict[str, Any]) -> None:
        _atomic_write(self.work / f"{fragment:05d}.done.json", json.dumps(record).encode())

    def drop_parts(self, fragment: int) -> None:
        """Remove data files of a fragment that was never marked done (a resume redoes it)."""
        for path in (self.path / fragment_name(fragment), self._quarantine_file(fragment)):
            path.unlink(missing_ok=True)

    def _quarantine_file(self, fragment: int) -> Path:
        return self.work / f"{fragment:05d}.quarantine.parquet"

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


def spec_dicts(specs: list[FragmentSpec]) -> list[dict[str, Any]]:
    return [asdict(s) for s in specs]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
