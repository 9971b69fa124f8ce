"""The CLI installs and runs without Airflow (an extra): run in a child process where importing
airflow fails, `medscreen --help` and a real command still work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Put first on the child's sys.meta_path by a sitecustomize module: any import of airflow fails,
# as it does where medscreen is installed without the [airflow] extra.
BLOCKER = '''
import sys


class _NoAirflow:
    def find_spec(self, name, path=None, target=None):
        if name == "airflow" or name.startswith("airflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoAirflow())
'''


def _without_airflow(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "no_airflow"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_the_blocker_really_blocks_airflow(tmp_path: Path) -> None:
    proc = _without_airflow(tmp_path, "-c", "import airflow")
    assert proc.returncode != 0 and "No module named 'airflow'" in proc.stderr


def test_cli_runs_without_airflow(tmp_path: Path) -> None:
    help_ = _without_airflow(tmp_path, "-m", "medscreen", "--help")
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "synth" in help_.stdout and "score" in help_.stdout
    out = tmp_path / "emr"
    run = _without_airflow(tmp_path, "-m", "medscreen", "synth", "emr", "--patients", "20", "--seed", "3",
                           "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "Patient.ndjson").is_file()
    patients = [json.loads(line) for line in (out / "Patient.ndjson").read_text().splitlines() if line.strip()]
    assert len([p for p in patients if p.get("resourceType") == "Patient"]) >= 20
