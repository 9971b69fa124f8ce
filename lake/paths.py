"""Where everything lives under the lake root, and the as-of dates partition paths name."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def as_of_str(as_of: dt.date | str) -> str:
    """Normalise an as-of date to ``YYYY-MM-DD``; raise ValueError naming the bad value."""
    if isinstance(as_of, dt.date):
        return as_of.isoformat()
    try:
        return dt.date.fromisoformat(str(as_of)).isoformat()
    except ValueError:
        raise ValueError(f"as-of date {as_of!r} is not a date in YYYY-MM-DD form") from None


def as_of_date(as_of: dt.date | str) -> dt.date:
    """An as-of date as a ``datetime.date`` (through :func:`as_of_str`, so the same values are accepted)."""
    return dt.date.fromisoformat(as_of_str(as_of))


AS_OF_PREFIX = "as_of="


def as_of_of(path: Path) -> str:
    """The as-of date a partition path names: ``.../as_of=D`` or one of its versions
    (``.../.versions/as_of=D/<version>``). Raise ValueError for any other path.

    For code that really holds only a path (a partition handed on, a directory
    listing); a stage that knows its as-of date passes it on instead.
    """
    path = Path(path)
    for name in (path.name, path.parent.name):
        if name.startswith(AS_OF_PREFIX):
            return as_of_str(name[len(AS_OF_PREFIX):])
    raise ValueError(f"{path.name} is not an as_of=YYYY-MM-DD partition (nor a version of one)")


def latest_as_of(table: Path, before: dt.date | str | None = None,
                 keep: Callable[[Path], bool] = lambda p: True) -> Path | None:
    """The ``as_of=D`` partition of ``table`` with the latest D (strictly before ``before`` when
    given) among those ``keep`` accepts (e.g. lake.commit.is_committed); None when there is none."""
    table = Path(table)
    limit = as_of_str(before) if before is not None else None
    best: tuple[str, Path] | None = None
    if table.is_dir():
        for p in table.iterdir():
            if not p.name.startswith(AS_OF_PREFIX):
                continue
            try:
                d = as_of_of(p)
            except ValueError:
                continue  # not a date: never a partition this lake wrote
            if (limit is None or d < limit) and (best is None or d > best[0]) and keep(p):
                best = (d, p)
    return best[1] if best else None


# The namespace of outputs from runs that must never be published (see LakePaths.scores).
TRIAL = "trial"


def is_trial_run(limit: int | None, force_ungated: bool) -> bool:
    """A run whose outputs go to the trial namespace: limited to N rows, or scored ungated."""
    return limit is not None or bool(force_ungated)


@dataclass(frozen=True)
class LakePaths:
    """The lake layout. Every partition below is committed atomically (see lake.commit)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # EMR
    @property
    def events(self) -> Path:
        return self.root / "emr" / "events"

    @property
    def patients(self) -> Path:
        return self.root / "emr" / "patients"

    @property
    def observation_periods(self) -> Path:
        return self.root / "emr" / "observation_periods"

    @property
    def emr_quarantine(self) -> Path:
        return self.root / "emr" / "quarantine"

    def timelines(self, as_of: dt.date | str) -> Path:
        return self.root / "emr" / "timelines" / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    @property
    def vocabulary(self) -> Path:
        return self.root / "emr" / "vocabulary"

    # Imaging
    @property
    def dicom_instances(self) -> Path:
        return self.root / "imaging" / "instances"

    @property
    def dicom_series(self) -> Path:
        return self.root / "imaging" / "series"

    @property
    def imaging_link(self) -> Path:
        return self.root / "imaging" / "patient_link"

    @property
    def imaging_quarantine(self) -> Path:
        return self.root / "imaging" / "quarantine"

    # Outputs. ``trial=True``: a smoke (``--limit``) or forced-ungated run's outputs, kept under
    # LAKE/trial/ so they can never replace the scores and outreach lists of a real run.
    def _outputs(self, trial: bool) -> Path:
        return self.root / TRIAL if trial else self.root

    def scores(self, model: str, as_of: dt.date | str, trial: bool = False) -> Path:
        return self._outputs(trial) / "scores" / f"model={model}" / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    def findings(self, model: str, as_of: dt.date | str, trial: bool = False) -> Path:
        return self._outputs(trial) / "findings" / f"model={model}" / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    def screening(self, as_of: dt.date | str, trial: bool = False) -> Path:
        return self._outputs(trial) / "screening" / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    def worklist(self, as_of: dt.date | str) -> Path:
        return self.root / "worklist" / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    def cohort(self, name: str) -> Path:
        return self.root / "cohorts" / name

    def report(self, dag_id: str, as_of: dt.date | str) -> Path:
        """A DAG run's report partition (``reports/<dag_id>/as_of=D``)."""
        return self.root / "reports" / dag_id / f"{AS_OF_PREFIX}{as_of_str(as_of)}"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, run_id: str) -> Path:
        return self.runs / run_id

    @property
    def engines(self) -> Path:
        return self.root / "engines"

