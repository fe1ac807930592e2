#!/usr/bin/env bash
# CUDA checks against the CPU and GPU throughput, recorded in BENCHMARKS.md (bench/gpu_check.py).
# Uses the current python ($PYTHON, else python3 on PATH) with torch installed; no virtual
# environment is built. Makes its own small demo data in a temporary folder. Exit code 1 on any
# mismatch; 0 with "no CUDA device: skipped" where there is no GPU. Bounded to 8 minutes.
#   bash bench/gpu_check.sh                 # on a CUDA machine
#   bash bench/gpu_check.sh --cpu-dry-run   # the same comparisons with the CPU as the device
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1 && [[ " $* " != *" --cpu-dry-run "* ]]; then
    echo "no CUDA device: skipped (and $PY has no torch)"
    exit 0
  fi
  echo "gpu_check: $PY cannot import torch; set PYTHON to an interpreter that has it" >&2
  exit 2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rc=0
timeout 470 "$PY" -u bench/gpu_check.py --tmp "$TMP" "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "gpu_check: did not finish within 470 s" >&2
fi
exit "$rc"
