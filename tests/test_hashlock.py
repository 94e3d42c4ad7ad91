"""The hashed lock (scripts/lock/, made by scripts/lock.py): made from this pyproject.toml,
pinning what each extra asks for, with hashes, the smaller sets within dev, and this test
environment holding what the image ships."""
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402  (scripts/lock.py)

LOCKS = [(extra, machine) for machine in lock.MACHINES for extra in lock.EXTRAS]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")  # every pin, with or without hashes or a marker


def read_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """{name: (version, hashes)} of a `uv pip compile --generate-hashes` file."""
    pins, name = {}, None
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match[1])
            pins[name] = (match[2], frozenset())
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = pins[name]
            pins[name] = (version, hashes | {line.strip().split(":", 1)[1].rstrip(" \\")})
    return pins


def requirements_of(extra: str, machine: str) -> list[Requirement]:
    """What `pip install ".[extra]"` asks for on Linux `machine`, the project's own extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {**default_environment(), "python_version": lock.PYTHON, "python_full_version": f"{lock.PYTHON}.0",
           "platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    wanted, todo, seen = [], [*project["dependencies"], *project["optional-dependencies"][extra]], set()
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker and not requirement.marker.evaluate({**env, "extra": ""}):
            continue
        if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
            for sub in requirement.extras - seen:
                seen.add(sub)
                todo += project["optional-dependencies"][sub]
        else:
            wanted.append(requirement)
    return wanted


def test_every_lock_is_made_from_this_pyproject():
    """Change a dependency in pyproject.toml without `python scripts/lock.py`, and this fails."""
    expected = f"{lock.HEADER}{lock.dependency_hash()}"
    stale = [f"{extra}-{machine}" for extra, machine in LOCKS
             if lock.lock_path(extra, machine).read_text().splitlines()[0] != expected]
    assert not stale, f"scripts/lock/ is older than pyproject.toml's dependencies ({', '.join(stale)}). Fix: python scripts/lock.py"


@pytest.mark.parametrize("extra,machine", LOCKS)
def test_each_lock_pins_what_its_extra_asks_for_with_hashes(extra, machine):
    pins = read_lock(lock.lock_path(extra, machine))
    for requirement in requirements_of(extra, machine):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{extra}-{machine}: {requirement} is not locked"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{extra}-{machine}: {name}=={version} is outside {requirement}"
    assert all(hashes for _, hashes in pins.values())  # --require-hashes refuses a pin without one
    # bench-peer's tf-keras requires the `tensorflow` distribution: that is why it is a venv of its own.
    expected_tf = "tensorflow" if extra in ("train-gpu", "bench-peer") or machine == "aarch64" else "tensorflow-cpu"
    if extra not in ("edge", "mlflow", "mlflow-server"):
        assert expected_tf in pins and ({"tensorflow", "tensorflow-cpu"} - {expected_tf}).isdisjoint(pins)
    else:
        assert not {"tensorflow", "tensorflow-cpu", "ray", "keras"} & set(pins)  # the edge runtime stays light
    if extra in ("edge", "train", "train-gpu"):
        assert not {"mlflow", "mlflow-skinny"} & set(pins)  # MLflow is an optional extra


@pytest.mark.parametrize("machine", lock.MACHINES)
def test_the_smaller_locks_hold_devs_versions_and_files(machine):
    """CI installs dev; the image installs train: every package both hold is the same files.
    (Not mlflow-server, the tests' MLflow server: a venv of its own, with the pyarrow it asks for.)"""
    dev = read_lock(lock.lock_path("dev", machine))
    for extra in ("train", "train-gpu", "edge", "mlflow", "bench-peer"):
        for name, pin in read_lock(lock.lock_path(extra, machine)).items():
            assert name not in dev or dev[name] == pin, f"{extra}-{machine}: {name} differs from dev's"
    train = read_lock(lock.lock_path("train", machine))
    assert set(train) <= set(dev)


def test_this_environment_holds_the_versions_the_image_ships():
    """.ci/run installs from the lock, so the suite tests what the image has."""
    machine = platform.machine()
    if machine not in lock.MACHINES:
        pytest.skip(f"no lock for {machine}")
    wrong = []
    for name, (version, _) in read_lock(lock.lock_path("train", machine)).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, (f"this environment differs from scripts/lock/train-{machine}.txt: {', '.join(wrong)}. "
                       f"Fix: pip install --require-hashes -r scripts/lock/dev-{machine}.txt")
