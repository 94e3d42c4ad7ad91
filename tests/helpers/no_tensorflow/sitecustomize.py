"""On PYTHONPATH, makes TensorFlow (and any top-level package named in MNIST_DIST_TEST_BLOCK,
comma-separated) unimportable: a command that must finish without them fails loudly if not."""
import importlib.abc
import os
import sys

BLOCKED = {"tensorflow", "keras", "tf2onnx", *filter(None, os.environ.get("MNIST_DIST_TEST_BLOCK", "").split(","))}


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name}: imported before the command checked its input")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
