"""Every manifest under k8s/ validated offline: against the KubeRay CRDs and Ray Serve's schema.

No cluster, no kubectl. The kustomize overlays are rendered here in Python
(resources, JSON6902 ``patches``, ``namespace``, ``images``: the subset the
overlays use; anything else in a kustomization.yaml fails the test so it
cannot go unchecked). Each rendered object is then checked three ways:

1. JSON Schema validation against the openAPIV3Schema of its CRD version
   (types, enums, required fields);
2. a strict walk that flags any key the schema does not declare, unless the
   schema node allows extra keys (``additionalProperties`` or
   ``x-kubernetes-preserve-unknown-fields``): the API server would silently
   prune such a key, so a misspelt field would be lost without an error;
3. for RayServices, the embedded ``serveConfigV2`` against
   ``ray.serve.schema.ServeDeploySchema``, plus the same strict walk over the
   pydantic models (pydantic ignores unknown keys there by default).

The CRDs come from $BANDITROUTE_KUBERAY_CRDS, default ../shared/kuberay
next to the repository root; built-in kinds (NetworkPolicy) are checked against
the schemas in tests/k8s_builtin_schemas.py. Auth, NetworkPolicy and secrets
per pod: tests/test_k8s_security.py.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import jsonpatch
import jsonschema
import pytest
import yaml
from k8s_builtin_schemas import BUILTIN_SCHEMAS

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
CRD_DIR = Path(os.environ.get("BANDITROUTE_KUBERAY_CRDS", REPO_ROOT.parent / "shared" / "kuberay"))

if not CRD_DIR.is_dir():
    pytest.skip(
        f"KubeRay CRDs not found at {CRD_DIR} (set BANDITROUTE_KUBERAY_CRDS to the folder "
        "holding ray.io_rayservices.yaml etc.)",
        allow_module_level=True,
    )

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "namespace"}
SUPPORTED_PATCH_TARGET_KEYS = {"group", "version", "kind", "name"}
APP_NAME = "banditroute"
IMPORT_PATH = "banditroute.cluster.app:build_app"
DEPLOYMENTS = {"RouterIngress", "Router"}
SECRET_LIKE_ENV = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)
RAY_KINDS = {"RayService", "RayJob", "RayCluster"}

# Importing ray.serve emits pydantic deprecation warnings from Ray's own code.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ---------------------------------------------------------------------------
# Loading: CRD schemas and kustomize rendering
# ---------------------------------------------------------------------------


def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of every CRD file."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=Loader)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _target_matches(target: dict, obj: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(target[key] == wanted[key] for key in target)


def _set_images(node: Any, images: list[dict]) -> None:
    """kustomize's images transformer: rewrite matching images in any containers list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    image = container.get("image", "")
                    name, _, tag = image.partition(":")
                    for rule in images:
                        if rule["name"] == name:
                            new_tag = rule.get("newTag", tag)
                            new_name = rule.get("newName", name)
                            container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render_kustomization(directory: Path, used_files: set[Path] | None = None) -> list[dict]:
    """Render a kustomization directory the way ``kubectl kustomize`` does, for our subset."""
    kustomization_path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(kustomization_path.read_text())
    if used_files is not None:
        used_files.add(kustomization_path)
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZATION_KEYS
    assert not unsupported, (
        f"{kustomization_path}: keys {sorted(unsupported)} are not rendered by this test; "
        "extend render_kustomization() or express them as JSON6902 patches"
    )

    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render_kustomization(path, used_files))
        else:
            objects.extend(load_yaml_documents(path))
            if used_files is not None:
                used_files.add(path)

    # Order as in kustomize's builtin transformers: patches, namespace, images.
    for number, patch in enumerate(kustomization.get("patches", [])):
        where = f"{kustomization_path}: patches[{number}]"
        if "path" in patch:
            patch_path = (directory / patch["path"]).resolve()
            ops = yaml.safe_load(patch_path.read_text())
            if used_files is not None:
                used_files.add(patch_path)
        else:
            ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), f"{where}: only JSON6902 operation lists are rendered by this test"
        target = patch.get("target") or {}
        assert target and set(target) <= SUPPORTED_PATCH_TARGET_KEYS, (
            f"{where}: target must use only {sorted(SUPPORTED_PATCH_TARGET_KEYS)}"
        )
        matched = [i for i, obj in enumerate(objects) if _target_matches(target, obj)]
        assert matched, f"{where}: target {target} matches no resource"
        for i in matched:
            # jsonpatch raises on a missing path or a failed "test" op, as kustomize would.
            objects[i] = jsonpatch.apply_patch(objects[i], ops)

    if "namespace" in kustomization:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    if kustomization.get("images"):
        for obj in objects:
            _set_images(obj, kustomization["images"])
    return objects


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S_DIR.rglob("kustomization.yaml"))


def rendered_targets() -> list[Path]:
    """Kustomizations meant to be applied: all except those only used as a base by others."""
    dirs = kustomization_dirs()
    used_as_resource = set()
    for directory in dirs:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kustomization.get("resources", []):
            used_as_resource.add((directory / entry).resolve())
    return [d for d in dirs if d.resolve() not in used_as_resource or "overlays" in d.parts]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def unknown_fields(schema: dict, value: Any, path: str = "") -> Iterator[str]:
    """Paths of keys in ``value`` that ``schema`` does not declare (and would be pruned)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                yield from unknown_fields(properties[key], item, child)
            elif isinstance(additional, dict):
                yield from unknown_fields(additional, item, child)
            elif additional is True:
                continue
            elif path == "metadata":
                continue  # ObjectMeta is validated by the API server itself, not by the CRD
            else:
                yield child
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from unknown_fields(schema["items"], item, f"{path}[{index}]")


def schema_errors(schema: dict, obj: dict) -> list[str]:
    validator = jsonschema.validators.validator_for({})(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _pydantic_models(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_pydantic_models(arg))
    return found


def serve_model_problems(model: type, data: Any, path: str) -> Iterator[str]:
    """Unknown keys (recursively) and invalid nested values for the pydantic ``model``.

    Serve types some nested configs as ``Union[Dict, Model]`` (autoscaling_config),
    so validating the top-level schema alone accepts any dict there; each nested
    model is therefore validated on its own too, as Serve does at deploy time.
    """
    from pydantic import ValidationError

    if not isinstance(data, dict) or model.model_config.get("extra") == "allow":
        return
    fields = dict(model.model_fields)
    fields.update({field.alias: field for field in model.model_fields.values() if field.alias})
    for key, value in data.items():
        child = f"{path}.{key}" if path else key
        if key not in fields:
            yield f"unknown key {child}"
            continue
        models = _pydantic_models(fields[key].annotation)
        if not models:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            where = child if index is None else f"{child}[{index}]"
            if isinstance(item, dict):
                try:
                    models[0].model_validate(item)
                except ValidationError as exc:
                    yield f"{where}: {exc}"
            yield from serve_model_problems(models[0], item, where)


def serve_config_problems(serve_config_text: str) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(serve_config_text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"serveConfigV2: {exc}"]
    return [f"serveConfigV2: {problem}" for problem in serve_model_problems(ServeDeploySchema, config, "")]


OBSERVABILITY_KINDS = {("v1", "ConfigMap"), ("monitoring.coreos.com/v1", "PrometheusRule")}
"""The prod overlay's dashboard and alerts: validated by tests/test_k8s_observability.py, not against Ray's CRDs."""


def manifest_problems(schemas: dict, obj: dict) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in OBSERVABILITY_KINDS:
        return []
    if key not in schemas:
        return [f"no schema for apiVersion={key[0]} kind={key[1]}: add its CRD or extend this test"]
    schema = schemas[key]
    problems = schema_errors(schema, obj)
    problems += [f"{field}: not in the {key[1]} schema (misspelt?)" for field in unknown_fields(schema, obj)]
    if not obj.get("metadata", {}).get("name"):
        problems.append("metadata.name: missing")
    if obj["kind"] == "RayService" and "serveConfigV2" in obj.get("spec", {}):
        problems += serve_config_problems(obj["spec"]["serveConfigV2"])
    return problems


def parse_quantity(value: Any) -> float:
    """Kubernetes CPU/GPU quantity ("500m", "2", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_templates(spec: dict) -> Iterator[tuple[str, dict, dict]]:
    """(group name, group spec, pod spec) for the head and every worker group of a cluster spec."""
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group, group["template"]["spec"]


def cluster_spec(obj: dict) -> dict:
    if obj["kind"] == "RayCluster":
        return obj["spec"]
    return obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else obj["spec"]["rayClusterSpec"]


def ray_objects(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in RAY_KINDS]


def ray_container(pod_spec: dict) -> dict:
    return pod_spec["containers"][0]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict:
    loaded = load_crd_schemas(CRD_DIR)
    assert ("ray.io/v1", "RayService") in loaded, f"no ray.io/v1 RayService CRD in {CRD_DIR}"
    return {**BUILTIN_SCHEMAS, **loaded}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {rel(directory): render_kustomization(directory) for directory in rendered_targets()}


def rendered_service(rendered: dict, target: str) -> dict:
    services = [obj for obj in rendered[target] if obj["kind"] == "RayService"]
    assert len(services) == 1, f"{target}: expected one RayService, got {len(services)}"
    return services[0]


def serve_app(service: dict) -> dict:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == {APP_NAME}
    return apps[APP_NAME]


# ---------------------------------------------------------------------------
# Tests: everything validates
# ---------------------------------------------------------------------------


def test_expected_targets_exist():
    targets = {rel(d) for d in rendered_targets()}
    assert {"k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha", "k8s/jobs/retrain"} <= targets


def test_every_yaml_file_is_used_or_validated(schemas):
    """No stray YAML: each file is a kustomization, a resource, a patch, or a standalone manifest."""
    used: set[Path] = set()
    for directory in kustomization_dirs():
        render_kustomization(directory, used)
    for path in sorted(K8S_DIR.rglob("*.y*ml")):
        if path.resolve() in used:
            continue
        documents = load_yaml_documents(path)
        assert documents and all("apiVersion" in doc and "kind" in doc for doc in documents), (
            f"{rel(path)} is referenced by no kustomization and is not a manifest"
        )
        for doc in documents:
            assert manifest_problems(schemas, doc) == [], rel(path)


def manifest_files() -> list[Path]:
    """YAML files holding Kubernetes objects (not kustomizations, not patch op lists)."""
    found = []
    for path in sorted(K8S_DIR.rglob("*.y*ml")):
        documents = load_yaml_documents(path)
        if path.name != "kustomization.yaml" and all(isinstance(d, dict) and "kind" in d for d in documents):
            found.append(path)
    return found


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_plain_manifest_files_validate(schemas, path: Path):
    for doc in load_yaml_documents(path):
        assert manifest_problems(schemas, doc) == []


@pytest.mark.parametrize("directory", rendered_targets(), ids=rel)
def test_rendered_kustomizations_validate(schemas, rendered, directory: Path):
    objects = rendered[rel(directory)]
    assert objects
    for obj in objects:
        assert manifest_problems(schemas, obj) == [], f"{rel(directory)}: {obj['kind']}/{obj['metadata']['name']}"


# ---------------------------------------------------------------------------
# Tests: the strict checks really catch mistakes
# ---------------------------------------------------------------------------


def test_misspelt_fields_are_caught(schemas, rendered):
    service = rendered_service(rendered, "k8s/overlays/prod")
    assert manifest_problems(schemas, service) == []

    top = copy.deepcopy(service)
    cluster = top["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscalling"] = cluster.pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoscalling" in p for p in manifest_problems(schemas, top))

    deep = copy.deepcopy(service)
    container = deep["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    container["resouces"] = container.pop("resources")
    problems = manifest_problems(schemas, deep)
    assert any("containers[0].resouces" in p for p in problems), problems

    in_map = copy.deepcopy(service)
    in_map["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] = {"redisAdress": "redis:6379"}
    assert any("redisAdress" in p for p in manifest_problems(schemas, in_map))


def test_wrong_types_and_enums_are_caught(schemas, rendered):
    service = copy.deepcopy(rendered_service(rendered, "k8s/overlays/prod"))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    service["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Turbo"
    del service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    problems = manifest_problems(schemas, service)
    assert any("maxReplicas" in p and "integer" in p for p in problems), problems
    assert any("upscalingMode" in p for p in problems), problems
    assert any("groupName" in p and "required" in p for p in problems), problems


def test_serve_config_mistakes_are_caught(rendered):
    service = rendered_service(rendered, "k8s/overlays/prod")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    router = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Router")

    router["autoscaling_config"]["max_replica"] = router["autoscaling_config"].pop("max_replicas")
    router["max_ongoing_request"] = router.pop("max_ongoing_requests")
    router["ray_actor_options"]["num_gpu"] = 1
    problems = serve_config_problems(yaml.safe_dump(config))
    expected = "unknown key applications[0].deployments[1].autoscaling_config.max_replica"
    assert any(expected in p for p in problems), problems
    assert any("max_ongoing_request" in p for p in problems), problems
    assert any("ray_actor_options.num_gpu" in p for p in problems), problems

    # A value pydantic itself rejects: min_replicas above max_replicas.
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    router = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Router")
    router["autoscaling_config"]["min_replicas"] = 100
    problems = serve_config_problems(yaml.safe_dump(config))
    assert any("must be greater than or equal to min_replicas" in p for p in problems), problems


def test_a_patch_on_a_moved_field_fails(tmp_path):
    """The "test" ops in the overlays make a patch fail loudly when the base changes under it."""
    base = yaml.safe_load((K8S_DIR / "base" / "rayservice.yaml").read_text())
    ops = yaml.safe_load((K8S_DIR / "overlays" / "prod" / "rayservice-patch.yaml").read_text())
    base["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"] = "renamed"
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(base, ops)


# ---------------------------------------------------------------------------
# Tests: what the deployment must look like
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_serve_application_shape(rendered, target):
    service = rendered_service(rendered, target)
    app = serve_app(service)
    assert app["import_path"] == IMPORT_PATH
    assert app["route_prefix"] == "/"
    assert set(app.get("runtime_env", {})) <= {"env_vars"}, "the image carries the code: keep runtime_env minimal"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == DEPLOYMENTS
    for deployment in deployments.values():
        assert "num_cpus" in deployment.get("ray_actor_options", {}), f"{deployment['name']}: set num_cpus"
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"


@pytest.mark.parametrize("target", ["k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_serve_args_are_the_application_config(rendered, target):
    """build_app's args load as the one application config (cluster/config.py: unknown keys and bad types fail)."""
    from banditroute.cluster.config import app_config_from_args

    app = app_config_from_args(serve_app(rendered_service(rendered, target))["args"], environ={})
    assert app.online.enabled and app.online.initial_policy.startswith(app.storage.uri)
    assert app.storage.is_s3 and app.router.security.admin_api_keys_env == "BANDITROUTE_ADMIN_KEYS"


@pytest.mark.parametrize("target", ["k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_listed_deployments_match_the_placement(rendered, target):
    """Serve refuses a config listing a deployment the app does not build ('Router' with placement inline)."""
    from banditroute.cluster.app import deployment_options
    from banditroute.cluster.config import app_config_from_args

    served = serve_app(rendered_service(rendered, target))
    app = app_config_from_args(served["args"], environ={})
    assert app.router.placement in ("inline", "replica"), "k8s: set router.placement; auto is decided on the head, not the GPU pods"
    assert {d["name"] for d in served["deployments"]} == set(deployment_options(app.router, app.router.placement))


def test_dev_is_cpu_only_with_one_replica(rendered):
    service = rendered_service(rendered, "k8s/overlays/dev")
    cluster = cluster_spec(service)
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu-workers"]
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == 1
    for _, _, pod in pod_templates(cluster):
        for resources in ray_container(pod)["resources"].values():
            assert "nvidia.com/gpu" not in resources
    for deployment in serve_app(service)["deployments"]:
        assert deployment.get("num_replicas") == 1 and "autoscaling_config" not in deployment
        assert "num_gpus" not in deployment["ray_actor_options"]


@pytest.mark.parametrize("target", ["k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_prod_routes_on_gpus_with_autoscaling(rendered, target):
    service = rendered_service(rendered, target)
    groups = {name: group for name, group, _ in pod_templates(cluster_spec(service))}
    gpu_pod = groups["gpu-workers"]["template"]["spec"]
    limits = ray_container(gpu_pod)["resources"]["limits"]
    assert parse_quantity(limits["nvidia.com/gpu"]) >= 1
    assert gpu_pod["tolerations"] and gpu_pod["nodeSelector"]
    router = next(d for d in serve_app(service)["deployments"] if d["name"] == "Router")
    assert router["ray_actor_options"]["num_gpus"] > 0
    autoscaling = router["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["target_ongoing_requests"] > 0


@pytest.mark.parametrize("target", ["k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha"])
def test_cluster_can_hold_the_largest_serve_scale(rendered, target):
    """Serve at max_replicas must fit the worker groups at maxReplicas, or replicas stay pending."""
    service = rendered_service(rendered, target)
    capacity = {"num_cpus": 0.0, "num_gpus": 0.0}
    for name, group, pod in pod_templates(cluster_spec(service)):
        limits = ray_container(pod)["resources"]["limits"]
        cpus = parse_quantity(group.get("rayStartParams", {}).get("num-cpus", limits["cpu"]))
        gpus = parse_quantity(limits.get("nvidia.com/gpu", 0))
        pods = 1 if name == "head" else group["maxReplicas"]
        capacity["num_cpus"] += pods * cpus
        capacity["num_gpus"] += pods * gpus
    needed = {"num_cpus": 0.0, "num_gpus": 0.0}
    for deployment in serve_app(service)["deployments"]:
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        for resource in needed:
            needed[resource] += replicas * deployment["ray_actor_options"].get(resource, 0)
    for resource in needed:
        assert needed[resource] <= capacity[resource], f"{target}: {resource} needed {needed} > {capacity}"


@pytest.mark.parametrize("directory", rendered_targets(), ids=rel)
def test_pods_are_sized_use_secrets_and_built_images(rendered, directory):
    import ray

    for obj in ray_objects(rendered[rel(directory)]):
        if (obj.get("apiVersion"), obj.get("kind")) in OBSERVABILITY_KINDS:
            continue
        cluster = cluster_spec(obj)
        assert cluster["rayVersion"] == ray.__version__, "rayVersion must match the Ray in the image"
        for name, _, pod in pod_templates(cluster):
            container = ray_container(pod)
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: {kind} need cpu and memory"
            if "nvidia.com/gpu" in resources["limits"]:
                assert resources["requests"].get("nvidia.com/gpu") == resources["limits"]["nvidia.com/gpu"]
            for env in container.get("env", []):
                if SECRET_LIKE_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} must come from a Secret"
            # Which pod gets which secret: tests/test_k8s_security.py.
            # kustomize's images transformer rewrote every placeholder image to a registry image with a tag.
            assert "/" in container["image"] and ":" in container["image"].rsplit("/", 1)[-1], container["image"]


def test_gcs_fault_tolerance_overlay(rendered):
    service = rendered_service(rendered, "k8s/overlays/prod-ha")
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"]
    assert "secretKeyRef" in options["redisPassword"]["valueFrom"]
    assert "gcsFaultToleranceOptions" not in rendered_service(rendered, "k8s/overlays/prod")["spec"]["rayClusterConfig"]
    assert rendered_service(rendered, "k8s/overlays/prod-ha")["metadata"]["namespace"] == "banditroute"


def test_retrain_job(rendered):
    [job] = ray_objects(rendered["k8s/jobs/retrain"])
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    import shlex

    from banditroute.cli import build_parser

    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["banditroute", "train-from-log"]
    args = build_parser().parse_args(words[1:])  # a real command line of the real CLI (argparse exits otherwise)
    overrides = dict(pair.split("=", 1) for pair in args.set)
    prod = rendered_service(rendered, "k8s/overlays/prod")
    prod_storage = yaml.safe_load(prod["spec"]["serveConfigV2"])["applications"][0]["args"]["storage"]
    assert overrides["storage.uri"] == prod_storage["uri"]  # retrains on the event log prod writes
    assert args.address == "auto"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


def test_dockerfile_base_matches_ray_version():
    import ray

    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    match = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.MULTILINE)
    assert match and match.group(1) == ray.__version__
    # The tag, plus "@<digest>" when BASE_DIGEST is given (release builds must give it: tests/test_image_lock.py).
    base_image = (r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}\$\{RAY_VARIANT\}"
                  r"\$\{BASE_DIGEST:\+@\}\$\{BASE_DIGEST\}$")
    assert re.search(base_image, dockerfile, re.MULTILINE)
