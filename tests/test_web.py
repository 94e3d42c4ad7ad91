"""The browser as an edge device: export/web in a real headless Chromium against mnist_edge.

The page must classify, and preprocess, exactly as the Python edge runtime does; the server
(mnist_dist.web_demo) must serve only the page, onnxruntime-web and the export's models.
"""
import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers.browser import call, chromium, why_not

from mnist_dist import ownership, web_demo
from mnist_dist.cli import main as cli_main

# wasm's and the native CPU's kernels add floats in different orders; docs/benchmarks.md
# gives the differences measured, well inside this.
PROBABILITY_TOLERANCE = 1e-5
WAIT_FOR_RESULT = ("for (;;) { const last = window.mnistDemo.last;"
                   " if (last && last.source === args[0]) return last;"
                   " await new Promise((resolve) => setTimeout(resolve, 50)); }")


@pytest.fixture(scope="module")
def page(request, tmp_path_factory):
    """(driver, url, export dir): the demo served for the shared verified export, open in Chromium."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    exported = request.getfixturevalue("exported")  # only now: skipping must not cost a training run
    server, url = web_demo.serve(str(exported["dir"]))
    try:
        with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
            driver.get(url)
            call(driver, "await window.mnistDemo.ready;")
            yield driver, url, exported["dir"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def test_digits(mnist_dir):
    from mnist_edge import idx

    return idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz")[:200]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model.onnx", "model.int8.onnx"])
def test_the_page_classifies_the_first_200_test_digits_as_the_python_runtime(page, test_digits, model):
    from mnist_edge import Classifier

    driver, _, export_dir = page
    call(driver, "await window.mnistDemo.use(args[0]);", f"model/{model}")
    result = call(driver, "return await window.mnistDemo.classify(args[0]);",
                  base64.b64encode(test_digits.tobytes()).decode())
    labels, probs = Classifier(export_dir / model).predict(test_digits)
    page_labels, page_probs = np.array(result["labels"]), np.array(result["probs"])
    assert (page_labels == labels).all(), f"{int((page_labels != labels).sum())} of 200 classified differently"
    worst = float(np.abs(page_probs - probs).max())
    print(f"{model}: 200/200 argmax agree, max |probability difference| {worst:.2e}")
    assert worst <= PROBABILITY_TOLERANCE


def _digit_png(path, mode):
    """A hand-drawn-looking 7 in black: on white ("L", "RGB"), or on transparent ("RGBA")."""
    from PIL import Image, ImageDraw

    paper = {"L": 255, "RGB": (250, 248, 240), "RGBA": (0, 0, 0, 0)}[mode]
    ink = {"L": 0, "RGB": (20, 30, 60), "RGBA": (0, 0, 0, 255)}[mode]
    image = Image.new(mode, (150, 190), paper)
    draw = ImageDraw.Draw(image)
    draw.line([(40, 40), (110, 40), (60, 160)], fill=ink, width=16)
    draw.line([(50, 100), (100, 100)], fill=ink, width=12)
    image.save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode, how", [("L", "file input"), ("L", "drop"), ("RGB", "file input"), ("RGBA", "drop")])
def test_the_page_gives_the_same_tensor_as_mnist_edge_for_a_black_on_white_png(page, tmp_path, mode, how):
    from mnist_edge import Classifier, inputs

    driver, _, export_dir = page
    call(driver, "await window.mnistDemo.use('model/model.onnx');")
    png = _digit_png(tmp_path / f"digit-{mode}-{how.replace(' ', '-')}.png", mode)
    if how == "file input":
        driver.find_element("id", "file").send_keys(str(png))
    else:  # a real drop event on the pad, carrying the file
        call(driver, "const bytes = Uint8Array.from(atob(args[0]), (c) => c.charCodeAt(0));"
                     "const transfer = new DataTransfer();"
                     "transfer.items.add(new File([bytes], args[1], {type: 'image/png'}));"
                     "document.getElementById('pad').dispatchEvent("
                     "  new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));",
             base64.b64encode(png.read_bytes()).decode(), png.name)
    last = call(driver, WAIT_FOR_RESULT, png.name)

    classifier = Classifier(export_dir)
    pixels = inputs.from_image(png)
    page_pixels = np.array(last["pixels"], np.uint8).reshape(28, 28)
    page_input = np.array(last["input"], np.float32).reshape(1, 28, 28, 1)
    # Pillow's resize is reproduced bit for bit, so nothing is tolerated here.
    assert (page_pixels == pixels).all(), f"{int((page_pixels != pixels).sum())} pixels differ"
    assert (page_input == classifier.normalize(pixels[None])).all()
    labels, probs = classifier.predict(pixels[None])
    assert last["label"] == labels[0]
    assert np.abs(np.array(last["probs"]) - probs[0]).max() <= PROBABILITY_TOLERANCE
    if how == "file input":
        driver.execute_script("document.getElementById('file').value = '';")  # the next choice must fire 'change'


@pytest.mark.slow
def test_a_digit_drawn_on_the_pad_shows_its_prediction_and_bars(page, tmp_path):
    from mnist_edge import Classifier
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    driver, url, export_dir = page
    call(driver, "await window.mnistDemo.use('model/model.onnx'); document.getElementById('clear').click();")
    pad = driver.find_element("id", "pad")
    # A 7 with real pointer events: the bar, then the stem, in small steps as a hand moves.
    stroke = ActionChains(driver, duration=20).move_to_element_with_offset(pad, -70, -85).click_and_hold()
    for _ in range(14):
        stroke.move_by_offset(10, 0)
    for _ in range(18):
        stroke.move_by_offset(-5, 10)
    stroke.release().perform()
    last = call(driver, WAIT_FOR_RESULT, "pad")

    labels, probs = Classifier(export_dir).predict(np.array(last["pixels"], np.uint8).reshape(1, 28, 28))
    assert last["label"] == labels[0], "the page and mnist_edge disagree on the drawn digit"
    assert driver.find_element("id", "digit").text == str(labels[0])
    bars = driver.find_elements("css selector", "#bars li")
    assert len(bars) == 10
    top = driver.find_elements("css selector", "#bars li.top")
    assert [bar.find_element("css selector", ".label").text for bar in top] == [str(labels[0])]
    shown = [float(bar.find_element("css selector", ".value").text.rstrip("%")) for bar in bars]
    assert np.abs(np.array(shown) - 100 * probs[0]).max() <= 0.05 + 1e-9  # one decimal shown

    screenshot = tmp_path / "web-demo.png"
    assert driver.save_screenshot(str(screenshot))
    print(f"screenshot of a drawn {labels[0]} (p={probs[0][labels[0]]:.3f}): {screenshot}")
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, "the screenshot is nearly blank"
    bar, fill = (top[0].find_element("css selector", part).rect for part in (".bar", ".fill"))
    assert abs(fill["width"] - bar["width"] * probs[0][labels[0]]) <= 2, "the winning bar's length is not its probability"
    scale = driver.execute_script("return window.devicePixelRatio;")
    x, y, w, h = (round(scale * fill[k]) for k in ("x", "y", "width", "height"))
    blue = image[y + 2: y + h - 2, x + 2: x + w - 2].reshape(-1, 3)
    assert (np.abs(blue.astype(int) - (52, 103, 214)).max(axis=1) < 12).mean() > 0.9, "the winning bar is not drawn"

    # Nothing left the page: every request it made went to the demo's own server.
    resources = call(driver, "return performance.getEntriesByType('resource').map((entry) => entry.name);")
    assert resources and all(name.startswith(url) for name in resources), resources
    problems = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not problems, problems


# ---------------------------------------------------------------- the server, without a browser
@pytest.fixture
def fake_export(tmp_path):
    """A folder that passes for a verified export; the models' bytes are not read by the server."""
    directory = tmp_path / "run" / "export"
    directory.mkdir(parents=True)
    ownership.mark(directory, "export")
    (directory / "report.json").write_text(json.dumps({"verified": True}))
    for name in ("model.onnx", "model.int8.onnx"):
        (directory / name).write_bytes(b"onnx bytes of " + name.encode())
    return directory


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, None, b""


def test_the_server_serves_the_page_onnxruntime_web_and_the_models_only(fake_export):
    try:
        web_demo.check_web_files()
    except web_demo.DemoError as exc:
        pytest.skip(str(exc))
    server, url = web_demo.serve(str(fake_export))
    try:
        assert url.startswith("http://127.0.0.1:")
        status, kind, body = _get(url)
        assert (status, kind) == (200, "text/html; charset=utf-8") and b"Content-Security-Policy" in body
        assert _get(url + "preprocess.js")[:2] == (200, "text/javascript; charset=utf-8")
        assert _get(url + "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")[1] == "application/wasm"
        assert _get(url + "model/model.int8.onnx")[::2] == (200, b"onnx bytes of model.int8.onnx")
        for refused in ("package.json", "package-lock.json", "README.md", "model/report.json", "model/.mnist-dist.json",
                        "node_modules/onnxruntime-web/package.json", "node_modules/onnxruntime-web/dist/../package.json",
                        "node_modules/onnxruntime-web/dist/%2e%2e/package.json", "model/..%2fmodel.onnx", "%2e%2e/"):
            assert _get(url + refused)[0] == 404, refused
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_without_a_verified_export_gets_one_line(tmp_path, fake_export, capsys):
    run = tmp_path / "unexported"
    run.mkdir()
    assert cli_main(["serve-demo", "--run", str(run), "--port", "0"]) == 2
    assert capsys.readouterr().err == (f"error: {run / 'export'}: not a verified export. "
                                       f"Fix: mnist-dist export --run {run}.\n")
    (fake_export / "report.json").write_text(json.dumps({"verified": False}))
    assert cli_main(["serve-demo", "--export", str(fake_export), "--port", "0"]) == 2
    assert "not a verified export" in capsys.readouterr().err
    assert cli_main(["serve-demo", "--run", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_missing_node_modules_gets_one_line_naming_npm_ci(fake_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(web_demo, "ORT_DIR", tmp_path / "no-node-modules" / "dist")
    assert cli_main(["serve-demo", "--export", str(fake_export), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime-web is not installed" in err and "npm ci --prefix" in err
