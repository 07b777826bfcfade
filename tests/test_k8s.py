"""Kubernetes manifests (deploy/k8s) and the compose scale/GPU files: schema-valid, and consistent with the
service's settings, the image and the documented limits."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
#: Optional manifests, applied by hand (docs/deployment.md); the rest are in kustomization.yaml.
OPTIONAL = {"hpa-queue-depth.yaml", "ingress.yaml"}
#: The oldest Kubernetes the manifests are for (the preStop ``sleep`` action is on by default since 1.30).
MIN_KUBERNETES = "1.30.0"
GB, MIB = 1e9, 2**20


def _validator() -> str:
    found = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    assert Path(found).exists(), "kubernetes-validate not found: pip install -r requirements-test.txt"
    return found


def _validate(*paths: Path, version: str | None = None) -> subprocess.CompletedProcess:
    argv = [_validator(), "--strict", *(["-k", version] if version else []), *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """kind -> object, for the manifests in kustomization.yaml."""
    found = {}
    for name in _load("kustomization.yaml")["resources"]:
        obj = _load(name)
        found[obj["kind"]] = obj
    return found


@pytest.mark.parametrize("version", [None, MIN_KUBERNETES])
def test_every_manifest_is_schema_valid(version):
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "configmap.yaml"}
    done = _validate(*MANIFESTS, version=version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" passed for resource ") == len(MANIFESTS), done.stdout


def test_the_validator_rejects_a_misspelt_field(tmp_path):
    bad = tmp_path / "deployment.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
    done = _validate(bad)
    assert done.returncode != 0 and "readOnlyRootFileSystem" in done.stdout + done.stderr


def test_image_tags_follow_the_version():
    """Compose names the tag's version in .env only, the manifests in kustomization.yaml only."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dotenv = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines() if line[:1].isalpha())
    assert dotenv == {"CAPTIONER_VERSION": version}
    tags = set()
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        compose = yaml.safe_load((REPO / name).read_text())
        tags |= {svc["image"] for svc in compose["services"].values() if "image" in svc}
    assert tags == {
        "captioner:${CAPTIONER_VERSION:?set in .env}-cpu",
        "captioner:${CAPTIONER_VERSION:?set in .env}-cuda",
    }
    versions = r"\b\d+\.\d+\.\d+-(cpu|cuda)\b"  # no literal tag elsewhere
    for path in [REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml", *K8S.glob("*.yaml")]:
        if path.name != "kustomization.yaml":
            assert not re.search(versions, path.read_text()), path
    kustomization = _load("kustomization.yaml")
    assert [(i["name"], i["newTag"]) for i in kustomization["images"]] == [("captioner", f"{version}-cpu")]


def test_kustomization_lists_the_manifests():
    kustomization = _load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {p.name for p in MANIFESTS} - OPTIONAL


def test_deployment(objects):
    from service.config import ENV_VARS, GUNICORN_ENV_VARS, load_settings

    deploy, config = objects["Deployment"], objects["ConfigMap"]
    settings = config["data"]
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        spec["replicas"] == 2
        and spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    )
    # settings: every name is one the service reads, every value parses; all of them reach the container
    assert set(settings) <= set(ENV_VARS) | set(GUNICORN_ENV_VARS), (
        set(settings) - set(ENV_VARS) - set(GUNICORN_ENV_VARS)
    )
    app_settings = load_settings({k: v for k, v in settings.items() if k in ENV_VARS}, {})
    assert app_settings.model_path.name == "flickr8k-lite2"  # the model shipped in the image
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert settings["HOST"] == "0.0.0.0" and int(settings["PORT"]) == container["ports"][0]["containerPort"]
    assert settings["CAPTIONER_WORKERS"] == "1" and settings["CAPTIONER_LOG_FORMAT"] == "json"
    # probes: readiness /readyz, liveness /healthz, a startup probe that waits out the model load
    port = container["ports"][0]["name"]
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {
        "startupProbe": {"path": "/readyz", "port": port},
        "readinessProbe": {"path": "/readyz", "port": port},
        "livenessProbe": {"path": "/healthz", "port": port},
    }
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "the startup probe must cover the model load"
    # shutdown: in-flight requests finish (CAPTIONER_GRACEFUL_TIMEOUT) before the kubelet kills the pod
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > int(settings["CAPTIONER_GRACEFUL_TIMEOUT"]) + pause
    # non-root (the image's uid), read-only root filesystem, /tmp the only writable path
    uid = int(re.search(r"ARG APP_UID=(\d+)", (REPO / "Dockerfile").read_text()).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    sec = container["securityContext"]
    assert sec["readOnlyRootFilesystem"] is True and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["mountPath"] == "/tmp" and mount["name"] == volume["name"] and "emptyDir" in volume
    # resources: the documented memory bound (docs/deployment.md) fits; requests = limits
    res = container["resources"]
    assert res["requests"] == res["limits"]
    memory = _quantity(res["limits"]["memory"])
    slots, threads = int(settings["CAPTIONER_DECODE_SLOTS"]), int(settings["CAPTIONER_THREADS"])
    assert slots == int(res["limits"]["cpu"])
    bound = 1.46 * GB + slots * (40 * MIB + int(settings["CAPTIONER_DECODE_MEMORY_MB"]) * MIB) + threads * 20 * MIB
    assert bound <= memory < 1.25 * bound, (bound, memory)
    assert f"{bound / GB:.1f} GB" in (REPO / "docs" / "deployment.md").read_text()
    # overload is answered 503 by the app, not left waiting in gunicorn's backlog (docs/reliability.md)
    assert threads > int(settings["CAPTIONER_MAX_BATCH"]) + int(settings["CAPTIONER_QUEUE_SIZE"])
    assert int(settings["CAPTIONER_TORCH_THREADS"]) == int(res["limits"]["cpu"])
    assert container["image"] == "captioner"  # tagged in kustomization.yaml only


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def test_service_hpa_and_pdb_point_at_the_deployment(objects):
    deploy = objects["Deployment"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    service, pdb = objects["Service"], objects["PodDisruptionBudget"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert (
        service["spec"]["ports"][0]["targetPort"]
        == deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    )
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"], "a drain must be able to evict a pod"
    for hpa in (objects["HorizontalPodAutoscaler"], _load("hpa-queue-depth.yaml")):
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deploy["metadata"]["name"],
        }
        assert hpa["spec"]["minReplicas"] == deploy["spec"]["replicas"]
    assert objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # the queue-depth HPA scales on the gauge /metrics exports
    from service.metrics import Metrics

    metric = _load("hpa-queue-depth.yaml")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in Metrics().render().decode()


def test_the_front_limits_bodies_like_the_service(objects):
    upload_mb = int(objects["ConfigMap"]["data"]["CAPTIONER_MAX_UPLOAD_MB"])
    timeout = float(objects["ConfigMap"]["data"]["CAPTIONER_REQUEST_TIMEOUT_S"])
    ingress = _load("ingress.yaml")["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{upload_mb}m"
    assert float(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > timeout
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.search(rf"client_max_body_size {upload_mb}m;", nginx)
    assert float(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1)) > timeout


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` tag (Compose >= 2.24), read as its plain value."""


_ComposeLoader.add_constructor(
    "!reset", lambda loader, node: loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
)


def test_compose_scale_and_gpu_files():
    scale = yaml.load((REPO / "docker-compose.scale.yml").read_text(), Loader=_ComposeLoader)
    services = scale["services"]
    assert services["captioner"]["ports"] == [] and services["captioner"]["deploy"]["replicas"] > 1
    (mount,) = services["lb"]["volumes"]
    source = mount.split(":")[0]
    assert (REPO / source).is_file(), f"{source} is mounted but missing"
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["captioner"]
    assert gpu["environment"]["CAPTIONER_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    doc = (REPO / "docs" / "deployment.md").read_text()
    for name in re.findall(r"`((?:docker-compose[\w.]*\.yml)|(?:deploy/[\w./-]+))`", doc):
        if name == "docker-compose.override.yml":  # Compose's name for a user's own local overrides
            continue
        assert (REPO / name).exists(), f"docs/deployment.md refers to {name}, which does not exist"


@pytest.mark.parametrize("extra", ["docker-compose.gpu.yml"])
def test_compose_override_is_valid(extra):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install -y docker-compose; .ci/run installs it)")
    done = subprocess.run(
        [binary, "-f", "docker-compose.yml", "-f", extra, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
