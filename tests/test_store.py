"""The run store (mnist_dist/store.py): one semantics on a local disk and in a real S3-compatible
bucket (moto's server), tested in this process, without Ray or TensorFlow."""
import os
from pathlib import Path
import subprocess
import sys
import time

import pytest

from conftest import BUCKET, bucket_keys
from mnist_dist import ownership, store
from mnist_dist.errors import RunError
from mnist_dist.store import Location


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty folder: on this disk, or a fresh prefix of the test bucket."""
    if request.param == "local":
        return Location.of(tmp_path / "root")
    request.getfixturevalue("s3")
    return Location.of(f"s3://{BUCKET}/store-{request.node.name.rsplit('[', 1)[0]}-{time.monotonic_ns()}")


def test_a_location_is_made_once_from_the_users_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.of("runs").uri == f"{tmp_path}/runs"  # relative: against this directory, once
    assert Location.of(f"file://{tmp_path}/runs") == Location.of("runs")  # file:// is a local path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Location.of("~/runs").uri == f"{tmp_path}/home/runs"
    uri = Location.of("s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http")
    assert str(uri / "r1" / "export") == "s3://b/runs/r1/export?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (uri / "r1").name == "r1" and (uri / "r1").parent == uri
    assert uri.contains(uri / "r1" / "export") and not (uri / "r1").contains(uri / "r10")
    assert Location.of(uri) is uri
    assert Location.of("s3://b/runs/") == Location.of("s3://b/runs")  # one folder, one value
    local = Location.of(tmp_path / "v1?")  # a local name may hold a `?`: it is no query
    assert str(local / "report.json") == f"{tmp_path}/v1?/report.json" and (local / "x").name == "x"
    assert store.basename("runs/r1/checkpoint_epoch002/") == "checkpoint_epoch002"


def test_reads_writes_and_listings_mean_the_same_everywhere(root):
    config = root / "run" / "config.json"
    assert not root.exists() and root.entries() == [] and config.read_bytes() is None and config.read_json() is None
    config.write_json({"epochs": 2})
    (root / "run" / "checkpoint_epoch001" / "state.json").write_bytes(b"{}")
    assert config.read_json() == {"epochs": 2} and config.is_file() and not config.is_dir()
    assert (root / "run").is_dir() and root.exists() and not (root / "run").is_file()
    assert sorted((root / "run").entries()) == [("checkpoint_epoch001", False), ("config.json", True)]
    with (root / "run").local_copy() as local:
        assert (local / "checkpoint_epoch001" / "state.json").read_bytes() == b"{}"
        assert (local / "config.json").is_file()
    with config.local_copy() as local:
        assert local.read_bytes() == config.read_bytes()
    config.delete()
    config.delete()  # nothing there is fine
    assert config.read_bytes() is None
    with pytest.raises(FileNotFoundError), (root / "nothing").local_copy():
        pass
    assert (config.parent / "checkpoint_epoch001" / "state.json" / "below").read_bytes() is None  # below a file


def test_publish_swaps_a_folder_in_whole_and_a_bucket_commits_last(root, monkeypatch):
    target = root / "export"
    for generation in ("old", "new"):
        with target.staging() as staged:
            ownership.mark(staged, "export")
            for name in ("model.onnx", "report.json"):
                (staged / name).write_text(generation)
            ownership.publish(staged, target, "export", commit="report.json")
        assert {name for name, _ in target.entries()} == {ownership.MARKER, "model.onnx", "report.json"}
        assert (target / "model.onnx").read_bytes() == generation.encode()
    if "://" not in str(root):
        return  # locally the swap is one rename: there is no mid-way
    # Cut off mid-way, a bucket prefix holds no commit record: nothing takes it for a finished export.
    written = []
    real = Location.write_bytes

    def fail_after_the_first_file(self, data):
        if written and self.name != ownership.MARKER:
            raise RunError("the upload was cut off")
        written.append(self.name)
        real(self, data)

    with target.staging() as staged:
        ownership.mark(staged, "export")
        for name in ("model.onnx", "model.int8.onnx", "report.json"):
            (staged / name).write_text("third")
        monkeypatch.setattr(Location, "write_bytes", fail_after_the_first_file)
        with pytest.raises(RunError, match="cut off"):
            ownership.publish(staged, target, "export", commit="report.json")
        monkeypatch.undo()
    from mnist_dist.export import published

    assert (target / "report.json").read_bytes() is None and published(target) is None
    assert ownership.why_not_replaceable(target, "export") is None  # and the next export may replace it


def test_a_local_write_is_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    target = Location.of(tmp_path) / "result.json"
    target.write_json({"epochs": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the disk fills up while the new content is written
    with pytest.raises(RunError, match=r"result.json: writing failed \(No space left on device\)\. Fix: make it writable"):
        target.write_json({"epochs": 2})
    monkeypatch.undo()
    assert target.read_json() == {"epochs": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


HOLD = """
import sys, time
from mnist_dist.store import Location
with Location.of(sys.argv[1]).lock("train"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(location: Location) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(location)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_writer_a_second_is_refused_naming_the_holder(root):
    import socket

    run = root / "busy"
    holder = hold(run)
    try:
        with pytest.raises(RunError, match=rf"busy: in use by `mnist-dist train` \(pid {holder.pid} on "
                                           rf"{socket.gethostname()}.*Fix: wait for that command to finish"):
            with run.lock("export"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(root):
    """Locally the kernel drops it at once. In a bucket, a holder that ran in this boot and pid
    namespace and is gone is seen gone at once; one from elsewhere goes stale after STALE_S
    without a heartbeat."""
    run = root / "killed"
    holder = hold(run)
    holder.kill()
    holder.wait()
    with run.lock("train"):
        with run.lock("export"):  # the holder takes it again for free (the pipeline's export)
            pass
        assert f"(pid {os.getpid()} " in (run / store.LOCK_FILE).read_bytes().decode()
    if "://" not in str(run):
        return
    assert (run / store.LOCK_FILE).read_bytes() is None  # released
    # A holder on another machine, as it wrote its lock: refused until its heartbeat is stale.
    (run / store.LOCK_FILE).write_json({"holder": "`mnist-dist train` (pid 7 on elsewhere)", "token": "theirs",
                                        "heartbeat": time.time(), "process": {"boot": "another", "pid_namespace": 1,
                                                                              "pid": 7, "started": "1"}})
    with pytest.raises(RunError, match=r"in use by `mnist-dist train` \(pid 7 on elsewhere\)"), run.lock("train"):
        pass
    # The same lock once its last heartbeat is STALE_S old.
    stale = (run / store.LOCK_FILE).read_json() | {"heartbeat": time.time() - store.STALE_S - 1}
    (run / store.LOCK_FILE).write_json(stale)
    with run.lock("train"):
        pass


def test_storage_that_cannot_work_fails_in_seconds_with_one_line(s3, tmp_path):
    Location.of(f"s3://{BUCKET}/runs").check_reachable()
    Location.of(tmp_path / "new").check_reachable()
    cases = {"s3://no-such-bucket/runs": "bucket no-such-bucket does not exist. Fix: create it",
             "nosuchscheme://x/runs": "not a storage URI that pyarrow.fs can open",
             str(tmp_path / "file"): "is a file, not a folder. Fix: point --storage at a folder"}
    (tmp_path / "file").write_text("")
    for where, expected in cases.items():
        with pytest.raises(RunError, match=expected):
            Location.of(where).check_reachable()


def test_node_local_storage_is_refused_only_when_the_cluster_spans_several_hosts(tmp_path):
    """The decision, on this machine's real /proc/mounts and on a cluster's typical mounts."""
    mounts = ("/dev/nvme0n1p1 / ext4 rw 0 0\nfs-1.efs:/ /mnt/runs nfs4 rw 0 0\n"
              "tmpfs /mnt/runs/scratch tmpfs rw 0 0\nbucket /mnt/bucket fuse.s3fs rw 0 0\n")
    assert store.filesystem_type("/mnt/runs/a/b", mounts) == "nfs4"
    assert store.filesystem_type("/mnt/runs/scratch/x", mounts) == "tmpfs"
    two_hosts = {"10.0.0.1", "10.0.0.2"}
    for shared in ("/mnt/runs/x", "/mnt/bucket/x", "s3://bucket/runs"):
        Location.of(shared).check_shared(two_hosts, mounts)
    Location.of("/home/me/runs").check_shared({"127.0.0.1"}, mounts)  # several nodes on one host share its disk
    with pytest.raises(RunError, match=r"--storage /home/me/runs is on this node's own ext4 filesystem, but the "
                                       r"cluster's nodes are on 2 hosts .* Fix: an NFS path mounted on every node"):
        Location.of("/home/me/runs").check_shared(two_hosts, mounts)
    with pytest.raises(RunError, match="own .* filesystem"):  # this machine's own mounts
        Location.of(tmp_path).check_shared(two_hosts)
    with pytest.raises(RunError, match=r"^--teacher /home/me/runs/big/checkpoint_epoch020 is on this node's own ext4 "
                                       r"filesystem.*workers elsewhere cannot read it. Fix: .* \(--teacher s3://"):
        Location.of("/home/me/runs/big/checkpoint_epoch020").check_shared(two_hosts, mounts, flag="--teacher")


def test_a_mirror_puts_local_files_into_its_location(root):
    mirror = (root / "tensorboard").mirror()
    mirror.path.mkdir(parents=True, exist_ok=True)
    (mirror.path / "events.out.tfevents.1").write_bytes(b"step 1")
    mirror.sync()
    assert (root / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"step 1"
    (mirror.path / "events.out.tfevents.1").write_bytes(b"step 1, step 2")
    mirror.close()
    assert (root / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"step 1, step 2"


def test_the_readme_recipe_with_a_relative_data_dir(tmp_path):
    """README.md exports MNIST_DATA_DIR=../shared/data/mnist; the tests make it absolute before using it."""
    from conftest import ROOT

    code = "import os, conftest; print(os.environ['MNIST_DATA_DIR'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MNIST_DATA_DIR": "../shared/data/mnist", "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str((ROOT / "../shared/data/mnist").resolve())


def test_no_module_but_the_store_asks_whether_a_location_is_a_uri():
    from conftest import ROOT

    askers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mnist_dist").rglob("*.py")
                    if p.name != "store.py" and ("is_uri" in p.read_text() or "://\" in" in p.read_text()))
    assert askers == []


def test_bucket_keys_helper_sees_what_the_store_writes(s3):
    (Location.of(f"s3://{BUCKET}/keys") / "a" / "b.json").write_json({})
    assert bucket_keys("keys/") == ["keys/a/b.json"]


def test_no_module_imports_one_that_imports_it_back():
    """Imports inside functions count too: a circle is a circle whenever it closes."""
    import ast

    from conftest import ROOT

    def module(path):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    sources = {module(p): p for p in (ROOT / "mnist_dist").rglob("*.py")}
    graph = {name: set() for name in sources}
    for name, path in sources.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            graph[name] |= {t for t in targets if t in sources and t != name}

    def reaches(start, goal, seen=()):
        return any(step == goal or (step not in seen and reaches(step, goal, (*seen, step))) for step in graph[start])

    circles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a) and a < b)
    packages = {(a, b) for a, b in circles if b.startswith(a + ".") or a.startswith(b + ".")}  # a package and its own parts
    assert set(circles) - packages == set()


def test_a_baselines_file_in_a_bucket_is_checked_like_a_local_one(s3):
    from mnist_dist import baselines
    from mnist_dist.config import TrainConfig

    mine = Location.of(f"s3://{BUCKET}/figures/baselines.json")
    mine.write_json({"my": "numbers"})
    with pytest.raises(ownership.OwnershipError, match="`mnist-dist baseline` did not write"):
        baselines.run(TrainConfig(synthetic=True, epochs=1), epochs=1, out=mine, log=lambda _: None)
    assert mine.read_json() == {"my": "numbers"}


def test_a_folder_deleted_whole_loses_its_commit_record_first_and_nothing_there_is_fine(root):
    checkpoint = root / "checkpoint_step00000010"
    (checkpoint / "model.keras").write_bytes(b"weights")
    (checkpoint / "state.json").write_json({"global_step": 10})
    (root / "keep.json").write_json({})
    checkpoint.delete_tree(commit="state.json")
    assert not checkpoint.exists() and (root / "keep.json").is_file()
    checkpoint.delete_tree(commit="state.json")  # already gone


def test_publish_on_a_mount_that_refuses_chmod_still_swaps_the_folder_in(tmp_path, monkeypatch):
    """SMB mounts (Azure Files, k8s/storage/aks) set modes themselves and refuse a chmod
    from a user who is not the mount's owner: the folder is published all the same."""
    target = Location.of(tmp_path) / "export"
    real = Path.chmod

    def refused(self, mode, **kwargs):
        if self.parent == tmp_path or str(self).startswith(str(tmp_path)):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real(self, mode, **kwargs)

    with target.staging() as staged:
        ownership.mark(staged, "export")
        (staged / "report.json").write_text("{}")
        monkeypatch.setattr(Path, "chmod", refused)
        ownership.publish(staged, target, "export", commit="report.json")
    assert (target / "report.json").read_bytes() == b"{}"
