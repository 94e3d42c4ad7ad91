"""The rendered RayJob, executed: `kubectl kustomize` of a small overlay on k8s/overlays/cpu,
then what KubeRay would do with it, without Kubernetes or containers
(tests/helpers/kuberay_local.py). It proves that the manifest's environment, paths,
resources and entrypoint agree with each other and with the code."""
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers.kuberay_local import LocalRayJob, read_only_pod, render

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

def user_overlay(literals: list[str], wiring: bool = True, on: str = "cpu") -> str:
    """A user's own overlay on k8s/overlays/ON: the settings, then the wiring (unless forgotten)."""
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [f"../{on}"],
               "configMapGenerator": [{"name": "mnist-pipeline", "behavior": "merge", "literals": literals}]}
    return yaml.safe_dump({**overlay, **({"transformers": ["../../wiring"]} if wiring else {})}, sort_keys=False)


# A tiny run. A 1-epoch smoke net is too weak for the 0.1 pp int8 gate (tests/test_export.py covers it).
TINY = user_overlay(["MNIST_WORKERS=2", "MNIST_CPUS_PER_WORKER=1", "MNIST_MEMORY_PER_WORKER=2Gi", "MNIST_EPOCHS=1",
                     "MNIST_PRESET=smoke", "MNIST_EXTRA_ARGS=--train-limit 1024 --val-size 512 --max-int8-drop 5"])


def render_overlay(tmp_path: Path, name: str, kustomization: str) -> list[dict]:
    """A user's own overlay beside the real ones, in a copy of k8s/, rendered."""
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    (k8s / "overlays" / name).mkdir()
    (k8s / "overlays" / name / "kustomization.yaml").write_text(kustomization)
    return render(k8s / "overlays" / name)


def test_a_pod_here_writes_only_to_its_empty_dirs_and_volumes(tmp_path):
    """The harness's stand-in for readOnlyRootFilesystem: a write outside the mounts fails."""
    volume, empty_dir = tmp_path / "volume", tmp_path / "emptydir"
    volume.mkdir(), empty_dir.mkdir()
    script = ("touch /tmp/a && touch {v}/b && echo wrote; "
              "for p in $HOME/mnist-dist-probe ./probe /mnist-dist-probe; do touch $p 2>/dev/null && echo LEAK $p; done; true")
    # A checkout and a Python under /tmp (a CI clone there) stay visible, and read-only.
    image = tmp_path / "checkout"
    (image / "src").mkdir(parents=True)
    script += f"; test -d {image}/src && echo sees-the-image; touch {image}/src/x 2>/dev/null && echo LEAK image; true"
    proc = subprocess.run(read_only_pod(script.format(v=volume), image, {"/tmp": empty_dir}, [volume], [image]),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["wrote", "sees-the-image"], proc.stdout + proc.stderr
    assert (empty_dir / "a").exists() and (volume / "b").exists() and not Path("/tmp/a").exists()


def test_the_rendered_rayjob_trains_on_its_workers_and_leaves_a_verified_export(tmp_path, mnist_dir):
    docs = render_overlay(tmp_path, "tiny", TINY)
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    # MNIST where the image has it (its MNIST_DATA_DIR): the job downloads nothing.
    with LocalRayJob(docs, ROOT, tmp_path / "volumes", mnist=mnist_dir) as job:
        job.start()
        status, logs = job.submit(timeout=300)
    assert not job._mine(), "processes of the local cluster outlived it"
    assert status == "SUCCEEDED", logs[-5000:]
    # Each pod was started as the operator would: the workers with the CPUs the wiring set.
    assert "--num-cpus=0" in job.commands["head-0"] and "--memory=4294967296" in job.commands["head-0"]
    for worker in ("workers-0", "workers-1"):
        assert "--num-cpus=1 " in job.commands[worker] and "--memory=2147483648 " in job.commands[worker]
    run = Path(job.paths(settings["MNIST_STORAGE"])) / settings["MNIST_RUN_NAME"]
    assert run.parent == tmp_path / "volumes" / "mnist-runs"  # the PVC's mount path, mapped
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["verified"] is True, report
    assert "2 worker(s)" in logs and "verified export written to" in logs


# An overlay that changes the settings and forgets the wiring: the RayJob keeps the base's
# 2 workers of 2 CPUs, while the pipeline asks Ray for 3 of 2.
# Nodes get 5 s to join instead of 30 (launcher.JOIN_WAIT_ENV): no node joins here.
FORGOT_THE_WIRING = user_overlay(["MNIST_WORKERS=3", "MNIST_CPUS_PER_WORKER=2", "MNIST_EPOCHS=1", "MNIST_PRESET=smoke",
                                  "MNIST_DIST_JOIN_WAIT_S=5"], wiring=False)


def test_a_forgotten_wiring_fails_within_a_minute_in_one_line(tmp_path, mnist_dir):
    docs = render_overlay(tmp_path, "forgot", FORGOT_THE_WIRING)
    with LocalRayJob(docs, ROOT, tmp_path / "volumes", mnist=mnist_dir) as job:
        job.start()
        started = time.monotonic()
        status, logs = job.submit(timeout=300)
        seconds = time.monotonic() - started
    assert status == "FAILED", logs[-3000:]
    # One error line (the submitter prints the job's log again each time its pod is retried),
    # after the start-up line that said it would wait for nodes to join.
    waited = [line for line in logs.splitlines() if "waiting up to 5 s for more nodes to join" in line]
    assert waited and re.match(r"\[ *\d+\.\d s\] the cluster's nodes cannot hold the workers yet", waited[0]), logs[-3000:]
    (line,) = {line for line in logs.splitlines() if "workers asked for" in line and line not in waited}
    assert "place 2 of the 3 workers asked for (3 workers x 2 CPUs = 6 CPUs); its nodes have 4 CPUs in all" in line
    assert "transformers: [../../wiring]" in line and "Traceback" not in logs
    assert seconds < 60, f"the job took {seconds:.0f} s to fail"
    print(f"the forgotten wiring failed the job {seconds:.1f} s after its submission")
