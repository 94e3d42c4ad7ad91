"""The Ray Train backend: gives each worker the TF_CONFIG that MultiWorkerMirroredStrategy reads.

`Backend`, `BackendConfig` and the worker group's `execute` and `execute_single_async` are
Ray Train's developer API for backends (ray.train.backend, BaseWorkerGroup), with no public
equivalent; tests/test_compat.py checks each of them by name.

It does what `ray.train.tensorflow.TensorflowConfig` does, minus two things. Importing
`ray.train.tensorflow` imports TensorFlow, and the Train controller unpickles the backend
config, so Ray's own class costs the driver and the controller a TensorFlow import each
before any worker starts (docs/benchmarks.md). And Ray's backend also sets
TF_USE_LEGACY_KERAS=1, which this Keras 3 project must not inherit.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
import ray.util
from ray.train.backend import Backend, BackendConfig


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})


# This worker's port, held until its TensorFlow server is about to take it (release_port):
# a port closed at once could be handed to the next worker on the node as well.
_RESERVED: list = []


def _free_address() -> str:
    """host:port of a free port on this worker's node, for its TensorFlow gRPC server."""
    import socket

    host = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind(("", 0))
    _RESERVED.append(sock)
    port = sock.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def release_port() -> None:
    """Frees the port TF_CONFIG names for this worker; call just before TensorFlow starts its server."""
    while _RESERVED:
        _RESERVED.pop().close()


class _TfConfigBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        addresses = worker_group.execute(_free_address)
        ray.get([worker_group.execute_single_async(rank, _set_tf_config, worker_addresses=addresses, index=rank)
                 for rank in range(len(worker_group))])


@dataclass
class TfConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _TfConfigBackend
