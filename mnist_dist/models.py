"""The model zoo: Keras 3 models by name. All output logits (N, 10) in float32.

The tutorial's weight decay is 5e-4 * tf.nn.l2_loss(w) summed over the dense weights
and biases. tf.nn.l2_loss(w) = sum(w**2) / 2, while keras.regularizers.L2(l) adds
l * sum(w**2), so the same penalty in Keras is L2(5e-4 / 2) = L2(2.5e-4) on the kernel
and bias of each dense layer: `keras_l2(tutorial_l2) = tutorial_l2 / 2`.
"""
from __future__ import annotations

import keras
from keras import layers

from mnist_dist.config import MODELS

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def keras_l2(tutorial_l2: float) -> float:
    """The keras.regularizers.L2 factor that equals `tutorial_l2 * tf.nn.l2_loss`."""
    return tutorial_l2 / 2.0


def _dense(units: int, l2: float, dtype: str, **kwargs) -> layers.Dense:
    """A linear Dense layer: its output is the pre-activation Z that the train step's gradient
    exchange reads (mnist_dist.gradients), so any activation is a layer of its own after it."""
    reg = keras.regularizers.L2(keras_l2(l2)) if l2 else None
    return layers.Dense(units, kernel_regularizer=reg, bias_regularizer=reg, dtype=dtype, **kwargs)


def _dense_relu(units: int, l2: float, dtype: str) -> list[layers.Layer]:
    return [_dense(units, l2, dtype), layers.ReLU(dtype=dtype)]


def tf_tutorial(l2: float, dtype: str) -> keras.Model:
    """The TensorFlow tutorial's LeNet-5-like CNN (convolutional.py): 1,663,370 parameters."""
    return keras.Sequential([
        keras.Input(INPUT_SHAPE, name="image"),
        layers.Conv2D(32, 5, padding="same", activation="relu", dtype=dtype),
        layers.MaxPooling2D(2, dtype=dtype),
        layers.Conv2D(64, 5, padding="same", activation="relu", dtype=dtype),
        layers.MaxPooling2D(2, dtype=dtype),
        layers.Flatten(dtype=dtype),
        *_dense_relu(512, l2, dtype),
        layers.Dropout(0.5, dtype=dtype),
        _dense(NUM_CLASSES, l2, "float32", name="logits"),
    ], name="tf-tutorial")


def lenet5(l2: float, dtype: str) -> keras.Model:
    """Classic LeNet-5 (6 / 16 / 120 / 84 / 10, ReLU, max-pool): 61,706 parameters."""
    return keras.Sequential([
        keras.Input(INPUT_SHAPE, name="image"),
        layers.Conv2D(6, 5, padding="same", activation="relu", dtype=dtype),
        layers.MaxPooling2D(2, dtype=dtype),
        layers.Conv2D(16, 5, padding="valid", activation="relu", dtype=dtype),
        layers.MaxPooling2D(2, dtype=dtype),
        layers.Flatten(dtype=dtype),
        *_dense_relu(120, l2, dtype),
        *_dense_relu(84, l2, dtype),
        _dense(NUM_CLASSES, l2, "float32", name="logits"),
    ], name="lenet5")


def cnn_bn(l2: float, dtype: str) -> keras.Model:
    """The tutorial CNN with batch norm after each conv and the hidden dense layer.

    Batch norm folds into the convolutions at export, so its ONNX model costs what the
    tutorial CNN's costs; its accuracy: docs/benchmarks.md#accuracy-and-wall-time-of-full-runs.
    """
    def conv_bn(filters: int) -> list[layers.Layer]:
        return [layers.Conv2D(filters, 5, padding="same", use_bias=False, dtype=dtype),
                layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype), layers.MaxPooling2D(2, dtype=dtype)]

    return keras.Sequential([
        keras.Input(INPUT_SHAPE, name="image"),
        *conv_bn(32),
        *conv_bn(64),
        layers.Flatten(dtype=dtype),
        _dense(512, l2, dtype, use_bias=False),
        layers.BatchNormalization(dtype=dtype),
        layers.ReLU(dtype=dtype),
        layers.Dropout(0.5, dtype=dtype),
        _dense(NUM_CLASSES, l2, "float32", name="logits"),
    ], name="cnn-bn")


def cnn_deep(l2: float, dtype: str) -> keras.Model:
    """Stacked 3x3 convolutions with batch norm, strided 5x5 convolutions instead of pooling,
    dropout 0.4, no hidden dense layer: 326,826 parameters.

    The design of Chris Deotte's Kaggle study of MNIST CNNs ("How to choose CNN
    architecture", 2018), the strongest single model there. The `best` preset trains it.
    """
    def conv(filters: int, size: int, **kwargs) -> list[layers.Layer]:
        return [layers.Conv2D(filters, size, use_bias=False, dtype=dtype, **kwargs),
                layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype)]

    return keras.Sequential([
        keras.Input(INPUT_SHAPE, name="image"),
        *conv(32, 3), *conv(32, 3), *conv(32, 5, strides=2, padding="same"),
        layers.Dropout(0.4, dtype=dtype),
        *conv(64, 3), *conv(64, 3), *conv(64, 5, strides=2, padding="same"),
        layers.Dropout(0.4, dtype=dtype),
        *conv(128, 4),
        layers.Flatten(dtype=dtype),
        layers.Dropout(0.4, dtype=dtype),
        _dense(NUM_CLASSES, l2, "float32", name="logits"),
    ], name="cnn-deep")


def edge(l2: float, dtype: str) -> keras.Model:
    """Made for a device's batch-1 latency and size: three strided convolutions with batch
    norm (folded into them at export) and a 384 x 10 dense layer, in place of tf-tutorial's
    pooling layers and 3136 x 512 one: 32,306 parameters, an int8 export under 40,000 bytes.

    Strides, not pooling layers: at batch 1 every ONNX node costs a dispatch. The head reads
    the 4 x 4 x 24 map whole rather than its global average, which kept where each stroke is
    (docs/benchmarks.md#the-edge-model has both). Its accuracy comes from distillation
    from a larger model (`--teacher`, export/README.md#which-model).
    """
    def conv(filters: int, size: int) -> list[layers.Layer]:
        return [layers.Conv2D(filters, size, strides=2, padding="same", use_bias=False, dtype=dtype),
                layers.BatchNormalization(dtype=dtype), layers.ReLU(dtype=dtype)]

    return keras.Sequential([
        keras.Input(INPUT_SHAPE, name="image"),
        *conv(32, 5), *conv(54, 3), *conv(24, 3),  # 14x14, 7x7, 4x4
        layers.Flatten(dtype=dtype),
        _dense(NUM_CLASSES, l2, "float32", name="logits"),
    ], name="edge")


# config.MODELS is the one list of names; each names its builder here ("cnn-bn": cnn_bn).
BUILDERS = {name: globals()[name.replace("-", "_")] for name in MODELS}


def build(name: str, l2: float = 5e-4, precision: str = "fp32") -> keras.Model:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    dtype = "mixed_bfloat16" if precision == "bf16" else "float32"
    return BUILDERS[name](l2, dtype)
