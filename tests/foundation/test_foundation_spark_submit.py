"""Jobs started by spark-submit keep the submitter's master; jobs started from Python use settings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medscreen_airflow.spark_submit import spark_env

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from conf.settings import load_settings
from jobs.spark_session import get_spark
spark = get_spark(load_settings({{"spark.master": "local[2]"}}).spark, "master-check")
print("MASTER=" + spark.sparkContext.master)
spark.stop()
"""


def test_spark_submit_master_wins_over_settings(tmp_path: Path) -> None:
    script = tmp_path / "master_check.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = spark_env()
    spark_submit = Path(env["PATH"].split(":")[0]) / "spark-submit"
    out = subprocess.run([str(spark_submit), "--master", "local[1]", str(script)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MASTER=local[1]" in out.stdout, out.stdout[-500:]


def test_python_started_job_uses_settings_master() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO))], env=spark_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MASTER=local[2]" in out.stdout, out.stdout[-500:]
