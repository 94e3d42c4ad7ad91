"""The Keras optimizers of a run: Keras' own (for `fit` baselines), and the train step's.

The step's optimizer is Keras' SGD or Adam with two changes: it takes gradients already
summed over the replicas (compat.PresummedGradients), and it runs each variable's update
as one XLA program (`update_step`, Keras' documented override point for optimizers).
"""
from __future__ import annotations

from collections.abc import Callable

from mnist_dist import compat
from mnist_dist.config import TrainConfig

keras = compat.keras_checked()


class XlaUpdates:
    """Mixin: each variable's update runs as one XLA program. Keras' Adam updates a variable
    in about ten full-size passes, which XLA fuses into one; one program per variable,
    since each closes over its own variable and slots."""

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        programs: dict[int, Callable] = self.__dict__.setdefault("_xla_programs", {})
        if id(variable) not in programs:
            keras_update = super().update_step
            programs[id(variable)] = tf.function(lambda g, lr: keras_update(g, variable, lr), jit_compile=True)
        programs[id(variable)](gradient, learning_rate)


@keras.saving.register_keras_serializable("mnist_dist")
class StepSGD(compat.PresummedGradients, XlaUpdates, keras.optimizers.SGD):
    """SGD with momentum, for gradients the train step has summed."""


@keras.saving.register_keras_serializable("mnist_dist")
class StepAdam(compat.PresummedGradients, XlaUpdates, keras.optimizers.Adam):
    """Adam, for gradients the train step has summed."""


def make_optimizer(config: TrainConfig, learning_rate, for_step: bool = False):
    """The configured optimizer; `learning_rate` is a float or a schedule. `for_step`: the
    train step's variant (mnist_dist.loop), else Keras' own, as `model.fit` wants it."""
    if config.optimizer == "adam":
        return (StepAdam if for_step else keras.optimizers.Adam)(learning_rate)
    return (StepSGD if for_step else keras.optimizers.SGD)(learning_rate, momentum=config.momentum)


def penalty_gradients(model) -> Callable[[list], list]:
    """Adds each weight penalty's gradient to the summed gradients, in variable order.

    Added after the exchange: every replica adds the same penalty gradient to the same sum,
    which is the gradient of the penalized loss. An L2 penalty's gradient is written out
    (2 l w, one pass) rather than taken by autodiff, which builds several passes per kernel.
    """
    import tensorflow as tf

    variables = model.trainable_variables
    regularizers = [getattr(v, "regularizer", None) for v in variables]

    def gradient_of(regularizer, variable, gradient):
        if regularizer is None:
            return gradient
        if isinstance(regularizer, keras.regularizers.L2):
            return gradient + tf.cast(2.0 * regularizer.l2 * variable, gradient.dtype)
        with tf.GradientTape() as tape:
            penalty = regularizer(variable)
        return gradient + tf.cast(tape.gradient(penalty, variable), gradient.dtype)

    return lambda grads: [gradient_of(r, v, g) for r, v, g in zip(regularizers, variables, grads)]
