"""AppConfig (cluster/config.py) and the Serve config generated from it (cluster/launch.py).

test_deploy_generated_config_and_healthz deploys the generated config with
``banditroute.cluster.launch.deploy`` (start.mode local: an embedded Ray in a
subprocess) through the Serve controller's declarative ``apply_config`` -- the
call ``serve deploy`` makes via the dashboard, which is not started -- and
checks GET /healthz over HTTP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from banditroute.cluster.config import AppConfig, app_config_from_dict, env_overrides, load_app_config
from banditroute.cluster.launch import IMPORT_PATH, serve_config_from_app, serve_schema
from banditroute.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "app.example.yaml"
RAYSERVICE = ROOT / "k8s" / "base" / "rayservice.yaml"
EXAMPLE_SEED = "s3://banditroute-data/banditroute/seed-policy"


def k8s_serve_config() -> dict:
    service = yaml.safe_load(RAYSERVICE.read_text())
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_example_config_loads():
    app = load_app_config(EXAMPLE, environ={})
    assert isinstance(app, AppConfig)
    assert app.start.mode == "cluster" and app.start.address == "auto"
    assert app.storage.is_s3 and app.storage.uri == "s3://banditroute-data/banditroute"
    assert app.router.upstreams["gpt-4"].api_key_env == "OPENAI_API_KEY"
    assert app.router.num_gpus == 0.5
    assert app.serve.router_autoscaling.max_replicas == 4 and app.serve.ingress_autoscaling is not None
    assert app.prices == {"gpt-4": 0.03, "mixtral-8x7b": 0.0006}
    assert app.learner.checkpoint_every == 100 and app.feedback.learner_batch_size == 32
    assert app.online.enabled and app.online.initial_policy.startswith("s3://")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"routr": {}}, "routr"),
        ({"router": {"num_replicsa": 2}}, "router.num_replicsa"),
        ({"router": {"num_replicas": "many"}}, "router.num_replicas"),
        ({"serve": {"router_autoscaling": {"max_replicas": "x"}}}, "serve.router_autoscaling.max_replicas"),
        ({"serve": {"router_autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "serve.router_autoscaling.max_replicas"),
        ({"serve": {"proxy_location": "Everywhere"}}, "serve.proxy_location"),
        ({"start": {"mode": "cloud"}}, "start.mode"),
        ({"start": {"mode": "cluster"}}, "start.address"),
        ({"start": {"mode": "cluster", "address": "auto"}, "storage": {"uri": "runs/storage"}}, "storage.uri"),
        ({"storage": {"uri": "ftp://bucket/x"}}, "storage.uri"),
        ({"storage": {"endpoint_url": "minio:9000"}}, "storage.endpoint_url"),
        ({"learner": {"learning_rate": "fast"}}, "learner.learning_rate"),
        ({"feedback": {"learner_batch_size": 0}}, "feedback.learner_batch_size"),
        ({"prices": {"gpt-4": -1}}, "prices.gpt-4"),
        ({"prices": {"gpt-4": "cheap"}}, "prices.gpt-4"),
        ({"online": {"enabled": "sometimes"}}, "online.enabled"),
        ({"router": {"policy": "p", "security": {"token_ttl_s": 60}}, "feedback": {"join": {"window_s": 300}}},
         "router.security.token_ttl_s"),
        ({"online": {"actor_prefix": ""}}, "online.actor_prefix"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        app_config_from_dict(data, environ={})


def test_env_overrides_and_precedence(tmp_path):
    environ = {
        "BANDITROUTE__STORAGE__ENDPOINT_URL": "http://127.0.0.1:9000",
        "BANDITROUTE__STORAGE__SECRET_ACCESS_KEY_ENV": "MINIO_SECRET",
        "BANDITROUTE__ROUTER__NUM_REPLICAS": "3",
        "BANDITROUTE__ROUTER__UPSTREAMS__GPT-4__TIMEOUT_S": "5",
        "UNRELATED": "x",
    }
    assert env_overrides(environ)["storage.endpoint_url"] == "http://127.0.0.1:9000"
    assert "unrelated" not in env_overrides(environ)
    app = load_app_config(EXAMPLE, environ=environ)
    assert app.storage.endpoint_url == "http://127.0.0.1:9000"
    assert app.storage.secret_access_key_env == "MINIO_SECRET"
    assert app.router.num_replicas == 3 and app.router.upstreams["gpt-4"].timeout_s == 5.0
    # explicit overrides (--set) win over the environment
    app = load_app_config(EXAMPLE, {"router.num_replicas": "4"}, environ=environ)
    assert app.router.num_replicas == 4
    with pytest.raises(ConfigError, match=r"storage\.endpint_url"):
        load_app_config(EXAMPLE, environ={"BANDITROUTE__STORAGE__ENDPINT_URL": "http://x:1"})
    with pytest.raises(ConfigError, match=r"router\.num_replicas"):
        load_app_config(EXAMPLE, environ={"BANDITROUTE__ROUTER__NUM_REPLICAS": "many"})


def test_serve_config_validates_and_matches_k8s():
    from test_k8s_manifests import serve_config_problems

    config = serve_config_from_app(load_app_config(EXAMPLE, environ={}))
    assert serve_config_problems(yaml.safe_dump(config)) == []  # Serve's schema + no unknown keys
    serve_schema(config)
    k8s = k8s_serve_config()
    (ours,), (theirs,) = config["applications"], k8s["applications"]
    assert ours["import_path"] == theirs["import_path"] == IMPORT_PATH
    assert (ours["name"], ours["route_prefix"]) == (theirs["name"], theirs["route_prefix"])
    assert [d["name"] for d in ours["deployments"]] == [d["name"] for d in theirs["deployments"]]
    assert ours["args"]["storage"] == theirs["args"]["storage"]
    assert ours["args"]["online"] == theirs["args"]["online"] == {"enabled": True, "initial_policy": EXAMPLE_SEED}
    from banditroute.core.config import from_dict
    from banditroute.core.security import SecurityConfig

    security = [from_dict(SecurityConfig, a["args"]["router"]["security"]) for a in (ours, theirs)]
    assert security[0] == security[1] and security[0].admin_api_keys_env  # the env var names the pods get
    # the builder starts the loop's actors, so it gets their sections (and the prices) too
    assert ours["args"]["learner"]["checkpoint_every"] == 100 and ours["args"]["feedback"]["learner_batch_size"] == 32
    assert ours["args"]["prices"] == {"gpt-4": 0.03, "mixtral-8x7b": 0.0006}
    assert config["proxy_location"] == k8s["proxy_location"] and config["http_options"] == k8s["http_options"]
    deployments = {d["name"]: d for d in ours["deployments"]}
    # GPU replicas (num_gpus 0.5): placement auto keeps the Router deployment, and the config pins it for the builder
    assert ours["args"]["router"]["placement"] == "replica"
    assert deployments["Router"]["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert deployments["Router"]["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in deployments["Router"]
    # fixed replica counts when no autoscaling section; num_gpus 'auto' is left to build_app
    cpu = {"router": {"num_replicas": 3, "policy": "runs/policy", "num_gpus": "auto", "device": "cpu"}}
    fixed = serve_config_from_app(app_config_from_dict(cpu, environ={}))
    (inline,) = fixed["applications"][0]["deployments"]  # on CPU, placement auto: the ingress decides, no Router
    assert fixed["applications"][0]["args"]["router"]["placement"] == "inline"
    assert inline["name"] == "RouterIngress" and inline["num_replicas"] == 3 and "num_gpus" not in inline["ray_actor_options"]
    assert inline["user_config"] == {"max_batch_size": 64, "batch_wait_timeout_s": 0.002}
    cpu["router"]["placement"] = "replica"
    fixed = serve_config_from_app(app_config_from_dict(cpu, environ={}))
    by_name = {d["name"]: d for d in fixed["applications"][0]["deployments"]}
    assert by_name["Router"]["num_replicas"] == 3 and "num_gpus" not in by_name["Router"]["ray_actor_options"]
    assert by_name["RouterIngress"]["num_replicas"] == 1
    # inline + autoscaling: the ingress replicas are the deciding ones, so router_autoscaling applies to them
    cpu["router"]["placement"] = "inline"
    cpu["serve"] = {"router_autoscaling": {"min_replicas": 1, "max_replicas": 5}}
    (inline,) = serve_config_from_app(app_config_from_dict(cpu, environ={}))["applications"][0]["deployments"]
    assert inline["autoscaling_config"]["max_replicas"] == 5 and "num_replicas" not in inline


def test_build_app_accepts_the_storage_arg(tmp_path):
    """The args of both the generated config and k8s serveConfigV2 build the application."""
    from banditroute.cluster.app import build_app
    from banditroute.serve.testing import write_fixture

    policy_path, _ = write_fixture(tmp_path, n=8)
    generated = serve_config_from_app(load_app_config(EXAMPLE, environ={}))["applications"][0]["args"]
    for args in (generated, k8s_serve_config()["applications"][0]["args"]):
        args = dict(args, router={**args.get("router", {}), "policy": str(policy_path), "num_gpus": 0},
                    online={"enabled": False}, prices={})
        app = build_app(args)  # the online loop itself: tests/test_cluster_online.py
        ingress = app._bound_deployment
        assert ingress.name == "RouterIngress"
        if args["router"].get("placement") == "replica":  # generated: pinned where the config was made (GPUs there)
            assert ingress.init_args[0]._bound_deployment.name == "Router"
        else:  # k8s args leave placement auto; built here, on CPU: inline
            assert ingress.init_args[0] is None
    with pytest.raises(ValueError, match=r"storage\.uri"):
        build_app({"router": {"policy": str(policy_path), "num_gpus": 0}, "storage": {"uri": "ftp://x/y"}})
    with pytest.raises(ValueError, match=r"storage\.regoin"):
        build_app({"router": {"policy": str(policy_path), "num_gpus": 0}, "storage.regoin": "eu-west-1"})


def test_cli_writes_serve_config(tmp_path):
    from banditroute.cli import main

    out = tmp_path / "serve_config.yaml"
    assert main(["serve-config", "--config", str(EXAMPLE), "--out", str(out), "--set", "router.num_replicas=2"]) == 0
    written = yaml.safe_load(out.read_text())
    assert written == serve_config_from_app(load_app_config(EXAMPLE, {"router.num_replicas": "2"}))
    assert main(["serve-config", "--config", str(EXAMPLE), "--set", "router.num_replicas=0"]) == 2


_DEPLOY_SCRIPT = """
import json, sys
from ray import serve
from banditroute.cluster.config import app_config_from_dict
from banditroute.cluster.launch import deploy
from banditroute.cluster.up import wait_healthy

app = app_config_from_dict(json.loads(sys.argv[1]), environ={})
try:
    deploy(app, blocking=True, init_kwargs={"include_dashboard": False, "log_to_driver": False})
    try:
        health = wait_healthy(f"http://127.0.0.1:{app.router.port}{app.router.route_prefix}", 30)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}: {serve.status().applications.get(app.router.app_name)}")
    status = serve.status().applications[app.router.app_name]
    print("RESULT " + json.dumps({"health": health, "deployments": sorted(status.deployments)}))
finally:
    serve.shutdown()
"""


@pytest.mark.slow
def test_deploy_generated_config_and_healthz(tmp_path):
    """`deploy` (start.mode local: its own embedded Ray, in a subprocess) applies the generated config; /healthz is 200.

    A subprocess, not the session's Ray: a declarative apply_config changes the
    session's Serve controller for later tests (test_loop_e2e's restart check
    became flaky after it).
    """
    import json
    import subprocess
    import sys

    from conftest import free_port

    from banditroute.serve.testing import write_fixture

    policy_path, _ = write_fixture(tmp_path, n=8)
    data = {
        "start": {"mode": "local", "num_cpus": 4},
        "router": {
            "app_name": "cluster-config-test", "route_prefix": "/cluster-config", "policy": str(policy_path),
            "host": "127.0.0.1", "port": free_port(), "device": "cpu",
            "decision_sink_options": {"path": str(tmp_path / "decisions")},
            "num_cpus": 0.5, "num_gpus": 0, "ingress_num_cpus": 0.25,
        },
        "serve": {"router_autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4}},
        "storage": {"uri": str(tmp_path / "storage")},
    }
    proc = subprocess.run([sys.executable, "-c", _DEPLOY_SCRIPT, json.dumps(data)], capture_output=True, text=True,
                          timeout=150, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["health"]["status"] == "ok" and result["health"]["models"] == ["big-model", "mid-model", "small-model"]
    assert result["deployments"] == ["RouterIngress"]  # placement auto on CPU: inline (router_autoscaling on the ingress)

def test_start_modes(monkeypatch):
    import ray

    from banditroute.cluster.launch import start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert start_ray(app_config_from_dict({"start": {"num_cpus": 4}}, environ={}))
    assert calls[-1]["num_cpus"] == 4 and "address" not in calls[-1]
    assert calls[-1]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # local runs: no dashboard UI and no idle workers by default (memory, docs/serving.md); both can be turned back on
    assert calls[-1]["include_dashboard"] is False and calls[-1]["_system_config"]["num_workers_soft_limit"] == 0
    assert start_ray(app_config_from_dict({"start": {"include_dashboard": True, "keep_idle_workers": True}}, environ={}))
    assert calls[-1]["include_dashboard"] is True and "_system_config" not in calls[-1]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # ray.init joins that cluster: no node settings
    assert start_ray(app_config_from_dict({}, environ={}))
    assert "include_dashboard" not in calls[-1] and "_system_config" not in calls[-1]
    monkeypatch.delenv("RAY_ADDRESS")
    cluster = app_config_from_dict(
        {"start": {"mode": "cluster", "address": "ray://head:10001"}, "storage": {"uri": "s3://b/p"}}, environ={}
    )
    assert start_ray(cluster)
    assert calls[-1] == {"address": "ray://head:10001", "namespace": "banditroute"}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert not start_ray(cluster) and len(calls) == 4


def test_build_app_args_are_the_app_config():
    """build_app's args: AppConfig keys (sections or dotted strings) over an optional `config` YAML, merged key by key."""
    from banditroute.cluster.config import app_config_from_args

    app = app_config_from_args({"config": str(EXAMPLE), "router.num_replicas": "3", "router": {"max_batch_size": 8},
                                "prices": {"gpt-4": 0.02}}, environ={})
    assert app.router.num_replicas == 3 and app.router.max_batch_size == 8
    assert app.router.upstreams["gpt-4"].api_key_env == "OPENAI_API_KEY"  # the file's other router keys stay
    assert app.prices == {"gpt-4": 0.02, "mixtral-8x7b": 0.0006}
    assert app.serve.router_autoscaling.max_replicas == 4  # `serve:` means Serve's deployment knobs, only that
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): num_replicas"):
        app_config_from_args({"num_replicas": 2, "router": {"policy": "p"}}, environ={})
    with pytest.raises(ConfigError, match=r"^storage: required"):
        app_config_from_args({"online": {"enabled": True}}, environ={})


def test_generated_args_load_back_as_the_same_app_config():
    """The generated serveConfigV2 args are the application config: build_app reads back what was written."""
    from dataclasses import replace

    from banditroute.cluster.config import app_config_from_args

    app = load_app_config(EXAMPLE, environ={})
    args = yaml.safe_load(yaml.safe_dump(serve_config_from_app(app)["applications"][0]["args"]))
    again = app_config_from_args(args, environ={})
    for section in ("storage", "online", "feedback", "learner", "prices"):
        assert getattr(again, section) == getattr(app, section), section
    # the proxy's keys are http_options; placement auto is decided (and pinned) where the config is generated
    assert again.router.placement == "replica" and app.router.placement == "auto"
    assert replace(again.router, host=app.router.host, port=app.router.port, placement="auto") == app.router
