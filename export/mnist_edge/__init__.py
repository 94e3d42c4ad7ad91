"""mnist-edge: run an exported mnist-dist model with numpy and onnxruntime only.

Nothing in this package may import TensorFlow, Keras or Ray: it is what a small
device installs. `tests/test_edge.py` enforces that, in a venv without them.
"""
__all__ = ["EdgeError", "Classifier"]

from mnist_edge.errors import EdgeError
from mnist_edge.runtime import Classifier
