"""The Serve application over real HTTP on the session's Ray: routing, chat via the replay upstream,
bad inputs, two replicas, durable decision log, weights refresh from the ParameterServer.

One application is deployed for the whole module (deploying costs seconds on 2 cores) and deleted
at the end; the tests only send requests to it and run in any order: none assumes which weights or
version are served, and the weights-refresh test publishes a version above whatever it finds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import httpx
import pytest

from conftest import free_port, wait_until

pytestmark = pytest.mark.ray

APP = "banditroute-test"
PS_NAMESPACE = "banditroute-test"


class FlakyUpstream:
    """A tiny OpenAI-style upstream in this process whose behaviour the test switches: ok / 500 / hang."""

    def __init__(self):
        self.mode = "ok"
        self._released = threading.Event()
        self.port = free_port()
        self._loop = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        from aiohttp import web

        async def chat(request):
            body = await request.json()
            if self.mode == "500":
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if self.mode == "hang":  # no answer until release(): the caller's timeout has to fire
                await asyncio.get_running_loop().run_in_executor(None, self._released.wait, 30)
            return web.json_response({
                "id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "flaky says hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4, "cost": 0.5},
            })

        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        loop.run_forever()

    def hang(self):
        """Hold every answer until :meth:`release`."""
        self._released.clear()
        self.mode = "hang"

    def release(self):
        """Answer normally again, including the requests still held."""
        self.mode = "ok"
        self._released.set()

    def stop(self):
        self.release()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def deployed(serve_http_port, tmp_path_factory):
    from ray import serve

    from banditroute.core.data import load_routing_data
    from banditroute.cluster.app import build_app
    from banditroute.serve.testing import write_fixture

    folder = tmp_path_factory.mktemp("serve_app")
    policy_path, data_path = write_fixture(folder, n=48)
    flaky = FlakyUpstream()
    ps_name = f"ps-{uuid.uuid4().hex[:8]}"
    config = {
        "policy": str(policy_path),
        "num_replicas": 2,
        "num_cpus": 0.1,
        "ingress_num_cpus": 0.1,
        "port": serve_http_port,
        "max_batch_size": 16,
        "max_prompt_chars": 2000,
        "max_batch_requests": 8,
        "decision_sink_options": {"path": str(folder / "decisions")},
        "replay": {"enabled": True, "data_path": str(data_path)},
        "upstreams": {
            "small-model": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 2},  # nothing listens
            "big-model": {"base_url": f"http://127.0.0.1:{flaky.port}/v1", "timeout_s": 1, "model": "upstream-big"},
        },
        "fallback_model": "big-model",
        "parameter_server_name": ps_name,
        "parameter_server_namespace": PS_NAMESPACE,
        "weights_poll_timeout_s": 2.0,
        "weights_retry_max_s": 0.5,
    }
    start = time.time()
    serve.run(build_app({"router": config}), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{serve_http_port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        wait_until(lambda: client.get("/healthz").status_code == 200, 60, what="healthz to answer 200")
        yield {
            "client": client,
            "base": base,
            "data": load_routing_data(data_path),
            "log_dir": folder / "decisions",
            "flaky": flaky,
            "ps_name": ps_name,
            "deploy_s": time.time() - start,
        }
    serve.delete(APP)
    flaky.stop()
    import ray

    try:
        ray.kill(ray.get_actor(ps_name, namespace=PS_NAMESPACE))
    except ValueError:
        pass


def raw_id(token: str) -> str:
    """The raw decision id (as logged) that a client-facing decision token binds."""
    import os

    from banditroute.core.security import verify

    return verify(token, [os.environ["BANDITROUTE_TOKEN_SECRET"]], time.time()).decision_id


def route(client, body, status=200):
    r = client.post("/v1/route", json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_healthz_and_models(deployed):
    c = deployed["client"]
    h = c.get("/healthz").json()
    assert h["status"] == "ok" and h["replica_id"] and h["ingress_replica_id"] and isinstance(h["policy_version"], int)
    assert h["models"] == ["big-model", "mid-model", "small-model"]
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["banditroute", "big-model", "mid-model", "small-model"]


def test_route_contract(deployed):
    c = deployed["client"]
    out = route(c, {"prompt": "What is 2 + 2?"})
    assert set(out) >= {"decision_id", "model", "probability", "probabilities", "policy_version"}
    assert isinstance(out["decision_id"], str) and isinstance(out["policy_version"], int)
    assert out["decision_id"].startswith("br1.") and len(raw_id(out["decision_id"])) >= 16  # a signed token
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-5
    assert out["mode"] == "explore" and out["probability"] == pytest.approx(out["probabilities"][out["model"]])

    sub = route(c, {"messages": [{"role": "user", "content": "hi"}], "candidates": ["mid-model", "small-model"],
                    "preference": {"quality": 1, "cost": 1}})
    assert set(sub["probabilities"]) == {"mid-model", "small-model"} and sub["model"] in sub["probabilities"]
    assert abs(sum(sub["probabilities"].values()) - 1) < 1e-5 and sub["w_cost"] == 0.5

    greedy = [route(c, {"prompt": "same", "mode": "greedy"}) for _ in range(4)]
    assert len({g["model"] for g in greedy}) == 1 and all(g["probability"] == 1.0 for g in greedy)
    assert greedy[0]["model"] == max(greedy[0]["probabilities"], key=greedy[0]["probabilities"].get)
    assert len({g["decision_id"] for g in greedy}) == 4


def test_batch_endpoint(deployed):
    c = deployed["client"]
    r = c.post("/v1/route/batch", json={"prompts": [f"p{i}" for i in range(6)], "mode": "greedy", "candidates": ["big-model", "mid-model"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 6 and all(set(x["probabilities"]) == {"big-model", "mid-model"} for x in results)
    r = c.post("/v1/route/batch", json={"requests": [{"prompt": "a", "mode": "explore"}, {"messages": [{"role": "user", "content": "b"}]}]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_chat_completion_via_replay(deployed):
    c, data = deployed["client"], deployed["data"]
    messages = [{"role": "user", "content": data.prompts[7]}]
    r = c.post("/v1/chat/completions", json={"model": "banditroute", "messages": messages, "candidates": ["mid-model"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-banditroute-model"] == "mid-model" and r.headers["x-banditroute-decision-id"]
    assert int(r.headers["x-banditroute-policy-version"]) == body["banditroute"]["policy_version"]
    assert body["banditroute"]["decision_id"] == r.headers["x-banditroute-decision-id"]
    assert body["banditroute"]["model"] == "mid-model" and body["banditroute"]["probability"] == pytest.approx(1.0)
    assert body["choices"][0]["message"]["content"] == data.responses[7, 1]
    assert body["usage"]["cost_usd"] == pytest.approx(data.costs[7, 1])

    with c.stream("POST", "/v1/chat/completions", json={"model": "banditroute", "messages": messages, "stream": True,
                                                         "candidates": ["mid-model"], "mode": "greedy"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        decision = r.headers["x-banditroute-decision-id"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["banditroute"]["decision_id"] == decision and "banditroute" not in chunks[1]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == data.responses[7, 1]

    # a pool model name is served by that model in shadow mode: the router still decides and logs its own choice
    r = c.post("/v1/chat/completions", json={"model": "mid-model", "messages": messages})
    assert r.status_code == 200 and r.headers["x-banditroute-model"] == "mid-model"
    assert r.json()["banditroute"]["model"] == "mid-model" and r.json()["banditroute"]["probability"] == 1.0
    assert "x-banditroute-decision-id" in r.headers
    # the replay upstream does not know this prompt: its 404 is passed through
    r = c.post("/v1/chat/completions", json={"model": "mid-model", "messages": [{"role": "user", "content": "never logged"}]})
    assert r.status_code == 404 and r.json()["error"]["field"] == "messages"


def test_upstream_failures_fallback_502_504(deployed):
    c, flaky = deployed["client"], deployed["flaky"]
    messages = [{"role": "user", "content": "anything"}]
    flaky.mode = "ok"
    try:
        r = c.post("/v1/chat/completions", json={"model": "banditroute", "messages": messages, "candidates": ["small-model"]})
        assert r.status_code == 200, r.text
        assert r.headers["x-banditroute-fallback-from"] == "small-model" and r.headers["x-banditroute-model"] == "big-model"
        assert r.json()["banditroute"]["fallback_from"] == "small-model" and r.json()["model"] == "upstream-big"
        # the log says who answered, so the learner does not credit small-model with big-model's outcome
        from banditroute.serve.decision_sinks import read_decision_log

        logged = read_decision_log(deployed["log_dir"]).to_pylist()
        row = next(d for d in logged if d["decision_id"] == raw_id(r.json()["banditroute"]["decision_id"]))
        assert (row["chosen_model"], row["served_model"]) == ("small-model", "big-model")
        flaky.mode = "500"
        r = c.post("/v1/chat/completions", json={"model": "banditroute", "messages": messages, "candidates": ["small-model"]})
        assert r.status_code == 502 and "small-model" in r.json()["error"]["message"] and "big-model" in r.json()["error"]["message"]
        assert r.headers["x-banditroute-decision-id"]
        flaky.hang()
        r = c.post("/v1/chat/completions", json={"model": "big-model", "messages": messages})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    finally:
        flaky.release()


BAD_INPUTS = [
    ("/v1/route", b"{not json", 400, "body"),
    ("/v1/route", {}, 422, "prompt"),
    ("/v1/route", {"prompt": 42}, 422, "prompt"),
    ("/v1/route", {"messages": []}, 422, "messages"),
    ("/v1/route", {"prompt": "a", "candidates": ["gpt-99"]}, 422, "candidates"),
    ("/v1/route", {"prompt": "a", "candidates": []}, 422, "candidates"),
    ("/v1/route", {"prompt": "a", "preference": {"quality": -1, "cost": 1}}, 422, "preference.quality"),
    ("/v1/route", {"prompt": "a", "preference": {"quality": 0, "cost": 0}}, 422, "preference"),
    ("/v1/route", {"prompt": "x" * 2001}, 413, "prompt"),
    ("/v1/route", {"prompt": "a", "mode": "yolo"}, 422, "mode"),
    ("/v1/route/batch", {"prompts": ["a"] * 9}, 413, "prompts"),
    ("/v1/route/batch", {"prompts": []}, 422, "prompts"),
    ("/v1/route/batch", {"requests": [{"prompt": "a"}, {"prompt": None}]}, 422, "requests[1].prompt"),
    ("/v1/chat/completions", {"model": "banditroute", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "banditroute"}, 422, "messages"),
    ("/v1/chat/completions", {"model": 7, "messages": [{"role": "user", "content": "a"}]}, 422, "model"),
    ("/v1/chat/completions", {"model": "gpt-99", "messages": [{"role": "user", "content": "a"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "banditroute", "messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 422, "stream"),
    ("/v1/chat/completions", {"model": "banditroute", "messages": [{"role": "user", "content": "a"}], "candidates": ["nope"]}, 422, "candidates"),
]


def test_bad_inputs_are_4xx_naming_the_field(deployed):
    c = deployed["client"]
    for path, body, status, field in BAD_INPUTS:
        r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        assert r.json()["error"]["field"] == field, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert route(c, {"prompt": "still alive?"})["model"]
    assert c.get("/healthz").status_code == 200


def test_two_replicas_both_answer(deployed):
    async def burst():
        async with httpx.AsyncClient(base_url=deployed["base"], timeout=30) as client:
            rs = await asyncio.gather(*[client.post("/v1/route", json={"prompt": f"q{i}"}) for i in range(48)])
        assert all(r.status_code == 200 for r in rs)
        return {r.json()["replica_id"] for r in rs}

    seen: set[str] = set()
    for _ in range(3):
        seen |= asyncio.run(burst())
        if len(seen) >= 2:
            break
    assert len(seen) == 2, seen
    health = httpx.get(deployed["base"] + "/healthz", timeout=30).json()  # the answering replica's batching
    assert health["batches_run"] >= 1 and health["mean_batch_size"] >= 1.0


def test_decisions_are_logged_before_the_answer(deployed):
    from banditroute.serve.decision_sinks import read_decisions

    c, data = deployed["client"], deployed["data"]
    before = {d.decision_id for d in read_decisions(deployed["log_dir"])}
    ids = [route(c, {"prompt": f"log me {i}", "candidates": ["big-model", "mid-model"]})["decision_id"] for i in range(5)]
    ids += [x["decision_id"] for x in c.post("/v1/route/batch", json={"prompts": ["x", "y", "z"]}).json()["results"]]
    chat = c.post("/v1/chat/completions", json={"model": "banditroute", "candidates": ["mid-model"],
                                                 "messages": [{"role": "user", "content": data.prompts[3]}]})
    ids.append(chat.headers["x-banditroute-decision-id"])
    ids = [raw_id(t) for t in ids]  # clients see signed tokens; the log keeps the raw ids they bind
    # read right away: an acknowledged decision is already on disk
    logged = {d.decision_id: d for d in read_decisions(deployed["log_dir"]) if d.decision_id not in before}
    assert set(ids) == set(logged) and len(logged) == len(ids) == 9
    rec = logged[ids[0]]
    assert rec.candidates == ["big-model", "mid-model"] and rec.chosen_model in rec.candidates
    assert len(rec.embedding) == 64 and rec.encoder_id == "hashing-64-last256" and rec.w_cost == pytest.approx(0.3)
    assert rec.probability == pytest.approx(rec.candidate_probabilities[rec.candidates.index(rec.chosen_model)])
    assert logged[ids[-1]].upstream_cost == pytest.approx(data.costs[3, 1])  # chat: logged with the upstream's cost


def test_python_api(deployed):
    from ray import serve

    from banditroute.serve.client import RouterClient
    from banditroute.serve.protocol import RequestError

    client = RouterClient(APP)
    out = client.route_sync("hello from a task", candidates=["small-model"], mode="greedy")
    assert out["model"] == "small-model" and out["probability"] == 1.0
    with pytest.raises(RequestError) as info:
        client.route_sync("x", candidates=["gpt-99"])
    assert info.value.field == "candidates"
    results = asyncio.run(client.route_batch(["a", "b"], mode="greedy"))
    assert len(results) == 2 and all(r["probability"] == 1.0 for r in results)
    out = serve.get_app_handle(APP).handle_route.remote({"prompt": "via the ingress"}).result()
    assert out["decision_id"] and out["model"] in ("big-model", "mid-model", "small-model")


def test_weights_refresh_from_parameter_server(deployed):
    """Replicas start before the ParameterServer exists (they retry), then pick up a published version."""
    import ray

    from banditroute.learner.param_server import get_or_create_parameter_server
    from banditroute.core.records import WeightsSnapshot
    from banditroute.serve.testing import hashing_policy

    c = deployed["client"]
    ps = get_or_create_parameter_server(deployed["ps_name"], namespace=PS_NAMESPACE)
    target = max(ray.get(ps.latest_version.remote()), c.get("/healthz").json()["policy_version"]) + 5
    new = hashing_policy(("big-model", "mid-model", "small-model"), seed=11)
    ray.get(ps.publish.remote(WeightsSnapshot(policy_version=target, state=new.state())))

    def both_replicas_on_target():
        versions = ray.get(ps.replica_versions.remote())
        return versions if len(versions) == 2 and all(v == target for v in versions.values()) else None

    versions = wait_until(both_replicas_on_target, 30, what=f"both replicas on v{target}")
    answers = [route(c, {"prompt": f"after swap {i}"}) for i in range(12)]
    assert all(a["policy_version"] == target for a in answers)
    assert {a["replica_id"] for a in answers} <= set(versions)
    assert c.get("/healthz").json()["policy_version"] == target
    # the new weights decide: greedy answers match a local core holding the same weights
    from banditroute.serve.core import RouteRequest, RouterCore

    ref = RouterCore(hashing_policy(("big-model", "mid-model", "small-model"), seed=11))
    served = route(c, {"prompt": "check weights", "mode": "greedy"})["probabilities"]
    local = ref.route_batch([RouteRequest("check weights", 0.3, None, "greedy")])[0].probabilities
    assert served == pytest.approx(local, abs=1e-5)


def test_router_deployment_in_local_testing_mode(tmp_path):
    """The Router's decide-and-log logic, in-process (no replicas, no HTTP).

    Ray 2.60's @serve.batch calls serve.get_replica_context() when its queue is
    created, which local testing mode does not provide, so the batched ``route``
    is covered over HTTP above; here: route_many, log and info.
    """
    from ray import serve

    from banditroute.core.config import to_dict
    from banditroute.serve.router import Router
    from banditroute.serve.config import load_router_config
    from banditroute.serve.core import RouteRequest
    from banditroute.serve.decision_sinks import read_decisions
    from banditroute.serve.testing import write_fixture

    policy_path, _ = write_fixture(tmp_path, n=8)
    cfg = load_router_config(None, {"policy": str(policy_path), "max_batch_size": 4,
                                    "decision_sink_options": {"path": str(tmp_path / "log")}})
    handle = serve.run(Router.bind(to_dict(cfg)), name="local-router", _local_testing_mode=True)
    reqs = [RouteRequest(f"p{i}", 0.2, ["mid-model", "small-model"], "explore") for i in range(6)]
    reqs.append(RouteRequest("p", 0.2, ["nope"], "explore"))
    reqs.append(RouteRequest("deferred", 0.9, None, "greedy", log=False))
    outs = handle.route_many.remote(reqs).result()
    assert all("response" in o for o in outs[:6]) and {o["response"]["model"] for o in outs[:6]} <= {"mid-model", "small-model"}
    assert outs[6]["error"]["field"] == "candidates" and outs[6]["error"]["status"] == 422
    logged = {d.decision_id for d in read_decisions(tmp_path / "log")}
    assert logged == {o["response"]["decision_id"] for o in outs[:6]}
    handle.log.remote([outs[7]["result"]], [0.125]).result()
    last = read_decisions(tmp_path / "log")[-1]
    assert last.decision_id == outs[7]["response"]["decision_id"] and last.upstream_cost == 0.125 and last.mode == "greedy"
    info = handle.info.remote().result()
    assert info["models"] == ["big-model", "mid-model", "small-model"] and info["default_mode"] == "explore"


def test_build_app_from_string_args(tmp_path):
    """`serve run banditroute.cluster.app:build_app router.policy=... router.num_replicas=2` passes strings."""
    from banditroute.cluster.app import build_app
    from banditroute.serve.testing import write_fixture

    policy_path, data_path = write_fixture(tmp_path, n=8)
    args = {"router.policy": str(policy_path), "router.num_replicas": "2", "router.max_batch_size": "32",
            "router.replay.enabled": "true", "router.replay.data_path": str(data_path), "router.num_gpus": "0"}
    # The default placement (auto) decides inline for the fixture's hashing encoder on CPU: the ingress
    # replicas decide, with the deciding replicas' count, resources and live batching knobs.
    ingress = build_app(args)._bound_deployment
    assert ingress.name == "RouterIngress" and ingress.init_args[0] is None  # no Router handle
    assert ingress._deployment_config.num_replicas == 2
    assert ingress._deployment_config.user_config == {"max_batch_size": 32, "batch_wait_timeout_s": 0.002}
    assert ingress.ray_actor_options["num_gpus"] == 0.0
    assert ingress.init_args[1]._bound_deployment.name == "ReplayUpstream"
    # placement replica (strings too): RouterIngress over a Router deployment that decides
    ingress = build_app(dict(args, **{"router.placement": "replica"}))._bound_deployment
    router = ingress.init_args[0]._bound_deployment
    assert (ingress.name, router.name) == ("RouterIngress", "Router")
    assert router._deployment_config.num_replicas == 2 and ingress._deployment_config.num_replicas == 1
    assert router._deployment_config.user_config == {"max_batch_size": 32, "batch_wait_timeout_s": 0.002}
    assert router.ray_actor_options["num_gpus"] == 0.0
    assert ingress.init_args[1]._bound_deployment.name == "ReplayUpstream"
    with pytest.raises(ValueError, match="num_replicas"):
        build_app({"router": {"policy": str(policy_path), "num_replicas": "0"}})


def test_usage_cost_and_admin_pin_body():
    """Pure helpers of the chat proxy and the admin API."""
    from banditroute.serve.admin import parse_pin_body
    from banditroute.serve.openai_proxy import usage_cost
    from banditroute.serve.protocol import RequestError

    assert usage_cost({"usage": {"cost_usd": 0.25, "cost": 9}}) == 0.25 and usage_cost({"usage": {"total_cost": 1}}) == 1.0
    assert usage_cost({"usage": {"cost": True}}) is None and usage_cost({"usage": None}) is None and usage_cost([1]) is None
    assert parse_pin_body({"version": 3}) == (3, None) and parse_pin_body({"checkpoint": "s3://b/ckpt"}) == (None, "s3://b/ckpt")
    for body, field in (({"version": -1}, "version"), ({"version": True}, "version"), ({"version": 1, "checkpoint": "x"}, "version"),
                        ([], "version"), ({"checkpoint": " "}, "checkpoint"), ({"checkpoint": "x" * 2049}, "checkpoint")):
        with pytest.raises(RequestError) as info:
            parse_pin_body(body)
        assert info.value.status == 422 and info.value.field == field
