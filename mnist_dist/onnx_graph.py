"""Keras -> ONNX conversion and the edge clean-up of the graph.

tf2onnx converts NHWC convolutions to ONNX's NCHW ones. For a single-channel input it
already turns the input transpose into a Reshape, but before the first dense layer it
leaves a Transpose back to NHWC and a chain of Shape/Gather/Slice/Concat ops computing
the Flatten shape. `fold_flatten_transpose` removes both: it permutes the dense layer's
weight rows from NHWC to NCHW order once, offline, and flattens with one `Flatten`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 is tested up to 18


def convert(model, opset: int) -> onnx.ModelProto:
    """Keras 3 model -> ONNX with input `image` (N, 28, 28, 1) float32 and output `logits` (N, 10).

    `tf2onnx.convert.from_keras` fails on Keras 3 (onnx/tensorflow-onnx#2448); tracing a
    tf.function of the model in inference mode and converting that works.
    """
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, 28, 28, 1), tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=spec)
    def infer(image):
        return {OUTPUT_NAME: tf.cast(model(image, training=False), tf.float32)}

    proto, _ = tf2onnx.convert.from_function(infer, input_signature=spec, opset=opset)
    return proto


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers whose outputs nothing uses."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def fold_flatten_transpose(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Transpose(NCHW->NHWC) -> Reshape(computed shape) -> MatMul(W)  becomes  Flatten -> MatMul(W')."""
    proto = shape_inference.infer_shapes(proto)
    graph = proto.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    inits = {init.name: init for init in graph.initializer}
    for transpose in [n for n in graph.node if n.op_type == "Transpose"]:
        perm = list(helper.get_attribute_value(next(a for a in transpose.attribute if a.name == "perm")))
        users = _consumers(graph, transpose.output[0])
        reshapes = [u for u in users if u.op_type == "Reshape"]
        # Shape users only feed the Reshape's target shape; they die with it.
        if perm != [0, 2, 3, 1] or len(reshapes) != 1 or any(u.op_type not in ("Reshape", "Shape") for u in users):
            continue
        reshape = reshapes[0]
        matmuls = _consumers(graph, reshape.output[0])
        if len(matmuls) != 1 or matmuls[0].op_type != "MatMul" or matmuls[0].input[1] not in inits:
            continue
        nchw = shapes.get(transpose.input[0])
        if not nchw or len(nchw) != 4 or 0 in nchw[1:]:
            continue
        _, c, h, w = nchw
        weight_init = inits[matmuls[0].input[1]]
        weight = numpy_helper.to_array(weight_init)
        if weight.shape[0] != c * h * w:
            continue
        # Row (h, w, c) of the NHWC flatten is row (c, h, w) of the NCHW flatten.
        permuted = weight.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        weight_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), weight_init.name))
        flatten = helper.make_node("Flatten", [transpose.input[0]], [reshape.output[0]], axis=1,
                                   name=f"{reshape.name}_flatten_nchw")
        position = list(graph.node).index(reshape)
        graph.node.remove(reshape)
        graph.node.insert(position, flatten)
    prune(graph)
    del graph.value_info[:]
    return proto


def short_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every tensor and node renamed t0, t1, ... and n0, n1, ..., but the graph's input and output.

    Converters and quantizers name tensors by their Keras and TensorFlow paths
    ("edge_1/conv2d_1/convolution/merged_input:0_quantized"): in a model of a few dozen KB
    those names were a fifth of the file. Nothing reads them; a device stores and loads them.
    """
    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return proto  # a subgraph reads outer names: these models have none, so leave such a graph alone
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]
