import gzip
import shutil

import numpy as np
import pytest

from conftest import run_cli
from mnist_dist import data


def copy_mnist(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in data.FILES.values():
        shutil.copy(src / f"{name}.gz", dst / f"{name}.gz")
    return dst


def test_real_mnist_loads_with_tutorial_split_and_scaling(mnist_dir):
    mnist = data.load(mnist_dir)
    assert (len(mnist.train_y), len(mnist.val_y), len(mnist.test_y)) == (55000, 5000, 10000)
    assert mnist.train_x.shape[1:] == (28, 28) and mnist.train_x.dtype == np.uint8
    x = data.normalize(mnist.val_x[:10])
    assert x.shape == (10, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == pytest.approx(-0.5) and x.max() == pytest.approx(0.5)
    assert mnist.test_y[:3].tolist() == [7, 2, 1]


def test_verify_command_reports_every_file(mnist_dir):
    proc = run_cli("data", "verify", "--data-dir", mnist_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" ok ") == 4 and "checksums match" in proc.stdout


def test_plain_uncompressed_files_are_read(mnist_dir, tmp_path):
    for name in data.FILES.values():
        (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    assert len(data.load(tmp_path).test_y) == 10000


def test_search_order_dir_then_env_then_cache(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    assert data.resolve_dir(None) == mnist_dir
    explicit = copy_mnist(mnist_dir, tmp_path / "explicit")
    assert data.resolve_dir(explicit) == explicit
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("MNIST_DIST_CACHE", str(tmp_path / "cache"))
    copy_mnist(mnist_dir, tmp_path / "cache" / "mnist")
    assert data.resolve_dir(None) == tmp_path / "cache" / "mnist"


def test_download_fills_cache_from_first_working_mirror(mnist_dir, tmp_path, monkeypatch):
    # A real download through keras.utils.get_file from file:// mirrors: the first is dead.
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("MNIST_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "MIRRORS", (f"file://{tmp_path}/no-such-mirror/", f"file://{mnist_dir}/"))
    mnist = data.load()
    assert len(mnist.train_y) == 55000
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").glob("*.gz")) == sorted(f"{n}.gz" for n in data.FILES.values())


def test_synthetic_data_says_so():
    mnist = data.synthetic(n_train=500, n_test=100, val_size=100)
    assert mnist.synthetic and "SYNTHETIC" in mnist.describe()


def _corrupt(directory, case):
    images = directory / "train-images-idx3-ubyte.gz"
    labels = directory / "train-labels-idx1-ubyte.gz"
    if case == "truncated gzip":
        raw = images.read_bytes()
        images.write_bytes(raw[: len(raw) // 2])
    elif case == "wrong magic":
        content = bytearray(gzip.decompress(labels.read_bytes()))
        content[3] = 0x07
        labels.write_bytes(gzip.compress(bytes(content)))
    elif case == "count mismatch":
        content = gzip.decompress(labels.read_bytes())
        count = (59999).to_bytes(4, "big")
        labels.write_bytes(gzip.compress(content[:4] + count + content[8:-1]))
    elif case == "checksum":
        content = bytearray(gzip.decompress(images.read_bytes()))
        content[5000] ^= 0xFF
        images.write_bytes(gzip.compress(bytes(content), compresslevel=1))  # level 9 takes seconds on 47 MB
    elif case == "missing file":
        labels.unlink()
    return {"truncated gzip": (images.name, "truncated or corrupt"),
            "wrong magic": (labels.name, "wrong magic number"),
            "count mismatch": (images.name, "60000 images but"),
            "checksum": (images.name, "SHA-256"),
            "missing file": ("train-labels-idx1-ubyte", "missing")}[case]


@pytest.mark.parametrize("case", ["truncated gzip", "wrong magic", "count mismatch", "checksum", "missing file"])
def test_bad_files_fail_with_one_clear_message(mnist_dir, tmp_path, case):
    directory = copy_mnist(mnist_dir, tmp_path / "mnist")
    filename, problem = _corrupt(directory, case)
    proc = run_cli("data", "verify", "--data-dir", directory)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and filename in proc.stderr and problem in proc.stderr
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    # ...and nothing trains on it.
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--data-dir", directory, "--storage", tmp_path / "runs")
    assert proc.returncode == 2 and filename in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_directory_that_does_not_exist(tmp_path):
    proc = run_cli("data", "verify", "--data-dir", tmp_path / "nope")
    assert proc.returncode == 2
    assert "directory does not exist" in proc.stderr and str(tmp_path / "nope") in proc.stderr and "Fix:" in proc.stderr


def test_a_worker_whose_node_lacks_the_driver_folder_reads_its_own_verified_cache(tmp_path, mnist_dir, monkeypatch):
    """data.dir_on_this_node: the driver's folder where this node has it, else this node's
    cache (downloaded there when missing: no mirror is reachable here, so it is filled by hand)."""
    import shutil

    from mnist_dist import data

    cache = tmp_path / "cache"
    (cache / "mnist").mkdir(parents=True)
    for name in data.FILES.values():
        shutil.copy(mnist_dir / f"{name}.gz", cache / "mnist")
    monkeypatch.setenv("MNIST_DIST_CACHE", str(cache))
    assert data.dir_on_this_node(str(mnist_dir)) == mnist_dir
    assert data.dir_on_this_node(str(tmp_path / "only-on-the-driver's-node")) == cache / "mnist"
    assert data.dir_on_this_node(None) == cache / "mnist"
    labels = cache / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x02\x01\x02"))  # a valid IDX, but not MNIST's
    with pytest.raises(data.DataError, match="10000 images but .* has 2 labels"):
        data.dir_on_this_node(None)  # checked on the node, before a worker trains on it
