"""Run the edge CLI with every heavy module made unimportable, then report what got imported."""
import importlib.abc
import json
import sys

BLOCKED = ("tensorflow", "keras", "ray", "tf2onnx", "onnx", "mnist_dist", "tf_keras", "jax", "torch")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the edge runtime must not import it")
        return None


sys.meta_path.insert(0, Block())
from mnist_edge.cli import main  # noqa: E402

code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(json.dumps({"exit": code, "heavy_modules": heavy}), file=sys.stderr)
sys.exit(code)
