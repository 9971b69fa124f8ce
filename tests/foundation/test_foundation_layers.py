"""The dependency direction of docs/architecture.md, checked on every import (module level or not)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = {"conf", "lake", "preprocessing", "engines", "jobs", "inference", "medscreen", "medscreen_airflow",
        "synth", "dags", "models", "bench"}
# dags → medscreen_airflow → jobs, inference → preprocessing, engines → lake → conf; the CLI (medscreen)
# sits on jobs and inference too and may use synth/ (demo, `medscreen synth`); no production floor
# imports synth/, nothing imports models/. DAG files import medscreen_airflow and Airflow only.
ALLOWED = {
    "conf": set(),
    "lake": {"conf"},
    "preprocessing": {"conf", "lake"},
    "engines": {"conf", "lake"},
    "jobs": {"conf", "lake", "preprocessing"},
    "inference": {"conf", "lake", "preprocessing", "engines"},
    "medscreen": {"conf", "lake", "preprocessing", "engines", "jobs", "inference", "synth"},
    "medscreen_airflow": {"conf", "lake", "preprocessing", "engines", "jobs", "inference"},
    # Synthetic data follows the model's heads (conf.settings.HEADS) and nothing else of ours.
    "synth": {"conf"},
    "dags": {"medscreen_airflow"},
}
# Frameworks a floor must not import: pure functions run the same in Spark, Ray and tests.
FORBIDDEN = {
    "conf": {"pyspark", "ray", "airflow", "torch"},
    "lake": {"pyspark", "ray", "airflow", "torch"},
    "preprocessing": {"pyspark", "ray", "airflow", "torch"},
    "engines": {"pyspark", "ray", "airflow", "torch"},
    "jobs": {"ray", "airflow", "torch"},
    "inference": {"pyspark", "airflow", "torch"},
    # The CLI installs and runs without Airflow (an extra: medscreen[airflow]).
    "medscreen": {"torch", "airflow"},
    "medscreen_airflow": {"torch"},
    "synth": {"pyspark", "ray", "airflow", "torch"},
    "dags": {"torch"},
}
# The inductor engine backend is torch by nature: its runner imports torch (lazily, only when that
# backend is used), and its build, alone of the production code, the model definition (models/).
EXCEPTIONS = {"engines/inductor_runner.py": {"torch"}, "engines/inductor_export.py": {"torch", "models"}}


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


def test_no_floor_imports_upwards_or_a_forbidden_framework() -> None:
    bad = []
    for floor, allowed in ALLOWED.items():
        files = sorted((REPO / floor).rglob("*.py"))
        assert files, f"no modules under {floor}/"
        for f in files:
            tops = _imports(f)
            excused = EXCEPTIONS.get(str(f.relative_to(REPO)), set())
            up = (tops & OURS) - allowed - {floor} - excused
            frameworks = (tops & FORBIDDEN[floor]) - excused
            if up or frameworks:
                bad.append(f"{f.relative_to(REPO)}: imports {sorted(up | frameworks)}")
    assert not bad, "dependency direction broken:\n" + "\n".join(bad)


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.data\n    from jobs.emr_ingest import run\n")
    assert _imports(module) == {"ray", "jobs"}
