#!/usr/bin/env bash
# Train on the Ray cluster this runs in, then export and verify the best checkpoint.
# The one entrypoint for `ray job submit` (README.md, "On a Ray cluster") and for the KubeRay RayJob (k8s/).
# Settings come from the environment (a ConfigMap on Kubernetes); extra arguments are
# passed on to `mnist-dist pipeline` and win over them. Safe to re-run with the same name:
# an interrupted run resumes, a finished one with a verified export exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
# MNIST_EXTRA_ARGS: more flags in one variable (a ConfigMap value), split on whitespace, no globbing.
read -r -a extra <<< "${MNIST_EXTRA_ARGS:-}"
exec python -m mnist_dist.cli pipeline \
    --preset "${MNIST_PRESET:-default}" \
    --workers "${MNIST_WORKERS:-2}" \
    --epochs "${MNIST_EPOCHS:-10}" \
    --cpus-per-worker "${MNIST_CPUS_PER_WORKER:-1}" \
    --gpus-per-worker "${MNIST_GPUS_PER_WORKER:-0}" \
    --storage "${MNIST_STORAGE:-runs}" \
    --name "${MNIST_RUN_NAME:-mnist}" \
    --max-failures "${MNIST_MAX_FAILURES:-2}" \
    "${extra[@]}" "$@"
