# medscreen — `make demo` runs the pipeline on the embedded default,
# `make test` runs the test suite (the cluster tests start and stop their own
# clusters), `make cluster` starts local Spark and Ray clusters to try. Both create .venv and install pinned
# dependencies (constraints.txt) when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= work/demo

.PHONY: demo test bench airflow cluster cluster-stop venv clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==$$(grep -E '^pip==' constraints.txt | cut -d= -f3)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[airflow,dev,inductor,tensorrt,train]'
	@# The Spark provider pulls pyspark-client, whose files overwrite pyspark's own
	@# (pyspark/version.py then reports the client's version). Reinstall the pinned
	@# pyspark last so the Python side matches its jars.
	$(PY) -m pip install --quiet --no-deps --force-reinstall -c constraints.txt pyspark
	$(PY) -c "import pyspark, sys; v = pyspark.__version__; sys.exit(0 if v.startswith('4.3') else 'pyspark ' + v + ' is not 4.3')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medscreen demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/emr_features.py
	$(PY) bench/engines.py
	$(PY) bench/emr_scoring.py
	$(PY) bench/ct.py
	$(PY) bench/notes.py

airflow: $(STAMP)
	bash dags/standalone.sh

# A Spark standalone master + worker and a Ray head + worker node on 127.0.0.1,
# each its own process group, pids under $(CLUSTER_DIR); prints how to point
# the CLI and Airflow at them. `make cluster-stop` stops exactly those.
CLUSTER_DIR ?= work/cluster
cluster: $(STAMP)
	$(PY) deploy/local_cluster.py start --state-dir $(CLUSTER_DIR)

cluster-stop:
	$(PY) deploy/local_cluster.py stop --state-dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) work
