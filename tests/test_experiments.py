"""Experiments, shadow mode, tenants on decisions, and latency per stage (issue 16), without a cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from banditroute.cluster.config import app_config_from_dict
from banditroute.core.config import ConfigError
from banditroute.core.records import DECISION_SCHEMA, decisions_from_table, decisions_to_table
from banditroute.policy.experiments import ArmConfig, ExperimentConfig, assign_arm, bucket, experiment_report
from banditroute.policy.reward import reward
from banditroute.serve.core import RouterCore, decision_batch
from banditroute.serve.experiments import parse_shadow, parse_user
from banditroute.serve.protocol import RequestError, RouteRequest
from banditroute.serve.stages import STAGES, StageClock, incoming_trace_context, inject_trace_context
from banditroute.serve.testing import hashing_policy

MODELS = ("big-model", "mid-model", "small-model")
AB = ExperimentConfig("router-vs-small", [ArmConfig("router", 0.5), ArmConfig("fixed", 0.5, model="small-model")])


def test_assignment_is_sticky_and_follows_the_weights():
    exp = ExperimentConfig("e", [ArmConfig("a", 0.2), ArmConfig("b", 0.8)])
    keys = [f"user-{i}" for i in range(4000)]
    first = [assign_arm(exp, k).name for k in keys]
    assert first == [assign_arm(exp, k).name for k in keys]  # sticky
    assert first.count("a") / len(keys) == pytest.approx(0.2, abs=0.03)
    # independent across experiments: another name reshuffles the same keys
    other = ExperimentConfig("f", exp.arms)
    assert np.corrcoef([bucket("e", k) for k in keys], [bucket(other.name, k) for k in keys])[0, 1] < 0.1


def test_experiments_section_loads_into_the_router_and_is_validated():
    arms = [{"name": "router", "weight": 0.5}, {"name": "fixed", "weight": 0.5, "model": "mistralai/mistral-7b-chat"}]
    app = app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [{"name": "router-vs-mistral", "arms": arms}]})
    assert app.router.experiments == app.experiments
    assert app.router.experiments[0].arms[1].model == "mistralai/mistral-7b-chat"
    with pytest.raises(ConfigError, match=r"experiments.e.arms\[0\].weight"):
        app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [{"name": "e", "arms": [{"name": "a", "weight": 0}, {"name": "b"}]}]})
    with pytest.raises(ConfigError, match="at least two arms"):
        app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [{"name": "e", "arms": [{"name": "a"}]}]})
    with pytest.raises(ConfigError, match="duplicate arm"):
        app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [{"name": "e", "arms": [{"name": "a"}, {"name": "a"}]}]})


def test_fixed_arm_serves_its_model_with_propensity_one_and_logs_the_router_choice():
    core = RouterCore(hashing_policy(MODELS, seed=1), seed=0)
    core.experiments = [AB]
    reqs = [RouteRequest(f"prompt {i}", 0.3, None, "explore") for i in range(400)]
    res = core.route_batch(reqs)
    arms = [r.decision.arm for r in res]
    assert set(arms) == {"router", "fixed"} and 0.35 < arms.count("fixed") / len(arms) < 0.65
    for r in res:
        d = r.decision
        assert d.experiment == "router-vs-small"
        if d.arm == "fixed":
            assert d.chosen_model == "small-model" and d.probability == 1.0 and d.override == "experiment"
            assert d.router_model in MODELS and 0 < d.router_probability <= 1
            assert r.response()["arm"] == "fixed" and r.response()["router_model"] == d.router_model
        else:
            assert d.override == "" and d.router_model is None
            assert d.probability == pytest.approx(r.probabilities[d.chosen_model])
    # sticky by the user key: every request of one user lands in one arm
    same = core.route_batch([RouteRequest(f"p{i}", 0.3, None, "explore", user="alice") for i in range(20)])
    assert len({r.decision.arm for r in same}) == 1
    # a fixed arm that cannot serve the request (model not a candidate) does not enrol it
    narrowed = core.route_batch([RouteRequest("q", 0.3, ["big-model"], "explore", user="u1")])[0].decision
    assert narrowed.experiment == "" and narrowed.chosen_model == "big-model"
    # the new columns survive the decision log's Arrow batch
    back = decisions_from_table(decision_batch(res))
    assert [(d.arm, d.override, d.router_model) for d in back] == [(r.decision.arm, r.decision.override, r.decision.router_model) for r in res]


def test_shadow_and_tenant_are_logged_next_to_the_router_choice():
    core = RouterCore(hashing_policy(MODELS, seed=1), seed=0)
    res = core.route_batch([RouteRequest("hello", 0.5, None, "explore", shadow_model="mid-model", tenant="acme"),
                            RouteRequest("hello", 0.5, ["big-model"], "explore", shadow_model="mid-model")])
    d = res[0].decision
    assert (d.chosen_model, d.probability, d.override, d.tenant) == ("mid-model", 1.0, "shadow", "acme")
    assert d.router_model in MODELS and d.router_probability == pytest.approx(res[0].probabilities[d.router_model])
    assert not res[1].ok and res[1].error["field"] == "model" and res[1].error["status"] == 422


def test_old_decision_logs_read_back_with_default_columns():
    core = RouterCore(hashing_policy(MODELS, seed=1), seed=0)
    table = decisions_to_table([core.route_batch([RouteRequest("x", 0.1)])[0].decision])
    new_cols = {"override", "router_model", "router_probability", "experiment", "arm", "tenant"}
    old = table.select([f.name for f in DECISION_SCHEMA if f.name not in new_cols])
    (d,) = decisions_from_table(old)
    assert (d.override, d.experiment, d.arm, d.tenant, d.router_model) == ("", "", "", "", None)


def test_experiment_report_counts_rewards_and_shares():
    rng = np.random.default_rng(0)
    decisions, events = [], []
    for i in range(600):
        arm = "fixed" if i % 2 else "router"
        model = "small-model" if arm == "fixed" else ["big-model", "mid-model"][i % 4 // 2]
        row = {"decision_id": f"d{i}", "chosen_model": model, "served_model": None, "experiment": "router-vs-small", "arm": arm}
        decisions.append(row)
        if i < 500:
            events.append(dict(row, score=float(rng.uniform()), cost=0.001, w_cost=0.2))
    events.append(dict(events[0]))  # a duplicate event row counts once
    decisions.append({"decision_id": "x", "chosen_model": "big-model", "served_model": None, "experiment": "", "arm": ""})
    out = experiment_report([AB], decisions, events, tau=0.01)["experiments"]
    assert [e["name"] for e in out] == ["router-vs-small"]
    router, fixed = out[0]["arms"]
    assert (router["name"], router["decisions"], router["rewards"]) == ("router", 300, 250)
    assert fixed["models"] == {"small-model": 1.0} and router["models"] == {"big-model": 0.5, "mid-model": 0.5}
    r = [float(reward(e["score"], e["cost"], e["w_cost"], 0.01)) for e in events[:-1] if e["arm"] == "fixed"]
    assert fixed["mean_reward"] == pytest.approx(np.mean(r))
    lo, hi = fixed["ci95"]
    assert lo < fixed["mean_reward"] < hi and hi - lo == pytest.approx(2 * 1.96 * np.std(r, ddof=1) / np.sqrt(len(r)))
    empty = experiment_report([AB], [], [], 0.01)["experiments"][0]["arms"][0]
    assert empty == {"name": "router", "decisions": 0, "rewards": 0, "mean_reward": None, "ci95": None, "models": {}}


def test_user_and_shadow_fields_are_validated_naming_the_field():
    assert parse_user({"user": "bob"}) == "bob"
    assert parse_user({}, {"x-banditroute-user": "carol"}) == "carol"
    assert parse_user({}) is None
    with pytest.raises(RequestError) as e:
        parse_user({"user": 7})
    assert e.value.field == "user" and e.value.status == 422
    assert parse_shadow({"shadow": True, "model": "mid-model"}, MODELS) == "mid-model"
    assert parse_shadow({}, MODELS) is None
    for body, field in [({"shadow": "yes"}, "shadow"), ({"shadow": True, "model": "gpt-9"}, "model"), ({"model": "mid-model"}, "model")]:
        with pytest.raises(RequestError) as e:
            parse_shadow(body, MODELS)
        assert e.value.field == field


def test_stage_latencies_are_observed_per_batch():
    seen: list[tuple[str, float]] = []
    core = RouterCore(hashing_policy(MODELS, seed=1), seed=0)
    core.stages = StageClock(lambda stage, ms: seen.append((stage, ms)), trace=False)
    core.route_batch([RouteRequest("a", 0.1), RouteRequest("b", 0.9)])
    assert [s for s, _ in seen] == ["encode", "decide"]  # the hashing encoder takes text: no tokenize stage
    assert all(ms >= 0 for _, ms in seen)
    with pytest.raises(ValueError, match="unknown stage"):
        with core.stages.stage("nap"):
            pass
    assert STAGES == ("parse", "tokenize", "encode", "decide", "log", "upstream")


def test_stage_spans_and_trace_context_propagation():
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = sdk.TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    clock = StageClock(trace=False)
    clock._tracer = provider.get_tracer("banditroute")  # a configured provider without touching the global one
    parent_id = "0af7651916cd43dd8448eb211c80319c"
    with incoming_trace_context({"traceparent": f"00-{parent_id}-b7ad6b7169203331-01"}):
        with clock.stage("upstream", model="m"):
            headers = inject_trace_context({})
    (span,) = exporter.get_finished_spans()
    assert span.name == "banditroute.upstream" and span.attributes["model"] == "m"
    assert format(span.context.trace_id, "032x") == parent_id  # the caller's trace continues
    assert headers["traceparent"].split("-")[1] == parent_id  # and is handed to the upstream
    assert trace.get_tracer_provider() is not provider and tracer is not None


class _Remote:
    def __init__(self, value):
        self.value = value

    def remote(self):
        async def answer():
            return self.value
        return answer()


def test_admin_experiments_reads_the_log_with_the_feedback_actors_storage_settings(monkeypatch):
    """The report opens the log with the actor's S3 endpoint and key env-var names, not default settings."""
    import asyncio
    import types

    import ray

    import banditroute.serve.ops_admin as ops_admin
    from banditroute.core.storage import StorageConfig
    from banditroute.serve.config import RouterConfig

    s3 = {"uri": "s3://bucket/run", "endpoint_url": "http://127.0.0.1:9999", "access_key_id_env": "MINIO_KEY"}
    new_actor = types.SimpleNamespace(log_storage=_Remote(dict(vars(StorageConfig(**s3)))), log_uri=_Remote("s3://bucket/run"))
    old_actor = types.SimpleNamespace(log_uri=_Remote("s3://bucket/old"))  # started before log_storage existed
    seen = []
    monkeypatch.setattr(ops_admin, "read_experiment_rows", lambda storage, since: seen.append(storage) or ([], []))
    cfg = RouterConfig(policy="ckpt", decision_sink="feedback-actor", decision_sink_options={"name": "fb"}, experiments=[AB])
    for actor in (new_actor, old_actor):
        monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None, a=actor: a)
        out = asyncio.run(ops_admin.ExperimentsAdmin(cfg).report({"tau": 0.01}))
        assert out["experiments"][0]["name"] == AB.name
    assert isinstance(seen[0], StorageConfig) and seen[0].endpoint_url == "http://127.0.0.1:9999"
    assert seen[0].access_key_id_env == "MINIO_KEY" and seen[0].uri == "s3://bucket/run"
    assert seen[1] == "s3://bucket/old"
