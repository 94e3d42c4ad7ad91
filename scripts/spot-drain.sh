#!/usr/bin/env bash
# A spot worker's preStop hook (k8s/overlays/gpu-spot): tells Ray that this node is being
# reclaimed, as a cloud's autoscaler would, so that Ray Train counts a preemption rather than
# a failure, and the workers commit a just-in-time checkpoint; then keeps the pod up until
# Ray Train has stopped the group at the deadline (docs/spot.md).
# Usage: spot-drain.sh [SECONDS]   default: $MNIST_SPOT_NOTICE_SECONDS, else 20.
# Needs RAY_ADDRESS (KubeRay sets it in every worker pod) and, with token auth, RAY_AUTH_TOKEN.
set -euo pipefail
seconds="${1:-${MNIST_SPOT_NOTICE_SECONDS:-20}}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "spot-drain.sh: SECONDS must be a whole number, got '$seconds'" >&2
    exit 2
fi
started=$SECONDS
# This pod's Ray node: a driver attached here is given the node of its own IP address.
node_id="${RAY_NODE_ID:-$(python -c 'import ray; ray.init(logging_level="ERROR", log_to_driver=False); print(ray.get_runtime_context().get_node_id())')}"
# The notice counts from when the hook started; finding the node took part of it.
left=$((seconds - (SECONDS - started)))
(( left > 0 )) || left=1
ray drain-node --address "${RAY_ADDRESS:?RAY_ADDRESS is not set}" --node-id "$node_id" \
    --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "spot reclaim of ${HOSTNAME:-this node}" \
    --deadline-remaining-seconds "$left"
echo "spot-drain.sh: node $node_id drains; Ray Train stops its workers within ${left} s"
# Up past the deadline, so that Ray Train, not the pod's end, stops the workers: that is what
# it counts as a preemption. The pod's terminationGracePeriodSeconds must cover SECONDS + 5.
sleep "$((left + 5))"
