import numpy as np
import pytest
import tensorflow as tf

from mnist_dist import models


@pytest.mark.parametrize("name, params", [("tf-tutorial", 1_663_370), ("lenet5", 61_706), ("cnn-bn", 1_665_194), ("cnn-deep", 326_826), ("edge", 32_306)])
def test_exact_parameter_counts(name, params):
    # tf-tutorial: 832 + 51,264 + (3136*512 + 512) + (512*10 + 10), as in convolutional.py.
    model = models.build(name)
    assert model.count_params() == params
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


def test_l2_means_the_tutorials_penalty():
    """5e-4 * sum(tf.nn.l2_loss) over dense weights and biases == the Keras regularizer losses."""
    model = models.build("tf-tutorial", l2=5e-4)
    model(np.zeros((1, 28, 28, 1), np.float32))
    dense = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)] or \
            [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert len(dense) == 2
    for layer in dense:  # make the biases non-zero so they count too
        layer.bias.assign(np.full(layer.bias.shape, 0.3, np.float32))
    tutorial = 5e-4 * sum(float(tf.nn.l2_loss(v)) for layer in dense for v in (layer.kernel, layer.bias))
    keras_penalty = float(tf.add_n(model.losses))
    assert keras_penalty == pytest.approx(tutorial, rel=1e-5)
    assert models.keras_l2(5e-4) == 2.5e-4


def test_bf16_policy_keeps_float32_logits():
    model = models.build("lenet5", precision="bf16")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model(np.zeros((1, 28, 28, 1), np.float32)).dtype == "float32"


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tf-tutorial, lenet5, cnn-bn, cnn-deep"):
        models.build("resnet")


def test_the_edge_preset_trains_the_edge_model_on_mildly_augmented_images():
    from mnist_dist.config import preset

    edge = preset("edge")
    assert (edge.model, edge.epochs, edge.global_batch_size, edge.optimizer) == ("edge", 40, 128, "adam")
    assert edge.augment and (edge.rotate, edge.zoom) == (8.0, 0.05) and edge.l2 == 0.0
