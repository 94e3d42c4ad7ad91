"""What 4-bit weights give with ONNX Runtime, on a verified export (issue 32).

`python tests/helpers/int4_weights.py RUN/export OUT`: the export's fp32 model quantized as
its int8 twin is (static QDQ, per-channel, activations uint8, the first convolution in
fp32), but with int4 weights (`QuantType.QInt4`); then each model's ONNX Runtime accuracy on
the 10,000 test images, its argmax disagreements with fp32, its size, and batch-1 p50 in
interleaved rounds (1 thread), the int4 model also with `session.disable_quant_qdq` (weights
dequantized once, at load). docs/benchmarks.md quotes the output.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from mnist_dist import onnx_graph
from mnist_dist.data import PIXEL_OFFSET, PIXEL_SCALE, load


def session(path: Path, fold_weights: bool = False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["QDQPropagationTransformer"])  # as the int8 model records


def main(export: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = load(os.environ["MNIST_DATA_DIR"], val_size=5000)

    def normalize(x):
        return ((x.astype(np.float32) - PIXEL_OFFSET) / PIXEL_SCALE)[..., None]
    calibration, test_x, test_y = normalize(data.train_x[:1000]), normalize(data.test_x), data.test_y

    prepared = out / "model.prep.onnx"
    quant_pre_process(str(export / "model.onnx"), str(prepared), skip_symbolic_shape=True)
    first_conv = next(n.name for n in onnx.load(prepared).graph.node if n.op_type == "Conv")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, 10))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {onnx_graph.INPUT_NAME: batch}
    int4 = out / "model.int4.onnx"
    quantize_static(str(prepared), str(int4), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4, nodes_to_exclude=[first_conv])

    models = {"fp32": (export / "model.onnx", False), "int8": (export / "model.int8.onnx", False),
              "int4": (int4, False), "int4, session.disable_quant_qdq": (int4, True)}
    sessions, reference = {}, None
    for name, (path, fold) in models.items():
        s = session(path, fold)
        feed = s.get_inputs()[0].name
        logits = np.concatenate([s.run(None, {feed: test_x[i:i + 500]})[0] for i in range(0, len(test_x), 500)])
        reference = logits if reference is None else reference
        print(f"{name}: {path.stat().st_size:,} B, test accuracy {100 * (logits.argmax(1) == test_y).mean():.2f}%, "
              f"argmax disagreements with fp32 {int((logits.argmax(1) != reference.argmax(1)).sum())}")
        sessions[name] = (s, feed)
    p50 = {name: [] for name in sessions}
    for _round in range(4):
        for name, (s, feed) in sessions.items():
            for _ in range(200):
                s.run(None, {feed: test_x[:1]})
            times = []
            for i in range(2000):
                start = time.perf_counter()
                s.run(None, {feed: test_x[i:i + 1]})
                times.append(time.perf_counter() - start)
            p50[name].append(np.percentile(times, 50) * 1e6)
    for name, values in p50.items():
        print(f"{name}: batch-1 p50 per round {' / '.join(f'{v:.1f}' for v in values)} us")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
