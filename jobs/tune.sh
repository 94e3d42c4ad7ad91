#!/usr/bin/env bash
# A Ray Tune sweep on the Ray cluster this runs in (mnist-dist tune), then the verified export
# of its best trial (mnist-dist pipeline --from-tune): the entrypoint of k8s/overlays/tune.
# Settings come from the environment only (a ConfigMap), as for jobs/pipeline.sh, so that both
# commands name the same sweep; with the sweep's own:
#   MNIST_TUNE_SPACE     the space, one KEY=VALUES per word: "lr=0.004,0.002 batch-size=64,128"
#   MNIST_TRIAL_WORKERS  each trial's workers (default 1); on Kubernetes MNIST_WORKERS sizes the cluster
#   MNIST_EXTRA_ARGS     more `mnist-dist tune` flags ("--samples 2 --grace-epochs 2 --augment")
#   MNIST_EXPORT_ARGS    the export's flags ("--max-int8-drop 0.2")
# Run again with the same name, an interrupted sweep resumes, and a finished one with a
# verified export exits 0.
set -euo pipefail
if [ $# -gt 0 ]; then
    echo "error: jobs/tune.sh takes no arguments (got $*): its settings come from the environment, so that the sweep and its export name the same folder. Fix: MNIST_EXTRA_ARGS for more tune flags, or run mnist-dist tune yourself" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
read -r -a space <<< "${MNIST_TUNE_SPACE:-}"
read -r -a extra <<< "${MNIST_EXTRA_ARGS:-}"
read -r -a export_args <<< "${MNIST_EXPORT_ARGS:-}"
storage="${MNIST_STORAGE:-runs}"
name="${MNIST_RUN_NAME:-sweep}"
python -m mnist_dist.cli tune \
    --preset "${MNIST_PRESET:-default}" \
    --workers "${MNIST_TRIAL_WORKERS:-1}" \
    --epochs "${MNIST_EPOCHS:-10}" \
    --cpus-per-worker "${MNIST_CPUS_PER_WORKER:-1}" \
    --gpus-per-worker "${MNIST_GPUS_PER_WORKER:-0}" \
    --storage "$storage" \
    --name "$name" \
    --max-failures "${MNIST_MAX_FAILURES:-2}" \
    "${space[@]/#/--space=}" "${extra[@]}"
exec python -m mnist_dist.cli pipeline --from-tune "$name" --storage "$storage" "${export_args[@]}"
