#!/usr/bin/env bash
# The GPU check: one command that a one-GPU machine runs from a bare Python, in minutes.
#
#   bash scripts/gpu-check.sh [--dry-run]
#
# It installs the project with the train-gpu extra into a fresh venv, then trains on Ray
# with 1 GPU worker (fp32, then bf16), with 2 workers sharing the GPU (--gpus-per-worker
# 0.5, which must all-reduce with RING: NCCL refuses two ranks on one device), and exports
# the fp32 run's best checkpoint, verified on the CPU. Figures and verdicts go to
# $OUT/gpu-check.json (OUT defaults to ./gpu-check-out), the logs beside it.
#
# Settings (environment): PYTHON (python3), PIP_ARGS (extra pip arguments, e.g.
# "--no-index --find-links /wheels"), MNIST_DATA_DIR (the four MNIST .gz files; without it
# the runs use --synthetic data and no accuracy is asserted), EPOCHS (2).
# --dry-run prints the commands and runs none (tests/test_gpu_check.py runs it on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-check-out}"
WORK="${WORK:-/tmp/gpu-check.$$}"
VENV="$WORK/venv"
EPOCHS="${EPOCHS:-2}"
if [[ -n "${MNIST_DATA_DIR:-}" ]]; then DATA=(--data-dir "$MNIST_DATA_DIR"); else DATA=(--synthetic); fi
MNIST=("$VENV/bin/mnist-dist")
COMMON=(--epochs "$EPOCHS" --storage "$WORK/runs" "${DATA[@]}")

step() {  # step NAME COMMAND...: run it, its output in $OUT/NAME.log and its exit code in NAME.rc; or print it
    local name="$1"; shift
    if (( DRY_RUN )); then printf '%s:' "$name"; printf ' %q' "$@"; printf '\n'; return; fi
    echo "== $name: $*"
    set +e  # a failed step is recorded, and the summary still says what did run
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "${PIPESTATUS[0]}" > "$OUT/$name.rc"
    set -e
}

(( DRY_RUN )) || mkdir -p "$OUT" "$WORK"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words
step install bash -c "$PYTHON -m venv '$VENV' && '$VENV/bin/pip' install --quiet ${PIP_ARGS:-} '.[train-gpu]' && '$VENV/bin/pip' check"
step gpus nvidia-smi -L
step fp32 "${MNIST[@]}" train --workers 1 --gpus-per-worker 1 --name fp32 "${COMMON[@]}"
step bf16 "${MNIST[@]}" train --workers 1 --gpus-per-worker 1 --precision bf16 --name bf16 "${COMMON[@]}"
step shared "${MNIST[@]}" train --workers 2 --gpus-per-worker 0.5 --name shared "${COMMON[@]}"
step export "${MNIST[@]}" export --run "$WORK/runs/fp32"
# The verdicts: exit 1 unless every step ran and every check held.
if (( DRY_RUN )); then step summary "$PYTHON" scripts/gpu_check_summary.py "$WORK/runs" "$OUT"; exit 0; fi
REAL_DATA="${MNIST_DATA_DIR:+1}" "$PYTHON" scripts/gpu_check_summary.py "$WORK/runs" "$OUT"
