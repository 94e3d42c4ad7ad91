import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli
from mnist_edge import idx
from mnist_dist import export as export_mod
from mnist_dist import onnx_graph

pytestmark = pytest.mark.slow

NUMBERS = ("max_abs_logit_diff", "mean_abs_logit_diff", "argmax_disagreements", "tf_accuracy", "ort_accuracy",
           "size_bytes", "sha256", "latency_us_p50", "latency_us_p99", "throughput_b256")


def test_export_of_the_ray_run_is_verified_with_a_full_report(exported, ray_run):
    out = exported["dir"]
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True and all(rule["passed"] for rule in report["rules"])
    assert report["test_images"] == 10000
    for name in ("fp32", "int8"):
        for key in NUMBERS:
            assert key in report[name], (name, key)
        assert report[name]["size_bytes"] == (out / report[name]["file"]).stat().st_size
    assert report["fp32"]["argmax_disagreements"] == 0 and report["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert report["fp32"]["tf_accuracy"] == pytest.approx(ray_run["result"]["test_accuracy"])
    # At most 0.1 pp, counted in images: 0.9645 - 0.9635 is a little over 0.001 in floats.
    assert round(10000 * (report["int8"]["tf_accuracy"] - report["int8"]["ort_accuracy"])) <= 10
    assert report["int8"]["size_bytes"] < report["fp32"]["size_bytes"] / 3
    # Relative to the run: a copied or synced run's export names its own checkpoint.
    assert report["checkpoint"] == Path(ray_run["result"]["best_checkpoint"]).name
    assert "VERIFIED" in (out / "report.md").read_text()


def test_onnx_model_has_named_dynamic_input_metadata_and_a_lean_graph(exported, ray_run):
    model = onnx.load(exported["dir"] / "model.onnx")
    assert model.opset_import[0].version <= 18
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims[1:] == [28, 28, 1] and isinstance(dims[0], str)
    assert [o.name for o in model.graph.output] == ["logits"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["mnist_dist.normalization"])["offset"] == 127.5
    assert json.loads(meta["mnist_dist.labels"]) == [str(i) for i in range(10)]
    assert meta["mnist_dist.model"] == "tf-tutorial" and meta["mnist_dist.opset"] == str(model.opset_import[0].version)
    assert meta["mnist_dist.checkpoint"] == Path(ray_run["result"]["best_checkpoint"]).name
    # The run's name and the checkpoint's digest; no path of the training machine.
    best = Path(ray_run["result"]["best_checkpoint"])
    assert meta["mnist_dist.run"] == best.parent.name
    assert meta["mnist_dist.checkpoint_sha256"] == json.loads((best / "state.json").read_text())["model_sha256"]
    assert not any(str(best.parent) in value for value in meta.values())
    ops = onnx_graph.op_types(model)
    assert "Transpose" not in ops and "Shape" not in ops and "Gather" not in ops, ops
    int8 = onnx.load(exported["dir"] / "model.int8.onnx")
    assert "QuantizeLinear" in onnx_graph.op_types(int8)
    assert {p.key for p in int8.metadata_props} >= set(meta)
    # 7-bit weights: full-range int8 saturates on x86 CPUs without VNNI (see quantize_int8).
    int8_weights = [w for w in (onnx.numpy_helper.to_array(i) for i in int8.graph.initializer
                                if i.data_type == onnx.TensorProto.INT8) if w.ndim >= 2]
    # The first convolution stays fp32 (see quantize_int8): three int8 weight tensors, not four.
    assert len(int8_weights) == 3 and max(int(np.abs(w.astype(int)).max()) for w in int8_weights) == 64
    float_inits = {i.name for i in int8.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    first_conv = next(n for n in int8.graph.node if n.op_type == "Conv")
    assert first_conv.input[1] in float_inits  # its weights are read as-is, not through a DequantizeLinear
    # Converter and quantizer paths are not kept: every inner name is short (onnx_graph.short_names).
    for proto in (model, int8):
        inner = {n for node in proto.graph.node for n in (*node.input, *node.output)} - {"image", "logits", ""}
        assert all(re.fullmatch(r"t\d+", n) for n in inner), sorted(inner)[:5]
    int8_meta = {p.key: p.value for p in int8.metadata_props}
    assert json.loads(int8_meta["mnist_dist.ort_session"]) == {"disabled_optimizers": ["QDQPropagationTransformer"]}


def test_a_corrupted_weight_is_refused_and_nothing_is_published(small_run, monkeypatch, tmp_path):
    real = onnx_graph.fold_flatten_transpose

    def corrupt_one_weight(proto):
        proto = real(proto)
        init = next(i for i in proto.graph.initializer if len(onnx.numpy_helper.to_array(i).shape) == 2)
        weights = onnx.numpy_helper.to_array(init).copy()
        weights[0, 0] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(weights, init.name))
        return proto

    monkeypatch.setattr(onnx_graph, "fold_flatten_transpose", corrupt_one_weight)
    out = tmp_path / "export"
    lines = []
    report = export_mod.export(run=str(small_run), out=str(out), log=lines.append)
    assert report["verified"] is False
    assert not out.exists()
    failed = [r["rule"] for r in report["rules"] if not r["passed"]]
    assert "fp32_logit_tolerance" in failed
    assert any(line.startswith("FAILED rule fp32_logit_tolerance") for line in lines)
    rejected = json.loads((tmp_path / "export.rejected" / "report.json").read_text())
    assert rejected["verified"] is False


@pytest.mark.parametrize("case", ["no checkpoints", "missing checkpoint", "corrupt checkpoint", "opset", "verified exists"])
def test_bad_input_gets_a_clear_error(case, small_run, tmp_path):
    args = ["export", "--run", small_run, "--out", tmp_path / "out"]
    if case == "no checkpoints":
        (tmp_path / "empty").mkdir()
        args, expect = ["export", "--run", tmp_path / "empty"], "holds no checkpoints"
    elif case == "missing checkpoint":
        args, expect = ["export", "--checkpoint", tmp_path / "nope"], "does not exist"
    elif case == "corrupt checkpoint":
        broken = tmp_path / "broken"
        shutil.copytree(small_run / "checkpoint_epoch001", broken)
        model = broken / "model.keras"
        model.write_bytes(model.read_bytes()[:-100])
        args, expect = ["export", "--checkpoint", broken, "--out", tmp_path / "out"], "corrupt"
    elif case == "opset":
        args, expect = args + ["--opset", "21"], "opset 21 is not supported"
    else:
        (tmp_path / "out").mkdir()
        export_mod.ownership.mark(tmp_path / "out", "export")  # an earlier export's own folder
        (tmp_path / "out" / "report.json").write_text(json.dumps({"verified": True}))
        expect = "previous verified export"
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    if case == "verified exists":
        assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"verified": True}  # untouched


def test_force_replaces_a_verified_export(small_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is taken: nothing in it to lose
    # This test is about --force, not int8 quality: the 1-epoch, 94% LeNet-5 sits close to its
    # decision boundaries, and how many of them int8 rounding flips depends on the CPU's int8
    # kernels (0.03 pp on one machine, over 0.1 pp on another). The real run's export keeps the
    # 0.1 pp rule (conftest's `exported`); a 1 pp limit here still catches a broken int8 model.
    def export(**kwargs):
        options = export_mod.ExportOptions(max_int8_drop_pp=1.0, **kwargs)
        report = export_mod.export(run=str(small_run), out=str(out), options=options, log=lambda _: None)
        assert report["verified"], report["rules"]
        return report

    export()
    first = json.loads((out / "report.json").read_text())["created"]
    with pytest.raises(export_mod.ExportError):
        export()
    export(force=True)
    assert (out / "model.onnx").is_file() and json.loads((out / "report.json").read_text())["created"] >= first
    assert {p.name for p in out.iterdir()} == {export_mod.ownership.MARKER, "model.onnx", "model.int8.onnx", "model.ort",
                                               "model.int8.ort", "required_operators.config", "report.json",
                                               "report.md"}  # its own files, nothing else
    assert not list(tmp_path.glob(".out*"))  # no temporary or backup folder left behind


def test_folding_the_flatten_transpose_keeps_the_function():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)  # NCHW
    w = rng.standard_normal((4 * 5 * 2, 6)).astype(np.float32)
    from onnx import helper, numpy_helper, TensorProto
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
         helper.make_node("Shape", ["t"], ["s"]),
         helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
         helper.make_node("Concat", ["n", "minus1"], ["shape"], axis=0),
         helper.make_node("Reshape", ["t", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lean = onnx_graph.fold_flatten_transpose(model)
    assert onnx_graph.op_types(lean) == ["Flatten", "MatMul"]
    import onnxruntime as ort
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(lean.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_short_names_keep_the_function_and_the_graphs_own_input_and_output():
    from onnx import TensorProto, helper, numpy_helper
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    long = "edge_1/logits_1/Cast/ReadVariableOp:0_quantized"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", long], [long + "/MatMul:0"], name=long + "_MatMul"),
         helper.make_node("Relu", [long + "/MatMul:0"], ["logits"], name=long + "_Relu")],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(w, long)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = model.SerializeToString()
    short = onnx_graph.short_names(model)
    assert [n.name for n in short.graph.node] == ["n0", "n1"] and short.graph.initializer[0].name == "t0"
    assert list(short.graph.node[0].input) == ["image", "t0"] and list(short.graph.node[1].output) == ["logits"]
    onnx.checker.check_model(short)
    import onnxruntime as ort
    x = np.ones((2, 4), np.float32)
    run = lambda m: ort.InferenceSession(m).run(None, {"image": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(short.SerializeToString()), run(before))
    assert len(short.SerializeToString()) < len(before) - 100


def test_int8_drop_rule_counts_exactly_the_limit_as_passing():
    fp32 = {"argmax_disagreements": 0, "max_abs_logit_diff": 1e-6}

    def int8_rule(tf_accuracy, ort_accuracy):
        sections = {"fp32": fp32, "int8": {"tf_accuracy": tf_accuracy, "ort_accuracy": ort_accuracy}}
        return next(r for r in export_mod.verification_rules(sections, 1e-4, 0.1) if r["rule"] == "int8_accuracy_drop")

    assert int8_rule(0.9635, 0.9625)["passed"]  # 10 of 10,000 images: exactly 0.1 pp (seen failing in CI)
    assert not int8_rule(0.9635, 0.9624)["passed"]


def test_the_edge_model_exports_lean_small_and_exact(tmp_path, mnist_dir):
    """models.edge as a device gets it: batch norm folded, no Transpose, an int8 file far
    under 150 KB, and ONNX Runtime's logits equal Keras' (untrained weights, real digits)."""
    import keras

    from mnist_dist.data import load, normalize
    from mnist_dist.models import build
    from mnist_edge.runtime import open_session

    keras.utils.set_random_seed(0)
    model = build("edge")
    images = normalize(load(mnist_dir, val_size=1000, train_limit=512).train_x[:512])
    model(images[:256], training=True)  # moves the batch-norm statistics off their initial values
    proto = onnx_graph.fold_flatten_transpose(onnx_graph.convert(model, 17))
    ops = onnx_graph.op_types(proto)  # an untrained, all-zero bias may be folded away: no Add then
    assert ops[:9] == ["Reshape", "Conv", "Relu", "Conv", "Relu", "Conv", "Relu", "Flatten", "MatMul"], ops
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    onnx.save(proto, fp32)
    export_mod.quantize_int8(fp32, int8, images, tmp_path)
    onnx.save(onnx_graph.short_names(onnx.load(int8)), int8)  # as the export saves it
    assert int8.stat().st_size <= 40_000 and fp32.stat().st_size <= 140_000  # issue 32: a device model under 40 KB
    logits = open_session(fp32, threads=1).run(None, {"image": images[:64]})[0]
    np.testing.assert_allclose(logits, model(images[:64], training=False).numpy(), atol=1e-4)


def test_the_ort_format_twins_are_verified_alike_and_name_their_operators(exported):
    """model.ort and model.int8.ort, for ONNX Runtime's minimal and mobile builds: verified on
    the whole test set against TensorFlow as their .onnx twins are, with the operators a
    reduced build needs in required_operators.config."""
    out = exported["dir"]
    report = json.loads((out / "report.json").read_text())
    ort_format = report["ort_format"]
    for name, file in (("fp32", "model.ort"), ("int8", "model.int8.ort")):
        section = ort_format[name]
        assert section["file"] == file and section["size_bytes"] == (out / file).stat().st_size
        assert all(key in section for key in NUMBERS), name
        assert (out / file).read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    rules = {rule["rule"]: rule["passed"] for rule in report["rules"]}
    assert rules == {**{r: True for r in ("fp32_argmax_agreement", "fp32_logit_tolerance", "int8_accuracy_drop")},
                     **{f"ort_{r}": True for r in ("fp32_argmax_agreement", "fp32_logit_tolerance", "int8_accuracy_drop")}}
    assert ort_format["fp32"]["argmax_disagreements"] == 0 and ort_format["fp32"]["max_abs_logit_diff"] <= 1e-4
    # The reduced build's config: every operator domain and opset the two models run.
    config = (out / ort_format["required_operators"]).read_text()
    lines = [line for line in config.splitlines() if line and not line.startswith("#")]
    ops = {op for line in lines for op in line.split(";")[2].split(",")}
    assert any(line.startswith("ai.onnx;") for line in lines)
    assert {"MaxPool", "QuantizeLinear", "DequantizeLinear"} <= ops, config
    assert "fp32 .ort" in (out / "report.md").read_text()


def test_the_ort_files_keep_the_metadata_and_the_int8_session_settings(exported):
    import onnxruntime as ort

    for onnx_file, ort_file in (("model.onnx", "model.ort"), ("model.int8.onnx", "model.int8.ort")):
        meta = {p.key: p.value for p in onnx.load(exported["dir"] / onnx_file).metadata_props}
        session = ort.InferenceSession(str(exported["dir"] / ort_file), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map == meta, ort_file


def test_the_int4_file_has_4_bit_weights_is_verified_and_runs_with_its_session_setting(edge_export, mnist_dir):
    """`export --int4`: opset 21's DequantizeLinear over 4-bit weights, verified on the whole
    test set with its own rule, and run as the file asks (weights folded to float once, at load)."""
    import onnxruntime as ort
    from mnist_edge import Classifier
    from mnist_edge.runtime import session_settings

    out = edge_export
    report = json.loads((out / "report.json").read_text())
    int4, int8 = report["int4"], report["int8"]
    assert int4["file"] == "model.int4.onnx" and int4["size_bytes"] == (out / "model.int4.onnx").stat().st_size
    assert all(key in int4 for key in NUMBERS)
    assert int4["size_bytes"] < 0.7 * int8["size_bytes"]
    assert {r["rule"]: r["passed"] for r in report["rules"]}["int4_accuracy_drop"]
    model = onnx.load(out / "model.int4.onnx")
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 21
    assert any(n.op_type == "DequantizeLinear" and n.domain == "" for n in model.graph.node)
    four_bit = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(four_bit) >= 4, [t.data_type for t in model.graph.initializer]  # the three later convolutions and the dense
    assert session_settings(out / "model.int4.onnx")["config"] == {"session.disable_quant_qdq": "1"}
    # What the report says is what the edge runtime gets, and what a plain session gets too (only slower).
    test = idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = idx.read(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    classifier = Classifier(out, int4=True)
    assert classifier.path.name == "model.int4.onnx"
    predicted, _ = classifier.predict(test)
    assert float((predicted == labels).mean()) == pytest.approx(int4["ort_accuracy"], abs=1e-9)
    plain = ort.InferenceSession(str(out / "model.int4.onnx"), providers=["CPUExecutionProvider"])
    plain_logits = plain.run(None, {"image": classifier.normalize(test[:500])})[0]
    assert (plain_logits.argmax(1) == predicted[:500]).mean() >= 0.99
    assert "| int8 .ort | int4 |" in (out / "report.md").read_text()
