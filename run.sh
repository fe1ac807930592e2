#!/usr/bin/env bash
# The pipeline: (demo data) -> CTR priors, semantic ids -> train -> infer with the best checkpoint -> evaluate.
#
# With TRAIN_DATA_PATH unset it builds (or reuses) demo data under data/demo and runs everything
# there. With it set, it runs on your data; inference and evaluation run only where
# EVAL_DATA_PATH has predict_seq.jsonl (and ground_truth.jsonl for the score).
# Training length follows the data: main.py holds out a validation slice of the training users
# (or uses ../valid beside the training folder), keeps the best checkpoint and stops when
# validation stops improving. Extra arguments go to main.py, e.g. the seed solution's full-size
# model for TencentGR-1M-sized data: bash run.sh --config taac1m
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
# seconds per stage, printed at the end (where the time of a run goes)
LAST=$SECONDS; TIMES=()
lap() { TIMES+=("$1 $((SECONDS - LAST)) s"); LAST=$SECONDS; }

if [ -z "${TRAIN_DATA_PATH:-}" ]; then
  DEMO=${DEMO_DIR:-data/demo}
  $PY make_demo_data.py --out "$DEMO"
  export TRAIN_DATA_PATH=$DEMO/train
  export EVAL_DATA_PATH=${EVAL_DATA_PATH:-$DEMO/eval}
  lap "demo data"
fi
RUN=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
export TRAIN_LOG_PATH=${TRAIN_LOG_PATH:-$RUN/logs}
export TRAIN_TF_EVENTS_PATH=${TRAIN_TF_EVENTS_PATH:-$RUN/tb}
export TRAIN_CKPT_PATH=${TRAIN_CKPT_PATH:-$RUN/ckpt}
export USER_CACHE_PATH=${USER_CACHE_PATH:-runs/cache/$(basename "$(dirname "$(realpath "$TRAIN_DATA_PATH")")")}
export MODEL_OUTPUT_PATH=${MODEL_OUTPUT_PATH:-$TRAIN_CKPT_PATH}
export EVAL_RESULT_PATH=${EVAL_RESULT_PATH:-$RUN/result}

# recomputed only when seq.jsonl changed since the priors were written
$PY -u precompute_ctr.py --seq_path "${TRAIN_DATA_PATH}/seq.jsonl" --output_dir "${USER_CACHE_PATH}/ctr" \
    --prior auto --k_clip 10,10000 --reuse
lap "CTR priors"

# semantic ids of the items' multimodal vectors (feature 81), refitted only when indexer.pkl or
# the vectors changed, so that `bash run.sh --use_sid 1` finds them (the demo's validation did not
# pick them: BENCHMARKS.md, "Cold items"); without vectors main.py is given --use_sid 0
SID=()
if ls "${TRAIN_DATA_PATH}"/creative_emb/emb_81_* >/dev/null 2>&1; then
  $PY -u precompute_sid.py --data_dir "${TRAIN_DATA_PATH}" --output_dir "${USER_CACHE_PATH}/sid" --reuse
else
  echo "notice: no multimodal vectors of feature 81 in ${TRAIN_DATA_PATH}/creative_emb: training without semantic ids"
  SID=(--use_sid 0)
fi
lap "semantic ids"

# configs/demo.toml: the recommended TencentGR-layout configuration (HSTU, time, CTR channels)
$PY -u main.py --config configs/demo.toml --ctr_dir "${USER_CACHE_PATH}/ctr" ${SID[@]+"${SID[@]}"} "$@"
lap "training (validation included)"

if [ -n "${EVAL_DATA_PATH:-}" ] && [ -f "$EVAL_DATA_PATH/predict_seq.jsonl" ]; then
  $PY -u infer.py
  lap "inference"
  if [ -f "$EVAL_DATA_PATH/ground_truth.jsonl" ]; then
    $PY evaluate.py --result "$EVAL_RESULT_PATH/result.json" --ground_truth "$EVAL_DATA_PATH/ground_truth.jsonl" \
        --train_dir "$TRAIN_DATA_PATH" --eval_dir "$EVAL_DATA_PATH"
    lap "scoring"
  fi
fi
printf -v LAPS "%s, " ${TIMES[@]+"${TIMES[@]}"}
echo "run.sh stages: ${LAPS%, } (total $SECONDS s)"
