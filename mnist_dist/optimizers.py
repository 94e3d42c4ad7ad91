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
    """Mixin: each variable's update, with its L2 penalty's gradient, runs as one XLA program.

    Keras' Adam updates a variable in about ten full-size passes, which XLA fuses into one.
    The penalty's gradient (2 l w) joins the gradient there, after the exchange: every
    replica adds the same penalty gradient to the same sum, which is the gradient of the
    penalized loss. One program per variable, since each closes over its own variable and slots.
    """

    def add_l2_gradients(self, model, strategy) -> None:
        """Adds each L2-penalized variable's 2 l w in its update; call once, before the first step.

        The optimizer is handed each replica's own copy of a variable, so they are listed
        per replica (`strategy.experimental_local_results`).
        """
        scales = self.__dict__.setdefault("_l2_scales", {})
        for variable in model.trainable_variables:
            regularizer = getattr(variable, "regularizer", None)
            if regularizer is None:
                continue
            if not isinstance(regularizer, keras.regularizers.L2):
                raise NotImplementedError(f"{variable.path}: the step adds only L2 penalties, not {type(regularizer).__name__}")
            for copy in strategy.experimental_local_results(variable.value):
                scales[id(copy)] = 2.0 * regularizer.l2

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        programs: dict[int, Callable] = self.__dict__.setdefault("_xla_programs", {})
        if id(variable) not in programs:
            keras_update, scale = super().update_step, self.__dict__.get("_l2_scales", {}).get(id(variable))

            def update(gradient, learning_rate):
                if scale is not None:
                    gradient = gradient + tf.cast(scale * variable, gradient.dtype)
                keras_update(gradient, variable, learning_rate)

            programs[id(variable)] = tf.function(update, jit_compile=True)
            if scale is not None:
                self.__dict__.setdefault("_penalized", set()).add(id(variable))
        programs[id(variable)](gradient, learning_rate)

    def penalized_updates(self) -> int:
        """How many of the variable copies updated so far had their L2 gradient added: every
        penalized variable times the replicas, or Keras hands the update other objects."""
        return len(self.__dict__.get("_penalized", ()))


@keras.saving.register_keras_serializable("mnist_dist")
class StepSGD(compat.PresummedGradients, XlaUpdates, keras.optimizers.SGD):
    """SGD with momentum, for gradients the train step has summed."""


@keras.saving.register_keras_serializable("mnist_dist")
class StepAdam(compat.PresummedGradients, XlaUpdates, keras.optimizers.Adam):
    """Adam, for gradients the train step has summed."""


def make_optimizer(config: TrainConfig, learning_rate, for_step: bool = False):
    """The configured optimizer; `learning_rate` is a float or a schedule. `for_step`: the
    train step's variant (mnist_dist.step), else Keras' own, as `model.fit` wants it."""
    if config.optimizer == "adam":
        return (StepAdam if for_step else keras.optimizers.Adam)(learning_rate)
    return (StepSGD if for_step else keras.optimizers.SGD)(learning_rate, momentum=config.momentum)
