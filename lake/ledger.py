"""Per-stage record accounting: ``in = out + quarantined``, or the run fails."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lake.files import write_json_atomic


class LedgerImbalance(RuntimeError):
    """A stage lost or invented records."""


@dataclass
class StageLedger:
    stage: str
    records_in: int = 0
    records_out: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    # Records deliberately not carried forward by a documented rule (counted, never silent).
    ignored: dict[str, int] = field(default_factory=dict)
    unit: str = "records"

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def ignored_total(self) -> int:
        return sum(self.ignored.values())

    @property
    def balanced(self) -> bool:
        return self.records_in == self.records_out + self.quarantined_total + self.ignored_total

    def check(self) -> "StageLedger":
        """Raise LedgerImbalance unless in = out + quarantined (+ ignored by rule)."""
        if not self.balanced:
            raise LedgerImbalance(
                f"stage {self.stage}: {self.records_in} {self.unit} in, {self.records_out} out, "
                f"{self.quarantined_total} quarantined, {self.ignored_total} ignored by rule: "
                f"{self.records_in - self.records_out - self.quarantined_total - self.ignored_total}"
                " unaccounted for")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quarantined_total"] = self.quarantined_total
        d["ignored_total"] = self.ignored_total
        d["balanced"] = self.balanced
        return d


def write_ledger(run_dir: Path, *stages: StageLedger) -> Path:
    """Merge ``stages`` into ``run_dir/ledger.json`` (same stage name replaces) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "ledger.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    for s in stages:
        data["stages"][s.stage] = s.to_dict()
    data["balanced"] = all(v["balanced"] for v in data["stages"].values())
    return write_json_atomic(path, data)
