"""The SparkSession every job uses, configured from settings."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from conf.settings import SparkSettings


def get_spark(settings: SparkSettings, app_name: str) -> SparkSession:
    """Get or create a SparkSession (UTC, explicit shuffle partitions, UI off unless asked)."""
    # Executors must run the same interpreter as the driver (the project venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Started from Python (CLI, tests): settings pick the master. Under
        # spark-submit the JVM already runs with the submitter's --master
        # (the Airflow connection's), which must not be overridden here.
        builder = builder.master(settings.master).config("spark.driver.memory", settings.driver_memory)
    builder = (builder
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.shuffle.partitions", str(settings.shuffle_partitions))
               .config("spark.ui.enabled", str(settings.ui_enabled).lower())
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               # Stage progress bars garble the CLI's own progress lines and logs.
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
               .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
