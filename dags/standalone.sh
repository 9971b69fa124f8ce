#!/usr/bin/env bash
# `make airflow`: Airflow standalone for local use, on this checkout's DAGs.
#
# SQLite metadata DB and logs under ./work/airflow (override with AIRFLOW_HOME),
# the UI on http://127.0.0.1:8080 only (AIRFLOW_PORT to change), authentication
# on: simple auth manager, user `admin` with a generated password written to a
# 0600 file whose path is printed below. Connection `spark_default` = local[2];
# one-slot pool for the shared-table stages. The lake and inputs come from the
# usual MEDSCREEN_* variables (defaults: ./work/lake, ./work/demo/input/*); the
# pseudonymisation key from MEDSCREEN_PSEUDONYM__KEY_FILE (default ./work/pseudonym.key,
# which `medscreen keys init` creates; this script never creates a key).
#
# With arguments, runs that airflow sub-command in the same configuration instead
# of `airflow standalone` (e.g. `bash dags/standalone.sh api-server`,
# `bash dags/standalone.sh dags list`). MEDSCREEN_AIRFLOW_SETUP_ONLY=1 prepares
# everything and exits.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV_BIN="${MEDSCREEN_VENV_BIN:-$REPO/.venv/bin}"
export PATH="$VENV_BIN:$PATH"

export AIRFLOW_HOME="${AIRFLOW_HOME:-$REPO/work/airflow}"
mkdir -p "$AIRFLOW_HOME"
AIRFLOW_HOME="$(cd "$AIRFLOW_HOME" && pwd)"
PORT="${AIRFLOW_PORT:-8080}"

export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"
export AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
PASSWORDS_FILE="$AIRFLOW_HOME/admin-password.json"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$PASSWORDS_FILE"
# New DAGs start unpaused so a trigger runs at once; the nightly one has catchup off.
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}"
export NO_PROXY="*" no_proxy="*"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

# medscreen settings: a local lake and the demo's inputs unless configured.
export MEDSCREEN_LAKE__ROOT="${MEDSCREEN_LAKE__ROOT:-$REPO/work/lake}"
if [[ -z "${MEDSCREEN_INPUTS__EMR_DIR:-}" && -d "$REPO/work/demo/input/emr" ]]; then
  export MEDSCREEN_INPUTS__EMR_DIR="$REPO/work/demo/input/emr"
fi
if [[ -z "${MEDSCREEN_INPUTS__DICOM_DIR:-}" && -d "$REPO/work/demo/input/dicom" ]]; then
  export MEDSCREEN_INPUTS__DICOM_DIR="$REPO/work/demo/input/dicom"
fi
# The pseudonymisation key: an existing 0600 file, never made here (a fresh AIRFLOW_HOME must not
# re-key the lake) and never in the environment (every task process, spark-submit included,
# would inherit it).
if [[ -n "${MEDSCREEN_PSEUDONYM_KEY:-}" ]]; then
  echo "standalone.sh: MEDSCREEN_PSEUDONYM_KEY is set; unset it and point MEDSCREEN_PSEUDONYM__KEY_FILE" \
       "at the key's 0600 file" >&2
  exit 2
fi
export MEDSCREEN_PSEUDONYM__KEY_FILE="${MEDSCREEN_PSEUDONYM__KEY_FILE:-$REPO/work/pseudonym.key}"
if [[ ! -f "$MEDSCREEN_PSEUDONYM__KEY_FILE" ]]; then
  echo "standalone.sh: no pseudonymisation key at $MEDSCREEN_PSEUDONYM__KEY_FILE; create it once with" \
       "\`medscreen keys init --key-file $MEDSCREEN_PSEUDONYM__KEY_FILE\` (or set MEDSCREEN_PSEUDONYM__KEY_FILE" \
       "to the lake's existing key)" >&2
  exit 2
fi

# A generated admin password, kept across restarts, readable by this user only.
if [[ ! -s "$PASSWORDS_FILE" ]]; then
  (umask 077 && python -c "import json, secrets; print(json.dumps({'admin': secrets.token_urlsafe(18)}))" \
    > "$PASSWORDS_FILE")
fi
chmod 600 "$PASSWORDS_FILE"

# One-time setup per AIRFLOW_HOME and Airflow version (each airflow CLI call costs seconds).
STAMP="$AIRFLOW_HOME/.medscreen-setup-$(python -c 'import airflow; print(airflow.__version__)')"
if [[ ! -f "$STAMP" ]]; then
  airflow db migrate >/dev/null
  airflow connections delete spark_default >/dev/null 2>&1 || true
  airflow connections add spark_default --conn-type spark --conn-host 'local[2]' >/dev/null
  airflow pools set medscreen_shared_tables 1 \
    "medscreen: one build of a shared lake table (EMR events, DICOM index, engine cache) at a time" >/dev/null
  touch "$STAMP"
fi

cat >&2 <<EOF
medscreen Airflow
  UI:            http://127.0.0.1:$PORT   (bound to 127.0.0.1 only)
  user:          admin
  password file: $PASSWORDS_FILE
  AIRFLOW_HOME:  $AIRFLOW_HOME
  DAGs:          $AIRFLOW__CORE__DAGS_FOLDER
  lake:          $MEDSCREEN_LAKE__ROOT
  EMR input:     ${MEDSCREEN_INPUTS__EMR_DIR:-<unset: set MEDSCREEN_INPUTS__EMR_DIR>}
  DICOM input:   ${MEDSCREEN_INPUTS__DICOM_DIR:-<unset: CT is skipped>}
EOF

if [[ "${MEDSCREEN_AIRFLOW_SETUP_ONLY:-0}" == "1" ]]; then
  exit 0
fi
if [[ $# -gt 0 ]]; then
  exec airflow "$@"
fi
exec airflow standalone
