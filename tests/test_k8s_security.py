"""Ray's control plane on Kubernetes: token auth, the NetworkPolicies, and which pod holds which secret.

Offline, on the manifests rendered by test_k8s_manifests.py's kustomize
renderer (and by `kubectl kustomize` itself where kubectl is installed):

- every Ray cluster (RayService, RayJob) asks KubeRay for token auth;
- a small evaluator of NetworkPolicy semantics (the subset the policies use:
  matchLabels pod/namespace selectors, TCP ports) answers "may this source
  reach this port of this pod?" for outsiders, the monitoring namespace, the
  KubeRay operator and the cluster's own pods, and every pod template carries
  the label its policy selects;
- secrets per pod: a pod gets the storage keys (every pod can host the build
  task or a loop actor) and, only if RouterIngress can be placed on it (by its
  CPUs and its Serve ``label_selector`` against the group's Ray node labels),
  the token secret, the API keys and the upstream keys -- no more, no less.
"""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import yaml
from test_k8s_manifests import (
    cluster_spec,
    manifest_problems,
    parse_quantity,
    ray_container,
    ray_objects,
    render_kustomization,
    rendered_targets,
    rel,
    rendered_service,
    serve_app,
)

SERVICE_TARGETS = ["k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha"]
CLUSTER_LABEL = "banditroute.io/ray-cluster"
POOL_LABEL = "banditroute.io/pool"
SERVE_PORT, METRICS_PORT, GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 8000, 8080, 6379, 8265, 10001
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {rel(directory): render_kustomization(directory) for directory in rendered_targets()}


# ---------------------------------------------------------------------------
# NetworkPolicy semantics (the subset used under k8s/)
# ---------------------------------------------------------------------------


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator supports matchLabels only: {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, policy_namespace: str, source: dict) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"evaluator does not support {peer}"
    if source.get("namespace") is None:  # outside the Kubernetes cluster: only ipBlock peers could match
        return False
    if "namespaceSelector" in peer:
        namespace_ok = _matches(peer["namespaceSelector"], source["namespace_labels"])
    else:
        namespace_ok = source["namespace"] == policy_namespace
    return namespace_ok and _matches(peer.get("podSelector", {}), source["pod_labels"])


def admitted(policies: list[dict], namespace: str, pod_labels: dict, source: dict, port: int) -> bool:
    """Whether a TCP connection from ``source`` to ``port`` of a pod (``namespace``, ``pod_labels``) is admitted."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _matches(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_admits(peer, namespace, source) for peer in peers):
                return True
    return False


def source(namespace: str | None, pod_labels: dict | None = None, namespace_labels: dict | None = None) -> dict:
    if namespace is None:
        return {"namespace": None}
    return {"namespace": namespace, "pod_labels": pod_labels or {},
            "namespace_labels": {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}}


def policies_of(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == "NetworkPolicy"]


def pod_template_labels(obj: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(obj)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, group["template"].get("metadata", {}).get("labels", {})) for name, group in groups]


# ---------------------------------------------------------------------------
# Token auth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("directory", rendered_targets(), ids=rel)
def test_every_ray_cluster_uses_token_auth(rendered, directory):
    objects = ray_objects(rendered[rel(directory)])
    assert objects
    for obj in objects:
        assert cluster_spec(obj).get("authOptions") == {"mode": "token"}, f"{obj['kind']}: authOptions.mode token"
        for name, _ in pod_template_labels(obj):
            group = cluster_spec(obj)["headGroupSpec"] if name == "head" else next(
                g for g in cluster_spec(obj)["workerGroupSpecs"] if g["groupName"] == name)
            env = {e["name"]: e.get("value") for e in ray_container(group["template"]["spec"]).get("env", [])}
            # KubeRay sets these itself from authOptions; a pod-level value would fight it.
            assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env, name


def test_auth_options_are_checked_against_the_crd(rendered):
    from test_k8s_manifests import load_crd_schemas, CRD_DIR

    schemas = load_crd_schemas(CRD_DIR)
    service = copy.deepcopy(rendered_service(rendered, "k8s/overlays/prod"))
    service["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "tokens"}
    assert any("authOptions.mode" in p for p in manifest_problems(schemas, service))
    job = copy.deepcopy(ray_objects(rendered["k8s/jobs/retrain"])[0])
    job["spec"]["rayClusterSpec"]["authOption"] = job["spec"]["rayClusterSpec"].pop("authOptions")
    assert any("authOption:" in p or "authOption " in p for p in manifest_problems(schemas, job))


# ---------------------------------------------------------------------------
# NetworkPolicy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", SERVICE_TARGETS)
def test_only_serve_is_open_to_outsiders(rendered, target):
    objects = rendered[target]
    policies = policies_of(objects)
    service = rendered_service(rendered, target)
    namespace = service["metadata"]["namespace"]
    cluster_pod = {CLUSTER_LABEL: "router"}
    ray_ports = [GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, 52365, 45123]  # + dashboard agent, a worker port

    outsiders = [source(None), source("default"), source(namespace),  # no label, same namespace
                 source("default", cluster_pod)]  # the right label in another namespace does not count
    for who in outsiders:
        assert admitted(policies, namespace, cluster_pod, who, SERVE_PORT), who
        for port in ray_ports + [METRICS_PORT]:
            assert not admitted(policies, namespace, cluster_pod, who, port), (who, port)

    monitoring = source("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert admitted(policies, namespace, cluster_pod, monitoring, METRICS_PORT)
    assert not any(admitted(policies, namespace, cluster_pod, monitoring, port) for port in ray_ports)

    operator = source("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
    assert admitted(policies, namespace, cluster_pod, operator, DASHBOARD_PORT)
    assert not any(admitted(policies, namespace, cluster_pod, operator, port) for port in (GCS_PORT, CLIENT_PORT))

    peer = source(namespace, cluster_pod)
    assert all(admitted(policies, namespace, cluster_pod, peer, port) for port in ray_ports + [SERVE_PORT])


@pytest.mark.parametrize("target", SERVICE_TARGETS + ["k8s/jobs/retrain"])
def test_every_pod_is_selected_by_its_policy(rendered, target):
    """A pod template without the label would be reachable on every port."""
    objects = rendered[target]
    policies = policies_of(objects)
    assert policies, f"{target}: no NetworkPolicy"
    for obj in ray_objects(objects):
        namespace = obj["metadata"]["namespace"]
        for name, labels in pod_template_labels(obj):
            assert labels.get(CLUSTER_LABEL), f"{target} {name}: pod template has no {CLUSTER_LABEL} label"
            assert not admitted(policies, namespace, labels, source(None), GCS_PORT), f"{target} {name}"


def test_retrain_job_admits_only_its_submitter(rendered):
    objects = rendered["k8s/jobs/retrain"]
    policies = policies_of(objects)
    [job] = ray_objects(objects)
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    pod = {CLUSTER_LABEL: "retrain"}
    submitter = source(namespace, {"batch.kubernetes.io/job-name": name})
    assert admitted(policies, namespace, pod, submitter, DASHBOARD_PORT)
    assert not admitted(policies, namespace, pod, submitter, GCS_PORT)
    for port in (SERVE_PORT, DASHBOARD_PORT, GCS_PORT, CLIENT_PORT):
        assert not admitted(policies, namespace, pod, source(None), port)
        assert not admitted(policies, namespace, pod, source(namespace, {CLUSTER_LABEL: "router"}), port)
    assert admitted(policies, namespace, pod, source(namespace, pod), GCS_PORT)


def test_the_evaluator_catches_an_open_policy(rendered):
    """The negative control: a policy that admits everything on 6379 is flagged."""
    policies = copy.deepcopy(policies_of(rendered["k8s/overlays/prod"]))
    policies[0]["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": GCS_PORT}]})
    assert admitted(policies, "banditroute", {CLUSTER_LABEL: "router"}, source(None), GCS_PORT)
    assert admitted([], "banditroute", {CLUSTER_LABEL: "router"}, source(None), GCS_PORT)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", rendered_targets(), ids=rel)
def test_kubectl_kustomize_renders_the_same(rendered, directory):
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    by_kubectl = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered[rel(directory)]}
    assert set(by_kubectl) == set(ours)
    for key in ours:
        if key[0] in ("NetworkPolicy", "RayService", "RayJob"):
            assert by_kubectl[key] == ours[key], key


# ---------------------------------------------------------------------------
# Secrets per pod
# ---------------------------------------------------------------------------


def _cpus(group: dict, pod: dict) -> float:
    limits = ray_container(pod)["resources"]["limits"]
    return parse_quantity(group.get("rayStartParams", {}).get("num-cpus", limits["cpu"]))


def ingress_secrets(service: dict) -> set[str]:
    """The environment variables RouterIngress reads (args.router.security and the upstreams' api_key_env)."""
    router = serve_app(service)["args"].get("router", {})
    security = router.get("security", {})
    names = {value for key, value in security.items() if key.endswith("_env") and value}
    names |= {up["api_key_env"] for up in router.get("upstreams", {}).values() if up.get("api_key_env")}
    return names


def secret_problems(service: dict) -> list[str]:
    """Pods missing a secret their possible work needs, or holding one it does not."""
    ingress = next(d for d in serve_app(service)["deployments"] if d["name"] == "RouterIngress")
    options = ingress["ray_actor_options"]
    selector = options.get("label_selector", {})
    spec = cluster_spec(service)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    problems = []
    for name, group in groups:
        pod = group["template"]["spec"]
        env = {e["name"] for e in ray_container(pod).get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        labels = group.get("labels", {})
        hosts_ingress = (_cpus(group, pod) >= options["num_cpus"]
                         and all(labels.get(k) == v for k, v in selector.items()))
        # The build task and the parameter server take no CPU: any pod can run them, and they read storage.
        needed = set(S3_ENV) | (ingress_secrets(service) if hosts_ingress else set())
        if env - needed:
            problems.append(f"{name}: holds {sorted(env - needed)} that nothing placed there reads")
        if needed - env:
            problems.append(f"{name}: lacks {sorted(needed - env)}")
    return problems


@pytest.mark.parametrize("target", SERVICE_TARGETS)
def test_each_pod_gets_only_the_secrets_it_needs(rendered, target):
    service = rendered_service(rendered, target)
    assert ingress_secrets(service) >= {"BANDITROUTE_TOKEN_SECRET", "BANDITROUTE_ROUTE_KEYS"}
    assert secret_problems(service) == []


def test_no_api_key_on_the_head_or_the_gpu_pods(rendered):
    service = rendered_service(rendered, "k8s/overlays/prod")
    spec = cluster_spec(service)
    pods = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name in ("head", "gpu-workers"):
        env = {e["name"] for e in ray_container(pods[name]["template"]["spec"]).get("env", [])}
        assert not env & ingress_secrets(service), f"{name}: {sorted(env & ingress_secrets(service))}"
    apps = {d["name"]: d for d in serve_app(service)["deployments"]}
    assert apps["Router"]["ray_actor_options"]["label_selector"] == pods["gpu-workers"]["labels"]
    assert apps["RouterIngress"]["ray_actor_options"]["label_selector"] == pods["cpu-workers"]["labels"]


def test_secret_check_catches_a_misplaced_key(rendered):
    service = rendered_service(rendered, "k8s/overlays/prod")
    # Unpinning RouterIngress lets it land on the GPU pods, which hold no API key.
    unpinned = copy.deepcopy(service)
    config = yaml.safe_load(unpinned["spec"]["serveConfigV2"])
    next(d for d in config["applications"][0]["deployments"] if d["name"] == "RouterIngress")[
        "ray_actor_options"].pop("label_selector")
    unpinned["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert any(p.startswith("gpu-workers: lacks") for p in secret_problems(unpinned))
    # An API key mounted on the head, where no ingress runs.
    leaky = copy.deepcopy(service)
    ray_container(leaky["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"])["env"].append(
        {"name": "BANDITROUTE_ADMIN_KEYS",
         "valueFrom": {"secretKeyRef": {"name": "banditroute-auth", "key": "BANDITROUTE_ADMIN_KEYS"}}})
    assert any(p.startswith("head: holds ['BANDITROUTE_ADMIN_KEYS']") for p in secret_problems(leaky))


@pytest.mark.parametrize("target", SERVICE_TARGETS)
def test_node_labels_and_selectors_are_valid_ray_labels(rendered, target):
    from ray._private.label_utils import validate_label_selector, validate_node_labels

    service = rendered_service(rendered, target)
    pools = []
    for group in cluster_spec(service)["workerGroupSpecs"]:
        validate_node_labels(group.get("labels", {}))
        pools.append(group.get("labels", {}))
    for deployment in serve_app(service)["deployments"]:
        selector = deployment["ray_actor_options"].get("label_selector")
        if selector:
            assert validate_label_selector(selector) is None
            assert any(all(p.get(k) == v for k, v in selector.items()) for p in pools), (
                f"{deployment['name']}: label_selector {selector} matches no worker group")


def test_retrain_job_holds_storage_keys_only(rendered):
    [job] = ray_objects(rendered["k8s/jobs/retrain"])
    spec = cluster_spec(job)
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        env = {e["name"] for e in ray_container(group["template"]["spec"]).get("env", [])
               if "secretKeyRef" in e.get("valueFrom", {})}
        assert env == S3_ENV
