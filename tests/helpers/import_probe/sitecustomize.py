"""On PYTHONPATH, records every process that imports TensorFlow (see tests/test_ray.py).

Each record is the process's command line and, inside Ray, the actor it hosts.
"""
import os
import sys

LOG_DIR = os.environ.get("MNIST_DIST_IMPORT_LOG")


class _TensorFlowImportProbe:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            sys.meta_path.remove(self)
            with open("/proc/self/cmdline", "rb") as f:
                record = f.read().replace(b"\0", b" ").decode(errors="replace")
            try:
                import ray

                record += f" | actor: {ray.get_runtime_context().get_actor_name() or ''}"
                record += f" {ray.get_runtime_context().get_task_name() or ''}"
            except Exception as exc:  # noqa: BLE001 - outside Ray, or Ray not up yet
                record += f" | actor: ? ({type(exc).__name__})"
            with open(os.path.join(LOG_DIR, f"{os.getpid()}.txt"), "w") as f:
                f.write(record)
        return None


if LOG_DIR:
    sys.meta_path.insert(0, _TensorFlowImportProbe())
