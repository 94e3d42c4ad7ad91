"""On PYTHONPATH, makes TensorFlow unimportable: a command that must finish before it loads
TensorFlow fails loudly if it does not."""
import importlib.abc
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx"):
            raise ImportError(f"{name}: imported before the command checked its input")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
