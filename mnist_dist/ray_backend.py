"""The Ray Train backend: gives each worker the TF_CONFIG that MultiWorkerMirroredStrategy reads.

It does what `ray.train.tensorflow.TensorflowConfig` does, minus two things. Importing
`ray.train.tensorflow` imports TensorFlow, and the Train controller unpickles the backend
config, so Ray's own class costs the driver and the controller a TensorFlow import each
(about 4 s apiece here) before any worker starts. And Ray's backend also sets
TF_USE_LEGACY_KERAS=1, which this Keras 3 project must not inherit.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})


def _free_address() -> str:
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


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

    @property
    def framework(self):
        return TrainingFramework.TENSORFLOW  # for Ray's run metadata; read on worker 0
