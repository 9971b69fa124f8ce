#!/usr/bin/env bash
# Run the benchmarks on a GPU machine, one JSON per benchmark under $OUT.
#
#   OUT=work/bench-gpu bash bench/gpu.sh engines ct emr_scoring
#
# The GPU machine is lent by the minute, so every measurement of a session goes
# through this one script; each benchmark is bounded by `timeout` (T seconds,
# default 280) so a hung Ray job cannot eat the whole call. Every benchmark
# names the engine behind each number in its JSON (ONNX Runtime CUDA EP where
# onnxruntime-gpu is installed).
set -uo pipefail
OUT=${OUT:-work/bench-gpu}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Benchmarks hash synthetic ids only; a throwaway key keeps them off any real key.
export MEDSCREEN_PSEUDONYM_KEY="${MEDSCREEN_PSEUDONYM_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1 || true

run() {
  local name=$1; shift
  local t0=$SECONDS
  timeout "${T:-280}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  echo "$name: rc=$rc in $((SECONDS - t0)) s"
}

[ $# -eq 0 ] && set -- engines emr_scoring ct
for bench in "$@"; do
  case $bench in
    engines)      run engines $PY bench/engines.py --budget-s 1 --max-seconds "${ENGINES_MAX_S:-200}" ;;
    emr_scoring)  run emr_scoring $PY bench/emr_scoring.py --rows "${ROWS:-1000000}" --precision fp32 ;;
    emr_fp16)     run emr_scoring_fp16 $PY bench/emr_scoring.py --rows "${ROWS:-1000000}" --precision fp16 --skip-baseline ;;
    # The inductor plan (torch.export + Inductor, CUDA graphs per scoring shape): built and gated on
    # the bench's synthetic labelled lake, then ROWS rows scored; PRECISION fp16 (default) or fp32.
    emr_inductor) run "emr_scoring_inductor_${PRECISION:-fp16}" $PY bench/emr_scoring.py --rows "${ROWS:-1000000}" \
                    --precision "${PRECISION:-fp16}" --backend inductor --skip-baseline ;;
    # Does the plan's compile artefact make the compile warm in a fresh process, a Ray task and a Ray actor
    # (the EMR scoring actors' kind)? Hits, misses and how each process pickles a cache-key input.
    inductor_warm) run inductor_warm_start $PY bench/inductor_warm_start.py --precision "${PRECISION:-fp16}" ;;
    ct)           # VARIANTS: a JSON list of imaging settings scored beside the configured ones (bench/ct.py --variants)
      run ct $PY bench/ct.py --series "${SERIES:-3}" --precisions "${PRECISIONS:-fp32,fp16}" \
        ${VARIANTS:+--variants "$VARIANTS"} ;;
    scaling)      # EMR scoring on one GPU, then on all of them, per token budget (no naive baseline)
      for gpus in ${GPU_SETS:-0 0,1}; do
        for tb in ${TOKEN_BUDGETS:-65536 262144}; do
          CUDA_VISIBLE_DEVICES=$gpus run "emr_gpus${gpus//,/_}_tb$tb" $PY bench/emr_scoring.py \
            --rows "${ROWS:-2000000}" --token-budget "$tb" --skip-baseline
        done
      done ;;
    *) echo "unknown benchmark $bench (engines, emr_scoring, emr_fp16, emr_inductor, inductor_warm, ct, scaling)" >&2; exit 2 ;;
  esac
done
