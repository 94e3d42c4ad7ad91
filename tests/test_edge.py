"""The edge runtime: numpy + onnxruntime (+ Pillow for images), nothing heavier."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from mnist_edge import idx

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "helpers" / "edge_isolated.py"


def edge(*args):
    """The edge CLI in a fresh interpreter that sees only export/ (not the mnist_dist package)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "export")}
    return subprocess.run([sys.executable, "-s", str(HELPER), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT / "export")


@pytest.fixture(scope="module")
def test_images(mnist_dir):
    return idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz"), idx.read(mnist_dir / "t10k-labels-idx1-ubyte.gz")


def test_runs_without_tensorflow_keras_ray_or_onnx(exported, tmp_path, test_images):
    images, _ = test_images
    np.save(tmp_path / "x.npy", images[:2])
    proc = edge("--model", exported["dir"], tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status == {"exit": 0, "heavy_modules": []}


def test_npy_idx_and_png_inputs(exported, tmp_path, test_images, mnist_dir):
    images, labels = test_images
    np.save(tmp_path / "batch.npy", images[:20])
    np.save(tmp_path / "float.npy", images[0].astype(np.float32) / 255)
    # Black-on-white at another size, as a phone photo of a digit would be.
    Image.fromarray(255 - images[0]).resize((140, 140)).save(tmp_path / "seven.png")
    Image.fromarray(images[1]).convert("RGB").save(tmp_path / "two.jpg", quality=95)
    proc = edge("--model", exported["dir"], "--json", tmp_path / "batch.npy", tmp_path / "float.npy",
                tmp_path / "seven.png", tmp_path / "two.jpg")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)["predictions"]
    assert len(predictions) == 23
    got = [p["label"] for p in predictions[:20]]
    assert np.mean(np.array(got) == labels[:20]) >= 0.9
    assert [p["label"] for p in predictions[20:]] == [labels[0], labels[0], labels[1]]
    assert all(0 <= p["probability"] <= 1 and len(p["probabilities"]) == 10 for p in predictions)
    # An IDX file straight from the MNIST distribution, through the full package CLI too, as on
    # an edge install (`mnist-dist[edge]`): no TensorFlow, Ray or pyarrow.
    from conftest import run_cli
    proc = run_cli("predict", "--model", exported["dir"] / "model.int8.onnx", mnist_dir / "t10k-images-idx3-ubyte.gz",
                   env={"PYTHONPATH": str(Path(__file__).parent / "helpers" / "no_tensorflow"),
                        "MNIST_DIST_TEST_BLOCK": "pyarrow,ray"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 10000 and lines[0].startswith(f"{mnist_dir / 't10k-images-idx3-ubyte.gz'}[0]: 7 (p=")


def _model_without_metadata(exported, tmp_path):
    model = onnx.load(exported["dir"] / "model.onnx")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    return tmp_path / "bare.onnx"


@pytest.mark.parametrize("case, expect", [
    ("shape", "is not (28, 28)"), ("dtype", "dtype int64 is not supported"), ("range", "must lie in [0, 1]"),
    ("unreadable png", "not a readable image"), ("empty npy", "holds no images"), ("labels idx", "labels file"),
    ("no inputs", "no inputs given"), ("missing model", "model file not found"), ("bare model", "lacks the metadata"),
    ("garbage model", "cannot load this model"), ("unknown type", "unsupported input type"),
])
def test_bad_input_gets_a_clear_error(case, expect, exported, tmp_path, mnist_dir):
    model, inputs = exported["dir"], []
    if case == "shape":
        np.save(tmp_path / "a.npy", np.zeros((2, 32, 32), np.uint8)); inputs = [tmp_path / "a.npy"]
    elif case == "dtype":
        np.save(tmp_path / "a.npy", np.zeros((28, 28), np.int64)); inputs = [tmp_path / "a.npy"]
    elif case == "range":
        np.save(tmp_path / "a.npy", np.full((28, 28), 7.0, np.float32)); inputs = [tmp_path / "a.npy"]
    elif case == "unreadable png":
        (tmp_path / "a.png").write_bytes(b"not a png"); inputs = [tmp_path / "a.png"]
    elif case == "empty npy":
        np.save(tmp_path / "a.npy", np.zeros((0, 28, 28), np.uint8)); inputs = [tmp_path / "a.npy"]
    elif case == "labels idx":
        inputs = [mnist_dir / "t10k-labels-idx1-ubyte.gz"]
    elif case == "missing model":
        model = tmp_path / "none.onnx"; inputs = [mnist_dir / "t10k-images-idx3-ubyte.gz"]
    elif case == "bare model":
        model = _model_without_metadata(exported, tmp_path); inputs = [mnist_dir / "t10k-images-idx3-ubyte.gz"]
    elif case == "garbage model":
        (tmp_path / "g.onnx").write_bytes(b"\x00garbage"); model = tmp_path / "g.onnx"
        inputs = [mnist_dir / "t10k-images-idx3-ubyte.gz"]
    elif case == "unknown type":
        (tmp_path / "a.txt").write_text("7"); inputs = [tmp_path / "a.txt"]
    proc = edge("--model", model, *inputs)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_classifier_api_reads_normalisation_from_metadata(exported, test_images):
    from mnist_edge import Classifier

    images, labels = test_images
    classifier = Classifier(exported["dir"])
    assert (classifier.offset, classifier.scale) == (127.5, 255.0)
    predicted, probs = classifier.predict(images[:500])
    assert np.mean(predicted == labels[:500]) > 0.8 and np.allclose(probs.sum(1), 1)


def _executed_ops(session) -> list[str]:
    """Op types in the order ONNX Runtime ran them, from its profiler."""
    session.run(None, {session.get_inputs()[0].name: np.zeros((1, 28, 28, 1), np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_int8_model_carries_its_session_settings_and_the_runtime_applies_them(exported, tmp_path):
    import onnxruntime as ort

    from mnist_edge.runtime import open_session, session_settings

    int8 = exported["dir"] / "model.int8.onnx"
    assert session_settings(int8) == {"disabled_optimizers": ["QDQPropagationTransformer"]}
    assert session_settings(exported["dir"] / "model.onnx") == {}
    # The edge runtime's session quantizes after the first (fp32) max-pool; a session without
    # the model's settings hoists the QuantizeLinear above it and pools in uint8.
    ours = _executed_ops(open_session(int8, profile_prefix=str(tmp_path / "ours")))
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "plain")
    plain = _executed_ops(ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]))
    assert ours.index("MaxPool") < ours.index("QuantizeLinear"), ours
    assert plain.index("QuantizeLinear") < plain.index("MaxPool"), plain


def test_a_reader_that_stops_early_ends_predict_quietly(exported, mnist_dir):
    """`mnist-dist predict ... | head -1`: no BrokenPipeError traceback, the exit status of a piped tool."""
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", "predict", "--model", str(exported["dir"]),
                             str(mnist_dir / "t10k-images-idx3-ubyte.gz")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().endswith("\n")
    proc.stdout.close()  # the reader goes away, as `head -1` does
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_the_edge_runtime_loads_the_ort_format_and_answers_as_its_onnx_twin(exported, test_images):
    from mnist_edge import Classifier

    images, _ = test_images
    for int8 in (False, True):
        onnx_model = Classifier(exported["dir"], int8=int8)
        ort_model = Classifier(exported["dir"], int8=int8, ort_format=True)
        assert ort_model.path.suffix == ".ort" and ort_model.labels == onnx_model.labels
        onnx_labels, onnx_probs = onnx_model.predict(images[:500])
        ort_labels, ort_probs = ort_model.predict(images[:500])
        assert (onnx_labels == ort_labels).all() and np.abs(onnx_probs - ort_probs).max() < 1e-4, int8


def test_the_edge_cli_runs_an_ort_file_without_tensorflow_or_onnx(exported, tmp_path, test_images):
    images, labels = test_images
    np.save(tmp_path / "x.npy", images[:8])
    for args in (["--model", exported["dir"] / "model.int8.ort"], ["--model", exported["dir"], "--ort", "--int8"]):
        proc = edge(*args, "--json", tmp_path / "x.npy")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stderr.strip().splitlines()[-1])
        assert status == {"exit": 0, "heavy_modules": []}
        predicted = [row["label"] for row in json.loads(proc.stdout)["predictions"]]
        assert np.mean(np.array(predicted, dtype=int) == labels[:8]) >= 0.75, proc.stdout


@pytest.mark.parametrize("flags, expect", [(("--int4", "--ort"), "the int4 model has no .ort twin"),
                                           (("--int4", "--int8"), "--int8 and --int4 name two models"),
                                           (("--int4",), "{exported}/model.int4.onnx: this export has no int4 model. Fix: "
                                                         "export it with `mnist-dist export --int4`")])
def test_int4_flags_that_name_no_file_get_one_line(flags, expect, edge_export, exported, mnist_dir):
    model = exported["dir"] if "{exported}" in expect else edge_export  # the Ray run's export has no int4 file
    expect = expect.format(exported=exported["dir"])
    proc = edge("--model", model, *flags, mnist_dir / "t10k-images-idx3-ubyte.gz")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {expect}") and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the line, and the helper's own record of the imports


def test_the_int4_model_carries_its_session_setting_and_the_runtime_applies_it(edge_export, tmp_path):
    """With `session.disable_quant_qdq`, ONNX Runtime folds the 4-bit weights into float ones at
    load; without it, it dequantizes every weight on every call (ORT 1.31 has no int4 kernels)."""
    import onnxruntime as ort

    from mnist_edge.runtime import open_session

    int4 = edge_export / "model.int4.onnx"
    ours = _executed_ops(open_session(int4, profile_prefix=str(tmp_path / "ours")))
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "plain")
    plain = _executed_ops(ort.InferenceSession(str(int4), options, providers=["CPUExecutionProvider"]))
    assert ours.count("DequantizeLinear") + 4 <= plain.count("DequantizeLinear"), (ours, plain)
