"""How the replicas exchange their gradients: the heart of the synchronous step.

Every replica computes gradients on its slice of the global batch, the replicas exchange
them, and every replica applies the same sum, so the weights stay identical.

Two ways to exchange, chosen per layer by the bytes each sends (`gathers_inputs`):
- a ring all-reduce of the gradient itself (`gradient_sum`);
- for a dense layer whose kernel is larger than its inputs and output gradients over the
  local batch, an all-gather of those instead, from which every replica rebuilds the
  exact summed kernel gradient, X_all^T G_all (`GradientExchange`). tf-tutorial's
  3136 x 512 kernel is 1.6M numbers; its inputs and output gradients over 128 images
  are 0.47M.
"""
from __future__ import annotations

from collections.abc import Callable


def exchange_dtype(allreduce: str):
    import tensorflow as tf

    return {"fp32": tf.float32, "bf16": tf.bfloat16}[allreduce]


def gradient_sum(allreduce: str) -> Callable:
    """Sums the replicas' gradients in `allreduce` ("fp32", "bf16", or "none" for one replica).

    On CPU workers the ring all-reduce runs over gRPC and the step waits for it; in bf16 it
    sends half the bytes (docs/benchmarks.md#where-a-2-worker-step-goes). Every replica still
    receives the same sum, so the weights stay identical and every step stays synchronous;
    the cost is bf16's 8-bit mantissa on the gradients, which mixed-bf16 training already pays.
    """
    import tensorflow as tf

    def sum_over_replicas(grads):
        if allreduce == "none":
            return grads
        context = tf.distribute.get_replica_context()
        if allreduce == "fp32":
            return context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.cast(g, tf.bfloat16) for g in grads])
        return [tf.cast(s, g.dtype) for s, g in zip(summed, grads)]

    return sum_over_replicas


def gather_rows(flat):
    """Every replica's copy of the 1-D `flat`, stacked in replica order: (replicas, n).

    TensorFlow's all-gather takes no bfloat16, so bf16 travels as int32 pairs: the bits
    are copied, never added, and come back exactly.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if flat.dtype != tf.bfloat16:
        return context.all_gather(flat[None], axis=0)
    n = tf.size(flat)
    padded = tf.concat([flat, tf.zeros([n % 2], tf.bfloat16)], 0)
    words = tf.bitcast(tf.reshape(padded, [-1, 2]), tf.int32)
    rows = context.all_gather(words[None], axis=0)
    replicas = tf.shape(rows)[0]
    return tf.reshape(tf.bitcast(rows, tf.bfloat16), [replicas, -1])[:, :n]


def gathers_inputs(kernel_shape: tuple[int, int], local_batch: int, replicas: int) -> bool:
    """Whether a dense layer's summed kernel gradient is cheaper to rebuild from gathered
    inputs and output gradients than to all-reduce.

    Per replica, a ring all-reduce sends 2 (R - 1) / R * in * out numbers, and a ring
    all-gather of the inputs and output gradients sends (R - 1) * b * (in + out). Gathering
    also makes every replica multiply R times the rows it would alone, so it is used only
    where it sends at most half the numbers.
    """
    fan_in, fan_out = kernel_shape
    return replicas > 1 and local_batch * (fan_in + fan_out) * replicas <= fan_in * fan_out


def gathered_dense_layers(model, local_batch: int, replicas: int) -> list:
    """The model's dense layers whose gradients travel as gathered inputs and output gradients."""
    import keras

    # Only a linear Dense layer's output is the pre-activation Z whose gradient the rebuild
    # needs; mnist_dist.models puts activations in layers of their own for that.
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.Dense) and layer.bias is not None
            and layer.activation is keras.activations.linear
            and gathers_inputs(tuple(layer.kernel.shape), local_batch, replicas)]


def describe(model, local_batch: int, replicas: int, allreduce: str) -> str:
    """How the step exchanges gradients, for the run's first lines."""
    if replicas == 1:
        return ""
    gathered = [f"{layer.name} {'x'.join(map(str, layer.kernel.shape))}" for layer in gathered_dense_layers(model, local_batch, replicas)]
    if not gathered:
        return f"; gradients all-reduced in {allreduce}"
    return f"; gradients summed in {allreduce}, in one all-gather ({', '.join(gathered)}: as inputs and output gradients)"


class GradientExchange:
    """Turns each replica's loss into the gradients summed over all replicas, in the order
    of `model.trainable_variables`, with one collective per step.

    Dense layers that `gathers_inputs` picks are exchanged as their inputs and output
    gradients, and every replica rebuilds the summed kernel gradient X_all^T G_all and bias
    gradient sum(G_all) from the same gathered rows, so every replica computes the same
    numbers. Everything else travels in the same all-gather and is summed over replicas
    there. With no such layer, one all-reduce sums every gradient (`gradient_sum`).
    """

    def __init__(self, model, local_batch: int, replicas: int, allreduce: str):
        self.model = model
        self.variables = model.trainable_variables
        self.allreduce = allreduce if replicas > 1 else "none"
        self.sum_all = gradient_sum(self.allreduce)
        self.gathered = gathered_dense_layers(model, local_batch, replicas)
        skip = {id(v) for layer in self.gathered for v in (layer.kernel, layer.bias)}
        self.others = [v for v in self.variables if id(v) not in skip]
        self.tapped = None
        if self.gathered:
            import keras

            # The same layers and weights, also returning each gathered layer's input X and
            # output Z, so that the tape can give dL/dZ.
            taps = [t for layer in self.gathered for t in (layer.input, layer.output)]
            self.tapped = keras.Model(model.inputs[0], [model.outputs[0], *taps])

    def forward(self, images, training: bool = True):
        """The logits, and the [X, Z] of each gathered layer; call inside the tape."""
        if self.tapped is None:
            return self.model(images, training=training), []
        logits, *flat = self.tapped(images, training=training)
        return logits, list(zip(flat[0::2], flat[1::2]))

    def __call__(self, tape, loss, taps: list) -> list:
        if not self.gathered:
            return self.sum_all(tape.gradient(loss, self.variables))
        import tensorflow as tf
        grads = tape.gradient(loss, self.others + [z for _, z in taps])
        other_grads, output_grads = grads[:len(self.others)], grads[len(self.others):]
        wire = exchange_dtype(self.allreduce)
        parts = [x for x, _ in taps] + output_grads + other_grads
        flat = tf.concat([tf.reshape(tf.cast(p, wire), [-1]) for p in parts], 0)
        rows = gather_rows(flat)  # (replicas, n)
        pieces = tf.split(rows, tf.stack([tf.size(p) for p in parts]), axis=1, num=len(parts))
        n = len(taps)
        summed = {}
        for layer, (x, z), xs, gs in zip(self.gathered, taps, pieces[:n], pieces[n:2 * n]):
            every_x = tf.cast(tf.reshape(xs, [-1, x.shape[-1]]), x.dtype)  # all replicas' rows, in replica order
            every_g = tf.cast(tf.reshape(gs, [-1, z.shape[-1]]), z.dtype)
            summed[id(layer.kernel)] = tf.matmul(every_x, every_g, transpose_a=True)
            summed[id(layer.bias)] = tf.reduce_sum(every_g, axis=0)
        for variable, grad, piece in zip(self.others, other_grads, pieces[2 * n:]):
            summed[id(variable)] = tf.reshape(tf.cast(tf.reduce_sum(piece, axis=0), grad.dtype), grad.shape)
        return [tf.cast(summed[id(v)], v.dtype) for v in self.variables]
