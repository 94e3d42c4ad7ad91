"""The KubeRay manifests, rendered offline and checked against the real schemas."""
import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
OVERLAYS = ["cpu", "gpu"]


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    proc = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    docs = render(request.param)
    return request.param, {doc["kind"]: doc for doc in docs}, docs


def pods(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}


def test_every_overlay_renders_the_expected_objects(rendered):
    _overlay, by_kind, docs = rendered
    assert sorted(by_kind) == ["ConfigMap", "PersistentVolumeClaim", "RayJob", "ServiceAccount"]
    assert len(docs) == 4


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_objects_validate_against_the_kuberay_schemas(rendered, kind):
    _overlay, by_kind, _docs = rendered
    schema = json.loads((SCHEMAS / "RayJob.v1.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(by_kind["RayJob"])
    if kind == "RayCluster":  # the embedded cluster spec must be a valid RayCluster too
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
                   "spec": by_kind["RayJob"]["spec"]["rayClusterSpec"]}
        jsonschema.Draft7Validator(json.loads((SCHEMAS / "RayCluster.v1.schema.json").read_text())).validate(cluster)


def test_schema_validation_catches_a_bad_field(rendered):
    _overlay, by_kind, _docs = rendered
    bad = json.loads(json.dumps(by_kind["RayJob"]))
    bad["spec"]["ttlSecondsAfterFinished"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads((SCHEMAS / "RayJob.v1.schema.json").read_text())).validate(bad)


def test_core_objects_and_pod_templates_validate_against_kubernetes(rendered):
    _overlay, by_kind, _docs = rendered
    version = kubernetes_validate.latest_version()
    for kind in ("ConfigMap", "PersistentVolumeClaim", "ServiceAccount"):
        kubernetes_validate.validate(by_kind[kind], version, strict=True)
    for name, spec in pods(by_kind["RayJob"]).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": {"spec": spec}}
        kubernetes_validate.validate(template, version, strict=True)


def test_entrypoint_is_the_jobs_script_and_runs_a_real_command(rendered):
    _overlay, by_kind, _docs = rendered
    entrypoint = by_kind["RayJob"]["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["bash", "/app/jobs/pipeline.sh"]  # jobs/ is copied to /app/jobs in the image
    script = (ROOT / "jobs" / "pipeline.sh").read_text()
    assert "python -m mnist_dist.cli pipeline" in script
    from mnist_dist.cli import build_parser
    args = build_parser().parse_args(["pipeline", "--workers", "2", "--storage", "/mnt/runs"])
    assert args.command == "pipeline"
    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    assert "COPY --chown=1000:100 jobs ./jobs" in dockerfile and "WORKDIR /app" in dockerfile


def test_storage_is_the_mounted_volume_on_every_pod(rendered):
    _overlay, by_kind, _docs = rendered
    storage = by_kind["ConfigMap"]["data"]["MNIST_STORAGE"]
    assert '--storage "${MNIST_STORAGE' in (ROOT / "jobs" / "pipeline.sh").read_text()
    claim = by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    for name, spec in pods(by_kind["RayJob"]).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert storage in mounts, f"{name} does not mount {storage}"
        assert volumes[mounts[storage]]["persistentVolumeClaim"]["claimName"] == claim
        assert {"configMapRef": {"name": by_kind["ConfigMap"]["metadata"]["name"]}} in container["envFrom"]


def test_worker_count_matches_replicas(rendered):
    _overlay, by_kind, _docs = rendered
    workers = int(by_kind["ConfigMap"]["data"]["MNIST_WORKERS"])
    (group,) = by_kind["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    assert '--workers "${MNIST_WORKERS' in (ROOT / "jobs" / "pipeline.sh").read_text()


def test_requests_limits_non_root_and_lifecycle(rendered):
    _overlay, by_kind, _docs = rendered
    spec = by_kind["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    for name, pod in pods(by_kind["RayJob"]).items():
        assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), (name, part)


def test_gpus_on_workers_only_in_the_gpu_overlay(rendered):
    overlay, by_kind, _docs = rendered
    all_pods = pods(by_kind["RayJob"])
    head = all_pods.pop("head")
    assert "nvidia.com/gpu" not in json.dumps(head["containers"][0]["resources"])
    gpus = by_kind["ConfigMap"]["data"]["MNIST_GPUS_PER_WORKER"]
    assert '--gpus-per-worker "${MNIST_GPUS_PER_WORKER' in (ROOT / "jobs" / "pipeline.sh").read_text()
    for pod in all_pods.values():
        resources = pod["containers"][0]["resources"]
        image = pod["containers"][0]["image"]
        if overlay == "gpu":
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
            assert gpus == "1" and image.endswith("-gpu")
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        else:
            assert "nvidia.com/gpu" not in json.dumps(resources) and gpus == "0" and not image.endswith("-gpu")


def test_no_secrets_in_the_manifests():
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert "Secret" not in {doc["kind"] for doc in docs}
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert not [k for k in doc["data"] if re.search(r"(?i)password|secret|token|credential|_key", k)]
            if doc["kind"] == "RayJob":
                for pod in pods(doc).values():
                    for container in pod["containers"]:
                        assert "env" not in container  # settings arrive through the ConfigMap only


@pytest.mark.slow
def test_the_dockerfile_install_works_in_a_fresh_venv(tmp_path, wheel):
    """No Docker engine here: check the image's install step instead. Build the wheel the way
    `pip install .` does, install it into a fresh venv, and resolve the Dockerfile's extra."""
    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    assert re.search(r'pip install --no-cache-dir "\.\[\$\{EXTRAS\}\]"', dockerfile)
    assert re.search(r"^ARG EXTRAS=train$", dockerfile, re.M) and "rayproject/ray:2.60.0-py311" in dockerfile
    # The extra resolves against the pinned versions (dry run: nothing is downloaded twice).
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", f"{ROOT}[train]"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    # The wheel carries both packages and the console scripts, with only the edge dependencies.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", wheel], check=True, timeout=600)
    for script in ("mnist-edge", "mnist-dist"):
        proc = subprocess.run([env_dir / "bin" / script, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([py, "-c", "import mnist_edge.runtime, mnist_dist.data; import importlib.util as u; "
                                     "print(u.find_spec('tensorflow') is None)"], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr  # an edge install does not pull TensorFlow
