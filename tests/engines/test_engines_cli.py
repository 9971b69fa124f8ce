"""``medscreen engines`` through the real entry point: build prints the plan path last; inspect; verify fails on mismatch."""
from __future__ import annotations

import json
from pathlib import Path

from medscreen.cli import main

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)


def test_build_inspect_verify(engines_lake, tmp_path, capsys):
    common = ["--lake", str(engines_lake), "--cache", str(tmp_path / "cache")]
    assert main(["engines", "build", "--model", "emr_risk", "--backend", "onnxruntime",
                 "--precision", "fp16", *common, "--as-of", AS_OF, "--gate"]) == 0
    out, err = capsys.readouterr()
    plan = Path(out.strip().splitlines()[-1])
    assert plan.is_file() and plan.parent.parent == tmp_path / "cache" and "gate: PASSED" in err
    assert "(reference)" not in err, "an fp16 candidate is gated against the reference, it is not one"

    assert main(["engines", "inspect", str(plan), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert {"backend", "backend_version", "precision", "onnx_sha256", "plan_sha256"} <= set(meta)
    assert meta["gate"]["passed"] is True and "heads" in meta["gate"]["metrics"]

    assert main(["engines", "inspect", str(plan)]) == 0
    assert "fingerprint" in capsys.readouterr().out

    assert main(["engines", "verify", str(plan), *common]) == 0
    capsys.readouterr()
    plan.write_bytes(plan.read_bytes()[:-8] + b"\0" * 8)
    assert main(["engines", "verify", str(plan), *common]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err

    assert main(["engines", "ensure", "--precision", "fp16", *common]) == 2  # refuses the corrupted plan
    assert "--rebuild" in capsys.readouterr().err
    assert main(["engines", "ensure", "--precision", "fp16", "--rebuild", "--as-of", AS_OF, *common]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == plan


def test_gate_command_and_unknown_plan(engines_lake, tmp_path, capsys):
    common = ["--lake", str(engines_lake), "--cache", str(tmp_path / "cache")]
    assert main(["engines", "build", *common]) == 0
    plan = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["engines", "gate", plan, *common, "--as-of", AS_OF]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["passed"] is True and "gate: PASSED (reference)" in err
    assert main(["engines", "inspect", str(tmp_path / "nothing.plan")]) == 2
    assert "not a cached engine" in capsys.readouterr().err
