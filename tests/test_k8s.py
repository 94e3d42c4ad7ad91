"""The KubeRay manifests, rendered offline: checked against the real schemas, against the
restricted Pod Security Standard, and for numbers that agree (what Ray is told == what the
pods get), in every overlay and in scratch overlays that change the settings.
tests/test_rayjob.py runs one of them."""
import gzip
import json
import os
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
from helpers.kuberay_local import (
    DASHBOARD_PORT,
    GCS_PORT,
    IMAGE_ENV,
    IMAGE_MNIST,
    IMAGE_WORKDIR,
    groups,
    quantity,
    ray_start_command,
    ray_start_params,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
OPERATOR, MIN_OPERATOR = "1.7.0", "1.6.0"  # the schemas' operator; the first with every field used here
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
# Overlays as a user writes them (k8s/README.md): settings in a configMapGenerator, then the wiring.
SCRATCH = {
    "scratch-gpu-3x2": ("../gpu", ["MNIST_WORKERS=3", "MNIST_CPUS_PER_WORKER=4", "MNIST_GPUS_PER_WORKER=2"], []),
    "kueue": ("../cpu", [], ["../../components/kueue"]),
    # The object store with each cloud's workload identity instead of keys (k8s/README.md).
    "s3-irsa": ("../s3", [], ["../../components/aws-irsa"]),
    "gcs-workload-identity": ("../cpu", [], ["../../components/object-store", "../../components/gke-workload-identity"]),
    "abfs-workload-identity": ("../cpu", [], ["../../components/object-store", "../../components/aks-workload-identity"]),
    # Each cloud's GPU placement, on the gpu overlay and (gke) the spot one.
    "gpu-gke": ("../gpu", [], ["../../components/gpu-gke"]),
    "gpu-eks": ("../gpu", [], ["../../components/gpu-eks"]),
    "gpu-aks": ("../gpu", [], ["../../components/gpu-aks"]),
    "gpu-spot-gke": ("../gpu-spot", [], ["../../components/gpu-gke"]),
    # MLflow's URI and its egress, on a run and on a sweep (docs/registry.md).
    "mlflow": ("../cpu", [], ["../../components/mlflow"]),
    "tune-mlflow": ("../tune", [], ["../../components/mlflow"]),
}
# And the README's own examples, as written there: "big" (4 workers x 4 CPUs) and "options".
README_OVERLAYS = ["big", "options", "readme-gpu-gke", "readme-mlflow"]
KUEUE = {"kueue", "options"}
# The overlays pin both images by digest (placeholders for the digests `docker push` prints).
CPU_IMAGE = "registry.example.com/mnist-dist@sha256:" + "0" * 64
GPU_IMAGE = "registry.example.com/mnist-dist-gpu@sha256:" + "1" * 64
GPU_COMPONENTS = {"gpu-gke": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                  "gpu-eks": {"node.kubernetes.io/instance-type": "g4dn.xlarge"},
                  "gpu-aks": {"kubernetes.azure.com/accelerator": "nvidia"}}


def scratch_kustomization(base: str, literals: list[str], components: list[str]) -> str:
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base]}
    if components:
        kustomization["components"] = components
    if literals:
        kustomization["configMapGenerator"] = [{"name": "mnist-pipeline", "behavior": "merge", "literals": literals}]
    kustomization["transformers"] = ["../../wiring/elastic" if base == "../gpu-spot" else "../../wiring"]
    return yaml.safe_dump(kustomization, sort_keys=False)


@pytest.fixture(scope="module")
def scratch_k8s(tmp_path_factory):
    """A copy of k8s/ with the scratch overlays beside the real ones."""
    k8s = tmp_path_factory.mktemp("scratch") / "k8s"
    shutil.copytree(K8S, k8s)
    examples = re.findall(r"```yaml\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    overlays = {**{name: scratch_kustomization(*spec) for name, spec in SCRATCH.items()},
                **dict(zip(README_OVERLAYS, examples, strict=True))}
    for name, text in overlays.items():
        (k8s / "overlays" / name).mkdir()
        (k8s / "overlays" / name / "kustomization.yaml").write_text(text)
    return k8s


@pytest.fixture(scope="module", params=OVERLAYS + list(SCRATCH) + README_OVERLAYS)
def rendered(request, scratch_k8s):
    docs = render((K8S if request.param in OVERLAYS else scratch_k8s) / "overlays" / request.param)
    by_kind = {doc["kind"]: doc for doc in docs}
    return request.param, by_kind, docs


def pods(rayjob) -> dict[str, dict]:
    """Every pod template the RayJob makes: the head, each worker group and the submitter."""
    return {**{name: group["template"]["spec"] for name, (_t, group) in groups(rayjob).items()},
            "submitter": rayjob["spec"]["submitterPodTemplate"]["spec"]}


def rayjob_of(docs) -> dict:
    (rayjob,) = [doc for doc in docs if doc["kind"] == "RayJob"]
    return rayjob


def settings(by_kind) -> dict[str, str]:
    return by_kind["ConfigMap"]["data"]


def settings_of(overlay: str) -> dict[str, str]:
    return settings({doc["kind"]: doc for doc in render(K8S / "overlays" / overlay)})


def elastic(rayjob) -> bool:
    return rayjob["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling", False)


def test_every_overlay_renders_the_expected_objects(rendered):
    _name, by_kind, docs = rendered
    # No PersistentVolumeClaim: the runs' volume is k8s/storage, so deleting a job never deletes the runs.
    # One more NetworkPolicy for the autoscaler of an elastic group, and one for the head's way to MLflow.
    policies = 3 + elastic(by_kind["RayJob"]) + ("MLFLOW_TRACKING_URI" in settings(by_kind))
    expected = ["ConfigMap", *["NetworkPolicy"] * policies, "RayJob", "ServiceAccount"]
    assert sorted(doc["kind"] for doc in docs) == expected


# Each cloud's storage folder and the ReadWriteMany class its CSI driver serves (k8s/README.md).
STORAGE_CLASSES = {"eks": "efs-sc", "gke": "standard-rwx", "aks": "azurefile-csi"}


def storage_claim(cloud: str = "gke") -> dict:
    (claim,) = render(K8S / "storage" / cloud)
    return claim


@pytest.mark.parametrize("cloud", sorted(STORAGE_CLASSES))
def test_the_runs_volume_is_applied_on_its_own_per_cloud_and_is_the_claim_every_job_mounts(cloud):
    claim = storage_claim(cloud)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == STORAGE_CLASSES[cloud]
    kubernetes_validate.validate(claim, kubernetes_validate.latest_version(), strict=True)
    claimed = {v["persistentVolumeClaim"]["claimName"]
               for overlay in OVERLAYS for doc in render(K8S / "overlays" / overlay) if doc["kind"] == "RayJob"
               for pod in pods(doc).values() for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    assert claimed == {claim["metadata"]["name"]}


def test_storage_without_a_cloud_is_refused_before_anything_is_applied_in_one_line():
    """`kubectl apply -k k8s/storage` would make a claim on the default class, which no
    cloud serves ReadWriteMany: every pod would stay Pending. Rendering fails instead."""
    kubectl = shutil.which("kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "storage")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert "k8s/storage names no StorageClass: apply k8s/storage/eks, /gke or /aks" in line
    for cloud in STORAGE_CLASSES:  # every folder that line names exists and renders
        assert storage_claim(cloud)["metadata"]["name"] == "mnist-runs"


def unknown_fields(instance, schema, path="") -> list[str]:
    """Fields the schema does not name: a plain JSON Schema validator lets them through, the
    API server drops them (or refuses them, with strict field validation)."""
    if isinstance(instance, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        found = []
        for key, value in instance.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
        return found
    if isinstance(instance, list) and "items" in schema:
        return [f for i, item in enumerate(instance) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_objects_validate_against_the_kuberay_schemas(rendered, kind):
    _name, by_kind, _docs = rendered
    rayjob = by_kind["RayJob"]
    if kind == "RayCluster":  # the embedded cluster spec must be a valid RayCluster too
        rayjob = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
                  "spec": rayjob["spec"]["rayClusterSpec"]}
    schema = json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(rayjob)
    assert unknown_fields(rayjob, schema) == []


def test_schema_validation_catches_a_bad_field(rendered):
    _name, by_kind, _docs = rendered
    schema = json.loads((SCHEMAS / "RayJob.v1.schema.json").read_text())
    bad = json.loads(json.dumps(by_kind["RayJob"]))
    bad["spec"]["activeDeadlineSeconds"] = "three hours"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)
    bad = json.loads(json.dumps(by_kind["RayJob"]))
    bad["spec"]["preRunningDeadlineSecond"] = 900  # a typo the schema's own validator lets through
    assert unknown_fields(bad, schema) == [".spec.preRunningDeadlineSecond"]


def test_core_objects_and_pod_templates_validate_against_kubernetes(rendered):
    _name, by_kind, _docs = rendered
    version = kubernetes_validate.latest_version()
    for doc in _docs:
        if doc["kind"] != "RayJob":
            kubernetes_validate.validate(doc, version, strict=True)
    for name, spec in pods(by_kind["RayJob"]).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": {"spec": spec}}
        kubernetes_validate.validate(template, version, strict=True)


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    _name, by_kind, _docs = rendered
    assert by_kind["ServiceAccount"]["automountServiceAccountToken"] is False
    for name, pod in pods(by_kind["RayJob"]).items():
        where = f"{name} pod"
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # No API token mounted in any pod; the autoscaler's container alone gets one (below).
        assert pod["automountServiceAccountToken"] is False, where
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), where
        assert all(set(v) <= {"name", "persistentVolumeClaim", "configMap", "secret", "emptyDir", "projected"}
                   for v in pod.get("volumes", [])), where  # no hostPath
        for container in pod["containers"]:
            assert not any("serviceaccount" in m["mountPath"] for m in container.get("volumeMounts", [])), where
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security.get("runAsUser", context["runAsUser"]) != 0, where
            assert "seccompProfile" not in security or security["seccompProfile"]["type"] == "RuntimeDefault", where
    if elastic(by_kind["RayJob"]):  # the operator builds the autoscaler's container with this securityContext
        security = by_kind["RayJob"]["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
        # KubeRay's autoscaler patches the RayCluster: the token automount would give every
        # container of the head, here only the autoscaler's, at the path the client reads.
        head = pods(by_kind["RayJob"])["head"]
        (api,) = [v for v in head["volumes"] if v["name"] == "kube-api-access"]
        sources = {next(iter(s)): s[next(iter(s))] for s in api["projected"]["sources"]}
        assert sources["serviceAccountToken"]["path"] == "token" and sources["configMap"]["name"] == "kube-root-ca.crt"
        assert sources["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
        mounts = by_kind["RayJob"]["spec"]["rayClusterSpec"]["autoscalerOptions"]["volumeMounts"]
        assert {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True} in mounts


def test_every_container_has_a_read_only_root_and_a_writable_tmp(rendered):
    """Hardened admission policies require readOnlyRootFilesystem; Ray writes its session
    directory to /tmp, so each pod mounts an emptyDir there (tests/test_rayjob.py runs the
    job that way). The autoscaler's container shares the head pod's."""
    _name, by_kind, _docs = rendered
    rayjob = by_kind["RayJob"]
    for role, spec in pods(rayjob).items():
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        containers = spec["containers"] + ([rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]]
                                           if role == "head" and elastic(rayjob) else [])
        for container in containers:
            where = f"{role}/{container.get('name', 'autoscaler')}"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            tmp = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0] in empty_dirs, where
    # The image sends HOME's caches to /tmp (tests/helpers/kuberay_local.py gives the pods the same).
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    for key in ("XDG_CACHE_HOME", "KERAS_HOME", "MPLCONFIGDIR", "CUDA_CACHE_PATH"):
        assert re.search(rf"^ENV {key}=/tmp/", dockerfile, re.M), key


def test_what_ray_is_told_is_what_each_pod_gets(rendered):
    """requests == limits everywhere, and `ray start` gets exactly those numbers: the group's
    rayStartParams, completed from the container's limits as the operator does."""
    _name, by_kind, _docs = rendered
    for name, pod in pods(by_kind["RayJob"]).items():
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], (name, resources)
            assert {"cpu", "memory"} <= set(resources["limits"]), name
    for name, (node_type, group) in groups(by_kind["RayJob"]).items():
        params = ray_start_params(group, node_type)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(params["memory"]) == quantity(limits["memory"]), name
        gpus = {k: v for k, v in limits.items() if k.endswith("gpu")}
        assert int(params.get("num-gpus", 0)) == sum(quantity(v) for v in gpus.values()), name
        if node_type == "worker":
            assert int(params["num-cpus"]) == quantity(limits["cpu"]), name
        else:  # the head schedules no training: Ray gets 0 CPUs and 0 GPUs, the driver the pod's CPUs
            assert params["num-cpus"] == "0" and params["num-gpus"] == "0" and not gpus
            assert quantity(limits["cpu"]) >= 1


def test_the_operator_mirror_fills_what_rayStartParams_leave_out():
    """generateRayStartCommand, as tests/helpers/kuberay_local.py mirrors it: CPUs from the
    limit rounded up, memory in bytes, GPUs from a resource named *gpu; given values win."""
    group = {"rayStartParams": {"block": "false"},
             "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "1500m", "memory": "2Gi",
                                                                             "nvidia.com/gpu": 1}}}]}}}
    params = ray_start_params(group, "worker")
    assert (params["num-cpus"], params["memory"], params["num-gpus"]) == ("2", "2147483648", "1")
    assert params["address"].endswith(":6379") and params["block"] == "true"
    command = ray_start_command({**params, "num-cpus": "0", "log-color": "false"}, "worker")
    assert " --block " in command and " --num-cpus=0 " in command and " --log-color=false " in command
    group["rayStartParams"] = {"num-cpus": "3", "num-gpus": "0"}
    assert ray_start_params(group, "head")["num-cpus"] == "3" and ray_start_params(group, "head")["num-gpus"] == "0"


def node_table() -> dict[tuple[str, str], dict[str, float]]:
    """k8s/README.md's "Node size" table: (cloud, pool) -> what a node leaves for the job's pods."""
    section = (K8S / "README.md").read_text().split("## Node size", 1)[1].split("\n## ", 1)[0]
    nodes = {}
    for row in re.findall(r"^\| (EKS|GKE|AKS) \| (cpu|gpu) \| [^|]+ \| ([^|]+) \| ([^|]+) \|", section, re.M):
        cloud, pool, allocatable, daemonsets = row
        (cpu, mem), (ds_cpu, ds_mem) = ([quantity(v.strip()) for v in col.split(",")] for col in (allocatable, daemonsets))
        nodes[cloud, pool] = {"cpu": cpu - ds_cpu, "memory": mem - ds_mem}
    return nodes


def pod_requests(rayjob) -> list[tuple[str, str, dict[str, float]]]:
    """(pod, pool, requests) for every pod the job runs at its largest: the head (with the
    autoscaler's container when it has one), each worker replica, and the submitter."""
    def total(containers):
        return {r: sum(quantity(c["resources"]["requests"].get(r, 0)) for c in containers) for r in ("cpu", "memory")}
    spec = rayjob["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    if elastic(rayjob):
        head = [*head, spec["autoscalerOptions"]]
    found = [("head", "cpu", total(head)),
             ("submitter", "cpu", total(rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]))]
    for group in spec["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        pool = "gpu" if any("nvidia.com/gpu" in c["resources"]["requests"] for c in containers) else "cpu"
        found += [(f"{group['groupName']}-{i}", pool, total(containers)) for i in range(int(group["maxReplicas"]))]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlays_pods_fit_the_named_nodes_of_each_cloud_beside_the_system_daemonsets(overlay):
    """Each pod fits a node of its pool, and the head and submitter share a node with a CPU
    worker: N CPU workers take N nodes (k8s/README.md, "Node size")."""
    nodes = node_table()
    assert {cloud for cloud, _pool in nodes} == {"EKS", "GKE", "AKS"} and len(nodes) == 6
    job = pod_requests(rayjob_of(render(K8S / "overlays" / overlay)))
    for (cloud, pool), room in nodes.items():
        mine = sorted((r for _name, p, r in job if p == pool), key=lambda r: -r["cpu"])
        for name, p, requests in job:
            assert p != pool or all(requests[r] <= room[r] for r in room), f"{overlay}: {name} does not fit {cloud} {pool}"
        bins: list[dict[str, float]] = []  # first fit, largest first
        for requests in mine:
            free = next((b for b in bins if all(b[r] >= requests[r] for r in room)), None)
            if free is None:
                bins.append(free := dict(room))
            for r in room:
                free[r] -= requests[r]
        workers = sum(1 for name, p, _r in job if p == pool and name.startswith("workers-"))
        assert len(bins) <= max(workers, 1 if mine else 0), f"{overlay} needs {len(bins)} {cloud} {pool} nodes"


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if not {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def allowed(docs, direction: str, pod: dict, peer: dict | None, port: int, protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let `port` through to (ingress) or from (egress)
    `pod`, from or to `peer`'s labels (None: an address outside the namespace's pods).
    Policies add up; a pod no policy of that direction selects would allow everything."""
    rules_key, peers_key, kind = ("ingress", "from", "Ingress") if direction == "in" else ("egress", "to", "Egress")
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"
                and kind in d["spec"]["policyTypes"] and selects(d["spec"]["podSelector"], pod)]
    assert policies, f"no {kind} policy selects {pod}: it would be open"
    for rule in (r for spec in policies for r in spec.get(rules_key, [])):
        ports_ok = any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in rule.get("ports", [{}]))
        peers = rule.get(peers_key)
        peer_ok = peers is None or any(
            "podSelector" in q and "namespaceSelector" not in q and peer is not None and selects(q["podSelector"], peer)
            for q in peers)
        if ports_ok and peer_ok:
            return True
    return False


def test_the_network_policies_let_in_only_the_jobs_own_traffic(rendered):
    name, by_kind, docs = rendered
    rayjob = by_kind["RayJob"]
    labels = {role: (rayjob["spec"]["submitterPodTemplate"] if role == "submitter" else group["template"])["metadata"]["labels"]
              for role, group in [(r, g) for r, (_t, g) in groups(rayjob).items()] + [("submitter", None)]}
    head, worker, submitter = labels["head"], labels["workers"], labels["submitter"]
    assert len({json.dumps(v, sort_keys=True) for v in labels.values()}) == 3  # each role told apart
    ray_ports = [GCS_PORT, DASHBOARD_PORT, 10001, 52365, 10002, 19999, 34567]  # named and random ports
    for a in (head, worker):
        for b in (head, worker):
            assert all(allowed(docs, "in", a, b, port) and allowed(docs, "out", b, a, port) for port in ray_ports)
        assert allowed(docs, "out", a, None, 53, "UDP") and allowed(docs, "out", a, None, 53)
        assert not allowed(docs, "in", a, None, 8265), "the head or a worker lets in anyone"
    # The submitter reaches the head's dashboard, and nothing else; nothing reaches the submitter.
    assert allowed(docs, "in", head, submitter, DASHBOARD_PORT) and allowed(docs, "out", submitter, head, DASHBOARD_PORT)
    assert not allowed(docs, "in", head, submitter, GCS_PORT) and not allowed(docs, "in", worker, submitter, DASHBOARD_PORT)
    assert not allowed(docs, "out", submitter, worker, DASHBOARD_PORT)
    assert not any(allowed(docs, "in", submitter, peer, port) for peer in (head, worker, None) for port in ray_ports)
    # Egress to the object store (443) only where the run is in one; the head's autoscaler calls the API server.
    bucket = "://" in settings(by_kind)["MNIST_STORAGE"]
    assert allowed(docs, "out", worker, None, 443) == bucket, name
    assert allowed(docs, "out", head, None, 443) == (bucket or elastic(rayjob)), name
    assert not allowed(docs, "out", worker, None, 80) and not allowed(docs, "out", submitter, None, 443)
    # And to an MLflow server only where the pods are told one, and from the head alone (the driver logs).
    assert allowed(docs, "out", head, None, 5000) == ("MLFLOW_TRACKING_URI" in settings(by_kind)), name
    assert not allowed(docs, "out", worker, None, 5000)
    # The KubeRay operator polls the job on the head's dashboard, from the namespace the README installs it in.
    (dashboard,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-dashboard")]
    operator = [q for rule in dashboard["spec"]["ingress"] for q in rule["from"] if "namespaceSelector" in q]
    namespace = operator[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert f"--namespace {namespace} --create-namespace" in (K8S / "README.md").read_text()


def test_settings_reach_replicas_ray_and_the_pods_in_every_overlay(rendered):
    name, by_kind, _docs = rendered
    config = settings(by_kind)
    (group,) = by_kind["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    from mnist_dist.config import parse_workers

    (low, workers), cpus, gpus = (parse_workers(config["MNIST_WORKERS"]), int(config["MNIST_CPUS_PER_WORKER"]),
                                  int(config["MNIST_GPUS_PER_WORKER"]))
    # A range MIN-MAX: MAX pods asked for, the autoscaler may go down to MIN (components/elastic).
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (low or workers, workers, workers)
    assert elastic(by_kind["RayJob"]) == (low is not None)
    params = ray_start_params(group, "worker")
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert int(params["num-cpus"]) == cpus == quantity(resources["limits"]["cpu"]) == quantity(resources["requests"]["cpu"])
    assert int(params["memory"]) == quantity(config["MNIST_MEMORY_PER_WORKER"]) == quantity(resources["requests"]["memory"])
    assert int(params["num-gpus"]) == gpus
    if gpus:
        assert quantity(resources["limits"]["nvidia.com/gpu"]) == quantity(resources["requests"]["nvidia.com/gpu"]) == gpus
    else:
        assert "nvidia.com/gpu" not in json.dumps(resources)
    expected = {"big": (4, 4, 0), "scratch-gpu-3x2": (3, 4, 2), "gpu": (2, 2, 1), "cpu": (2, 2, 0)}
    if name in expected:  # the overlay's own numbers, not the base's (the wiring runs last)
        assert (workers, cpus, gpus) == expected[name]


def test_every_overlay_ends_with_the_wiring():
    """Without it, an overlay's settings change the ConfigMap but not the RayJob."""
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        wiring = "../../wiring/elastic" if "-" in settings_of(overlay).get("MNIST_WORKERS", "") else "../../wiring"
        assert kustomization["transformers"][-1] == wiring, overlay
    assert yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["transformers"] == ["../wiring"]


def test_gpus_on_workers_only_and_the_gpu_image_on_workers_only(rendered):
    name, by_kind, _docs = rendered
    rayjob = by_kind["RayJob"]
    all_pods = pods(rayjob)
    gpu = int(settings(by_kind)["MNIST_GPUS_PER_WORKER"]) > 0
    for role in ("head", "submitter"):
        (container,) = all_pods.pop(role)["containers"]
        assert "gpu" not in json.dumps(container["resources"]) and container["image"] == CPU_IMAGE, role
    for pod in all_pods.values():
        (container,) = pod["containers"]
        if gpu:
            assert container["image"] == GPU_IMAGE
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert quantity(container["resources"]["limits"]["memory"]) >= 8 * 2**30  # TensorFlow on a GPU + raylet
        else:
            assert container["image"] == CPU_IMAGE and "tolerations" not in pod
    assert gpu == (name in ("gpu", "gpu-spot", "scratch-gpu-3x2", "gpu-spot-gke", "readme-gpu-gke", *GPU_COMPONENTS))


def test_images_are_pinned_by_digest_and_pods_ask_for_the_images_architecture(rendered):
    name, by_kind, _docs = rendered
    for role, pod in pods(by_kind["RayJob"]).items():
        (container,) = pod["containers"]
        assert re.fullmatch(r"[\w./-]+@sha256:[0-9a-f]{64}", container["image"]), (role, container["image"])
        assert pod["nodeSelector"]["kubernetes.io/arch"] == "amd64", role  # what the README's build makes
    # GPU placement per cloud: on the workers only, next to the architecture.
    component = next((c for c in GPU_COMPONENTS if name.endswith(c.removeprefix("gpu")) and "gpu" in name), None)
    workers = pods(by_kind["RayJob"])["workers"]
    expected = {"kubernetes.io/arch": "amd64", **(GPU_COMPONENTS[component] if component else {})}
    assert workers["nodeSelector"] == expected
    assert ({"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in workers.get("tolerations", [])) \
        == (component == "gpu-aks")
    readme = (K8S / "README.md").read_text()
    assert "--platform linux/amd64" in readme and "imagetools create" in readme  # one arch, and both


def test_head_ports_are_the_ones_ray_listens_on(rendered):
    """The operator builds the head Service from these named ports; `ray start` listens on its flags'."""
    _name, by_kind, _docs = rendered
    head = by_kind["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    params = head["rayStartParams"]
    assert ports == {"gcs": int(params.get("port", GCS_PORT)), "dashboard": int(params.get("dashboard-port", DASHBOARD_PORT)),
                     "client": int(params.get("ray-client-server-port", 10001))}


def test_lifecycle_deadlines_retries_and_deletion(rendered):
    name, by_kind, _docs = rendered
    rayjob = by_kind["RayJob"]
    spec = rayjob["spec"]
    assert spec["backoffLimit"] >= 1  # a new cluster resumes the run from its checkpoints
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the submitter pod below is used
    # Token authentication is on in every overlay: whoever reaches port 8265 could run code otherwise.
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert tuple(map(int, spec["rayClusterSpec"]["rayVersion"].split("."))) >= (2, 52)  # the operator's minimum
    assert ("kueue.x-k8s.io/queue-name" in rayjob["metadata"]["labels"]) == (name in KUEUE)
    if name in KUEUE:  # Kueue admits only shutdownAfterJobFinishes: true, which excludes deletionRules
        assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 0
        assert "deletionStrategy" not in spec
        return
    # KubeRay refuses deletionRules together with shutdownAfterJobFinishes (and so with its TTL).
    assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished")
    rules = {(r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"], r["policy"]): r["condition"]["ttlSeconds"]
             for r in spec["deletionStrategy"]["deletionRules"]}
    assert rules[("SUCCEEDED", "DeleteCluster")] == 0  # nothing held once the results are on the volume
    for failed in ("FAILED", "Failed"):  # workers (GPUs) go at once, the head stays for debugging
        assert rules[(failed, "DeleteWorkers")] == 0 < rules[(failed, "DeleteCluster")]
    assert all(policy != "DeleteSelf" for _status, policy in rules)  # the RayJob and its logs stay


def commands_of(script: str, config: dict[str, str], tmp_path, *args: str) -> list[list[str]]:
    """The `python` command lines a jobs/ script runs with the ConfigMap as its environment (a
    stand-in `python` prints each)."""
    (tmp_path / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\necho ---\n')
    (tmp_path / "python").chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "jobs" / script), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", **config})
    assert proc.returncode == 0, proc.stderr
    return [command.strip("\n").splitlines() for command in proc.stdout.split("---\n")[:-1]]


def test_the_entrypoint_runs_the_jobs_script_with_every_setting_as_a_real_flag(rendered, tmp_path):
    """jobs/pipeline.sh (jobs/tune.sh for a sweep) with the ConfigMap as its environment: the
    `mnist-dist` commands it builds parse, and carry each setting."""
    from mnist_dist.cli import build_parser

    _name, by_kind, _docs = rendered
    config = settings(by_kind)
    sweep = "MNIST_TUNE_SPACE" in config
    entrypoint = by_kind["RayJob"]["spec"]["entrypoint"].split()
    # jobs/ is copied to /app/jobs in the image
    assert entrypoint == ["bash", f"{IMAGE_WORKDIR}/jobs/{'tune.sh' if sweep else 'pipeline.sh'}"]
    commands = commands_of(entrypoint[1].rsplit("/", 1)[1], config, tmp_path)
    assert [argv[:3] for argv in commands] == [["-m", "mnist_dist.cli", c] for c in (["tune", "pipeline"] if sweep else ["pipeline"])]
    args = build_parser().parse_args(commands[0][2:])
    assert (args.epochs, args.cpus_per_worker, args.gpus_per_worker, args.max_failures) == tuple(
        int(config[k]) for k in ("MNIST_EPOCHS", "MNIST_CPUS_PER_WORKER", "MNIST_GPUS_PER_WORKER", "MNIST_MAX_FAILURES"))
    # N, or an elastic range MIN-MAX; a sweep's trials have their own, and the cluster MNIST_WORKERS pods
    assert args.workers == (config["MNIST_TRIAL_WORKERS"] if sweep else config["MNIST_WORKERS"])
    assert (args.storage, args.name, args.preset) == (config["MNIST_STORAGE"], config["MNIST_RUN_NAME"], config["MNIST_PRESET"])
    extra = {"MNIST_EXTRA_ARGS": "--train-limit 1024  --augment"}
    if not sweep:  # `ray job submit -- bash jobs/pipeline.sh --epochs 3`: arguments win over settings
        args = build_parser().parse_args(commands_of("pipeline.sh", {**config, **extra}, tmp_path, "--epochs", "3")[0][2:])
        assert (args.train_limit, args.augment, args.epochs) == (1024, True, 3)
    else:  # the settings alone, so that the sweep and its export name the same folder
        args = build_parser().parse_args(commands_of("tune.sh", {**config, **extra}, tmp_path)[0][2:])
        assert (args.train_limit, args.augment) == (1024, True)
        # then the best trial's export, with the export's own flags
        assert args.space == config["MNIST_TUNE_SPACE"].split()
        export = build_parser().parse_args(commands_of("tune.sh", {**config, "MNIST_EXPORT_ARGS": "--max-int8-drop 0.2"},
                                                       tmp_path)[1][2:])
        assert (export.from_tune, export.storage, export.max_int8_drop) == (config["MNIST_RUN_NAME"], config["MNIST_STORAGE"], 0.2)
        refused = subprocess.run(["bash", str(ROOT / "jobs" / "tune.sh"), "--epochs", "3"], capture_output=True, text=True,
                                 timeout=30, env={"PATH": f"{tmp_path}:/usr/bin:/bin", **config})
        assert refused.returncode == 2 and refused.stderr.startswith("error: jobs/tune.sh takes no arguments")


def test_storage_is_the_mounted_volume_or_the_object_store(rendered):
    name, by_kind, docs = rendered
    config = settings(by_kind)
    if "://" in config["MNIST_STORAGE"]:  # no PVC, no volume path left anywhere
        assert "/mnt/runs" not in json.dumps(docs) and "persistentVolumeClaim" not in json.dumps(docs)
        return
    storage = config["MNIST_STORAGE"]
    claim = storage_claim()
    for role, spec in pods(by_kind["RayJob"]).items():
        (container,) = spec["containers"]
        if role == "submitter":  # runs only `ray job submit`: no volume but its /tmp, no settings
            assert all("emptyDir" in v for v in spec["volumes"]) and "envFrom" not in container
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert storage in mounts, f"{role} does not mount {storage}"
        assert volumes[mounts[storage]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert {"configMapRef": {"name": by_kind["ConfigMap"]["metadata"]["name"]}} in container["envFrom"]


def test_no_secrets_in_the_manifests(rendered):
    _name, by_kind, _docs = rendered
    assert "Secret" not in by_kind
    # A setting may name where a secret is (a *_FILE path), never hold one.
    assert not [k for k in settings(by_kind) if re.search(r"(?i)password|secret|token|credential|_key", k)
                and not k.endswith("_FILE")]
    for pod in pods(by_kind["RayJob"]).values():
        for container in pod["containers"]:
            assert "env" not in container  # settings arrive through the ConfigMap; secrets as files only
            assert all(set(source) == {"configMapRef"} for source in container.get("envFrom", []))


def test_object_store_keys_are_an_optional_read_only_file_and_identities_are_per_cloud(rendered):
    """Static keys: the Secret mnist-s3-credentials, optional, mounted read-only on the head and
    workers where AWS_SHARED_CREDENTIALS_FILE points. Without it the pods start and use the
    cloud's identity: IRSA, GKE or AKS Workload Identity, each from its component."""
    name, by_kind, docs = rendered
    config, rayjob = settings(by_kind), by_kind["RayJob"]
    if "://" not in config["MNIST_STORAGE"]:
        assert "mnist-s3-credentials" not in json.dumps(docs) and "AWS_SHARED_CREDENTIALS_FILE" not in config
        return
    for role, spec in pods(rayjob).items():
        (container,) = spec["containers"]
        secrets = [v for v in spec["volumes"] if "secret" in v]
        if role == "submitter":
            assert not secrets
            continue
        assert secrets == [{"name": "s3-credentials", "secret": {"secretName": "mnist-s3-credentials", "optional": True,
                                                                 "defaultMode": 0o440}}], role
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "s3-credentials"]
        assert mount["readOnly"] is True
        assert Path(config["AWS_SHARED_CREDENTIALS_FILE"]).parent == Path(mount["mountPath"])
    account = by_kind["ServiceAccount"].get("metadata", {}).get("annotations", {})
    labels = {role: (rayjob["spec"]["submitterPodTemplate"] if role == "submitter" else g["template"])["metadata"]["labels"]
              for role, g in [*((r, g) for r, (_t, g) in groups(rayjob).items()), ("submitter", None)]}
    scheme = config["MNIST_STORAGE"].split("://")[0]
    if name == "s3-irsa":
        assert scheme == "s3" and account["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    elif name == "gcs-workload-identity":
        assert scheme == "gs"
        egress = [r for d in docs if d["kind"] == "NetworkPolicy" for r in d["spec"].get("egress", [])]
        blocks = {(q["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in egress for q in r.get("to", []) if "ipBlock" in q}
        assert blocks == {("169.254.169.254/32", 80), ("169.254.169.252/32", 988)}
    elif name == "abfs-workload-identity":
        assert scheme == "abfs" and "azure.workload.identity/client-id" in account
        assert labels["head"]["azure.workload.identity/use"] == labels["workers"]["azure.workload.identity/use"] == "true"
        assert "azure.workload.identity/use" not in labels["submitter"]
    else:
        assert not account


def test_the_readme_pins_the_schemas_operator_and_its_commands_match_the_manifests():
    readme = (K8S / "README.md").read_text()
    assert f"--version {OPERATOR}" in readme and f"KubeRay operator {MIN_OPERATOR}" in readme
    assert "1.4.2" not in readme
    crd = json.loads((SCHEMAS / "RayJob.v1.schema.json").read_text())["properties"]["spec"]["properties"]
    assert {"preRunningDeadlineSeconds", "deletionStrategy", "submitterPodTemplate"} <= set(crd)  # >= 1.6.0
    for overlay in re.findall(r"k8s/overlays/([a-z0-9-]+)", readme):
        assert overlay in OVERLAYS + README_OVERLAYS + ["mine"], overlay  # "big" is rendered from the README itself
    for component in re.findall(r"components/([a-z0-9-]+)", readme):
        assert (K8S / "components" / component / "kustomization.yaml").is_file(), component
    name = rayjob_of(render(K8S / "overlays" / "cpu"))["metadata"]["name"]
    assert f"svc/{name}-head-svc" in readme  # the operator names a RayJob's head Service <rayjob>-head-svc
    # The pod that fetches the model: non-root, pinned, restricted, the volume read-only.
    overrides = json.loads(re.search(r"--overrides='(\{.*?\})'", readme, re.S).group(1))
    spec = overrides["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert spec["volumes"][0]["persistentVolumeClaim"] == {"claimName": "mnist-runs", "readOnly": True}
    assert "busybox" not in readme


def test_the_dockerfile_writes_as_its_user_and_checks_its_install():
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    steps = [line.split()[0] + " " + line.split()[1] for line in dockerfile.splitlines()
             if line and not line.startswith(("#", " ")) and len(line.split()) > 1]
    # /app exists and belongs to the image's user before anything is copied or built there.
    assert steps.index("USER root") < steps.index("WORKDIR /app") < steps.index("RUN chown") < steps.index("USER 1000:100")
    assert steps.index("USER 1000:100") < steps.index("COPY --chown=1000:100")
    assert "chown 1000:100 /app" in dockerfile and "python -m pip check" in dockerfile
    assert "COPY --chown=1000:100 jobs ./jobs" in dockerfile
    assert "imagetools inspect" in dockerfile and "@sha256:" in dockerfile  # how to pin the base by digest
    for key, value in IMAGE_ENV.items():  # what tests/helpers/kuberay_local.py gives every pod
        assert f"ENV {key}={value}" in dockerfile
    # MNIST is downloaded and verified by SHA-256 at build time, where the image's MNIST_DATA_DIR points.
    assert f"RUN MNIST_DIST_CACHE={Path(IMAGE_MNIST).parent} mnist-dist data download" in dockerfile
    assert steps.index("RUN MNIST_DIST_CACHE=/app/data") < steps.index(f"ENV MNIST_DATA_DIR={IMAGE_MNIST}")
    ray = rayjob_of(render(K8S / "overlays" / "cpu"))["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"rayproject/ray:{ray}-py311-cpu" in dockerfile and f'"ray[default,train]>={ray[:4]}' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_the_dockerfiles_install_step_works_in_a_fresh_venv(tmp_path):
    """No Docker engine here: run the image's install step itself, in a fresh venv, on a copy of
    what the Dockerfile copies, with the edge extra's lock. (The train lock's files are those CI
    installs from the dev lock: tests/test_hashlock.py.)"""
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    assert re.search(r"^ARG EXTRAS=train$", dockerfile, re.M) and "rayproject/ray:2.60.0-py311" in dockerfile
    app = tmp_path / "app"
    app.mkdir()
    for item in re.findall(r"^COPY --chown=1000:100 (.+) \S+$", dockerfile, re.M):
        for name in item.split():
            source = ROOT / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, app / name)
    (step,) = re.findall(r"^RUN (python -m pip install (?:.*\\\n)*.*)$", dockerfile, re.M)
    assert "--require-hashes -r \"scripts/lock/${EXTRAS}-$(uname -m).txt\"" in step and "--no-deps ." in step
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "EXTRAS": "edge"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-c", step], cwd=app, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    py = env_dir / "bin" / "python"
    for script in ("mnist-edge", "mnist-dist"):
        proc = subprocess.run([env_dir / "bin" / script, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([py, "-c", "import mnist_edge.runtime, mnist_dist.data; import importlib.util as u; "
                                     "print(u.find_spec('tensorflow') is None)"], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr  # an edge install does not pull TensorFlow


@pytest.mark.slow
def test_the_images_mnist_step_verifies_what_it_has_and_fails_the_build_on_a_bad_file(tmp_path, mnist_dir):
    """The Dockerfile's `MNIST_DIST_CACHE=/app/data mnist-dist data download`: here the files
    are already in the cache (no internet), so it only verifies them; a corrupt file must fail
    the step, and so the build, in one line."""
    cache = tmp_path / "data" / "mnist"
    shutil.copytree(mnist_dir, cache)
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DATA_DIR"} | {"MNIST_DIST_CACHE": str(tmp_path / "data")}
    step = [sys.executable, "-m", "mnist_dist.cli", "data", "download"]
    proc = subprocess.run(step, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "all 4 files present, checksums match" in proc.stdout, proc.stdout + proc.stderr
    (bad,) = [f for f in cache.iterdir() if f.name.startswith("t10k-labels")]
    data = bytearray(gzip.decompress(bad.read_bytes()) if bad.suffix == ".gz" else bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(gzip.compress(bytes(data)) if bad.suffix == ".gz" else bytes(data))
    proc = subprocess.run(step, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "t10k-labels" in proc.stderr, proc.stderr


def test_the_spot_overlay_puts_an_elastic_group_on_every_clouds_spot_nodes_and_drains_before_it_stops():
    by_kind = {doc["kind"]: doc for doc in render(K8S / "overlays" / "gpu-spot")}
    spec = by_kind["RayJob"]["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    labels = {(t["matchExpressions"][0]["key"], t["matchExpressions"][0]["values"][0]) for t in terms}
    assert labels == {("eks.amazonaws.com/capacityType", "SPOT"), ("karpenter.sh/capacity-type", "spot"),
                      ("cloud.google.com/gke-spot", "true"), ("kubernetes.azure.com/scalesetpriority", "spot")}
    tolerated = {(t["key"], t.get("value")) for t in pod["tolerations"]}
    assert {("cloud.google.com/gke-spot", "true"), ("kubernetes.azure.com/scalesetpriority", "spot")} <= tolerated
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["bash", "/app/scripts/spot-drain.sh"]
    notice = int(settings(by_kind)["MNIST_SPOT_NOTICE_SECONDS"])
    assert notice + 5 <= pod["terminationGracePeriodSeconds"]  # the hook's drain and wait fit in the grace period
    assert spec["enableInTreeAutoscaling"] is True and group["minReplicas"] < group["maxReplicas"]
    assert "COPY --chown=1000:100 scripts ./scripts" in (K8S / "image" / "Dockerfile").read_text()


# ---- The scanner: checkov on every overlay's rendered objects ----

CHECKOV_VERSION = "3.3.30"


@pytest.fixture(scope="session")
def checkov() -> list[str]:
    """The command of checkov, in a virtual environment of its own (its pins of packaging,
    boto3 and networkx clash with Ray's), made once and kept in the user's cache. A partial
    environment is never taken for a made one: it is built beside, then renamed into place.
    CHECKOV=/path/to/checkov runs another."""
    if os.environ.get("CHECKOV"):
        return [os.environ["CHECKOV"]]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-dist" / f"checkov-{CHECKOV_VERSION}"
    if not (home / "ready").exists():
        partial = home.with_name(f"{home.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        venv.create(partial, with_pip=True)
        proc = subprocess.run([partial / "bin" / "python", "-m", "pip", "install", "-q", f"checkov=={CHECKOV_VERSION}"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (partial / "ready").write_text(CHECKOV_VERSION)
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)  # the console script's shebang names the old path: run it as a module
    return [str(home / "bin" / "python"), "-m", "checkov.main"]


def scanned_objects(overlay: str, docs: list[dict]) -> list[tuple[str, str, dict]]:
    """(object, role or kind, manifest) for checkov: each RayJob pod template as the Pod the
    operator makes of it (checkov knows no RayJob), every other object as it is."""
    found = []
    for doc in docs:
        if doc["kind"] != "RayJob":
            found.append((f"{overlay}-{doc['kind']}-{doc['metadata']['name']}", doc["kind"], json.loads(json.dumps(doc))))
            continue
        templates = {role: group["template"] for role, (_t, group) in groups(doc).items()}
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
        for role, template in templates.items():
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{overlay}-{role}", "labels": template["metadata"]["labels"]},
                   "spec": json.loads(json.dumps(template["spec"]))}
            found.append((f"{overlay}-{role}", role, pod))
    return found


@pytest.mark.slow
def test_checkov_finds_nothing_but_the_listed_exceptions_in_any_overlay(tmp_path, scratch_k8s, checkov):
    exceptions = yaml.safe_load((K8S / "checkov-exceptions.yaml").read_text())
    rendered_sets = {name: render((K8S if name in OVERLAYS else scratch_k8s) / "overlays" / name)
                     for name in OVERLAYS + list(SCRATCH) + README_OVERLAYS}
    rendered_sets.update({f"storage-{cloud}": render(K8S / "storage" / cloud) for cloud in STORAGE_CLASSES})
    scan = tmp_path / "scan"
    waived: dict[str, set[str]] = {check: set() for check in exceptions}
    for overlay, docs in rendered_sets.items():
        for name, role, manifest in scanned_objects(overlay, docs):
            notes = {f"checkov.io/skip{i}": f"{check}={' '.join(entry['reason'].replace('=', ' ').split())[:200]}"
                     for i, (check, entry) in enumerate(exceptions.items(), 1) if role in entry["objects"]}
            manifest["metadata"].setdefault("annotations", {}).update(notes)
            for check, entry in exceptions.items():
                if role in entry["objects"]:
                    waived[check].add(name)
            (scan / overlay).mkdir(parents=True, exist_ok=True)
            (scan / overlay / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = subprocess.run([*checkov, "-d", str(scan), "--framework", "kubernetes", "-o", "json", "--compact"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,  # no stray .checkov.yaml
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})  # offline: no download of Prisma's mappings
    assert proc.returncode in (0, 1) and proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    results = report["results"]
    failed = sorted(f"{c['check_id']} {c['file_path']}: {c['check_name']}" for c in results.get("failed_checks", []))
    assert not failed, "checkov failed these (fix them, or list them in k8s/checkov-exceptions.yaml with the reason):\n" \
        + "\n".join(failed)
    skipped: dict[str, set[str]] = {}
    for c in results.get("skipped_checks", []):
        skipped.setdefault(c["check_id"], set()).add(Path(c["file_path"]).stem)
    for check, entry in exceptions.items():
        assert entry["check"] in {c["check_name"] for c in results["skipped_checks"] if c["check_id"] == check}, check
        assert skipped.get(check) == waived[check], f"{check} is waived where it would not fail: k8s/checkov-exceptions.yaml"
    print(f"checkov {CHECKOV_VERSION}: {report['summary']['passed']} passed, {report['summary']['failed']} failed, "
          f"{report['summary']['skipped']} waived, on {report['summary']['resource_count']} objects")


def readme_lines(start: str, end: str) -> str:
    """The README's shell lines from the one that starts with `start` to the one that ends with `end`."""
    lines = (K8S / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i in range(first, len(lines)) if lines[i].rstrip().endswith(end))
    return "\n".join(lines[first:last + 1])


def test_the_readmes_own_overlay_pins_the_pushed_image_and_its_efs_class_is_valid(tmp_path):
    """The walkthrough's commands, run as written (but for `kubectl apply`): the overlay they
    write renders every pod with IMAGE@DIGEST, and EKS's StorageClass is a valid object."""
    shutil.copytree(K8S, tmp_path / "k8s")
    image, digest = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mnist-dist", "sha256:" + "ab" * 32
    env = {**os.environ, "IMAGE": image, "DIGEST": digest, "FS_ID": "fs-0123456789abcdef0"}
    script = readme_lines("mkdir -p k8s/overlays/mine", "> k8s/overlays/mine/kustomization.yaml")
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, check=True, timeout=30)
    rayjob = rayjob_of(render(tmp_path / "k8s" / "overlays" / "mine"))
    assert {c["image"] for pod in pods(rayjob).values() for c in pod["containers"]} == {f"{image}@{digest}"}
    # On overlays/gpu, the GPU image is pinned by its own name: each pod keeps its kind of image.
    gpu = tmp_path / "k8s" / "overlays" / "mine-gpu"
    gpu.mkdir()
    overlay = yaml.safe_load((tmp_path / "k8s" / "overlays" / "mine" / "kustomization.yaml").read_text())
    overlay["resources"] = ["../gpu"]
    overlay["images"].append({"name": "registry.example.com/mnist-dist-gpu", "newName": image + "-gpu", "digest": digest})
    (gpu / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    images = {role: pod["containers"][0]["image"] for role, pod in pods(rayjob_of(render(gpu))).items()}
    assert images == {"head": f"{image}@{digest}", "submitter": f"{image}@{digest}", "workers": f"{image}-gpu@{digest}"}
    storage_class = readme_lines("printf '%s\\n' 'apiVersion: storage.k8s.io/v1'", "| kubectl apply -f -")
    out = subprocess.run(["bash", "-euc", storage_class.replace("| kubectl apply -f -", "")], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    made = yaml.safe_load(out)
    kubernetes_validate.validate(made, kubernetes_validate.latest_version(), strict=True)
    assert made["metadata"]["name"] == STORAGE_CLASSES["eks"] and made["parameters"]["fileSystemId"] == env["FS_ID"]
