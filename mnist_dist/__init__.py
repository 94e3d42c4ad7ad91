"""mnist-dist: distributed MNIST training on Ray Train, verified ONNX export (see README.md).

Light on purpose: `import mnist_dist` loads nothing heavy; TensorFlow and Ray are imported
by the modules that need them, when they need them.
"""
