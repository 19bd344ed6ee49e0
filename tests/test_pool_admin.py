"""The pool admin API (serve/pool_admin.py): changes persisted as registry versions, every bad input a 4xx naming the field."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.model_registry import ModelRegistry
from banditroute.serve.pool_admin import PoolAdmin
from banditroute.serve.protocol import RequestError
from banditroute.testkit.identity import quiz_rows, tiny_identity_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return tiny_identity_checkpoint(tmp_path / "identity")


def run(coro):
    return asyncio.run(coro)


def refused(coro) -> RequestError:
    with pytest.raises(RequestError) as info:
        run(coro)
    return info.value


def test_add_reprice_remove_are_new_registry_versions_that_a_serving_policy_picks_up(ckpt):
    served = IdentityPolicy.load(ckpt)  # a replica: default registry refresh (0.5 s)
    admin = PoolAdmin(str(ckpt))
    v0 = run(admin.list())["registry_version"]
    added = run(admin.add({"name": "newcomer", "price": 0.002, "quiz": quiz_rows(12)}))
    assert added["registry_version"] == v0 + 1 and added["n_observations"] == 12
    assert ModelRegistry.load(ckpt / "registry.json").get("newcomer").price == 0.002  # persisted
    deadline = time.monotonic() + 1.0
    while "newcomer" not in served.models and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "newcomer" in served.models  # within a second
    assert run(admin.set_price("newcomer", {"price": 0.02}))["registry_version"] == v0 + 2
    assert run(admin.remove("medium"))["registry_version"] == v0 + 3
    listed = run(admin.list())
    assert {m["name"] for m in listed["models"]} == {"small", "large", "newcomer"}
    assert next(m for m in listed["models"] if m["name"] == "newcomer")["fresh"] is True
    time.sleep(0.6)
    assert served.models == ["small", "large", "newcomer"] and served.registry.prices()["newcomer"] == 0.02


def test_add_chooses_an_adaptive_quiz_among_the_answers_and_accepts_a_ready_identity(ckpt):
    admin = PoolAdmin(str(ckpt))
    out = run(admin.add({"name": "m1", "price": 0.001, "quiz": quiz_rows(30), "quiz_size": 10}))
    assert out["n_observations"] == 10
    out = run(admin.add({"name": "m2", "price": 0.0, "identity": {"mu": [0.1, 0.2], "sigma": [0.5, 0.5], "n_observations": 40}}))
    assert out["identity"]["mu"] == [0.1, 0.2]
    # re-onboarding needs replace
    assert refused(admin.add({"name": "m2", "price": 0.0, "quiz": quiz_rows(6)})).status == 409
    run(admin.add({"name": "m2", "price": 0.0, "quiz": quiz_rows(6), "replace": True}))


def test_add_runs_the_quiz_through_the_models_upstream(ckpt):
    asked = []

    class FakeRunner:  # the QuizRunner seam: the upstream answers, the scorer scores
        def __init__(self, base_url, model, scorer, api_key_env=None):
            self.model = model

        def run(self, prompts, sample_ids=None):
            asked.extend(prompts)
            return np.linspace(0.2, 1.0, len(prompts)).astype(np.float32)

    admin = PoolAdmin(str(ckpt), quiz_runner=FakeRunner)
    prompts = [{"prompt": r["prompt"], "sample_id": f"s{i}"} for i, r in enumerate(quiz_rows(20))]
    out = run(admin.add({"name": "live", "price": 0.001, "upstream": {
        "base_url": "http://upstream.invalid/v1", "prompts": prompts, "quiz_size": 8, "scorer": "replay"}}))
    assert out["n_observations"] == 8 and len(asked) == 8


@pytest.mark.parametrize("body, status, field", [
    ({"name": "x", "price": -1.0, "quiz": quiz_rows(6)}, 422, "price"),
    ({"name": "x", "price": float("nan"), "quiz": quiz_rows(6)}, 422, "price"),
    ({"name": "x", "price": "cheap", "quiz": quiz_rows(6)}, 422, "price"),
    ({"name": "x", "quiz": quiz_rows(6)}, 422, "price"),
    ({"name": "", "price": 0.1, "quiz": quiz_rows(6)}, 422, "name"),
    ({"name": "a|b", "price": 0.1, "quiz": quiz_rows(6)}, 422, "name"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(3)}, 422, "quiz"),
    ({"name": "x", "price": 0.1, "quiz": "all good"}, 422, "quiz"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6)[:5] + [{"prompt": "p", "score": 1.5}]}, 422, "quiz[5].score"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6)[:5] + [{"prompt": "", "score": 1.0}]}, 422, "quiz[5].prompt"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6)[:5] + [{"question": "p", "score": 1.0}]}, 422, "quiz[5]"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6), "quiz_size": 9}, 422, "quiz_size"),
    ({"name": "x", "price": 0.1}, 422, "quiz"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6), "identity": {}}, 422, "quiz"),
    ({"name": "x", "price": 0.1, "identity": {"mu": [0.0], "sigma": [1.0, 1.0]}}, 422, "identity.mu"),
    ({"name": "x", "price": 0.1, "identity": {"mu": [0.0, 0.0], "sigma": [1.0, -1.0]}}, 422, "identity.sigma[1]"),
    ({"name": "x", "price": 0.1, "upstream": {"base_url": "ftp://x", "prompts": []}}, 422, "upstream.base_url"),
    ({"name": "x", "price": 0.1, "quiz": quiz_rows(6), "colour": "red"}, 422, "colour"),
    ({"name": "small", "price": 0.1, "quiz": quiz_rows(6)}, 409, "name"),
    ([1, 2], 422, "body"),
])
def test_bad_adds_are_refused_naming_the_field_and_change_nothing(ckpt, body, status, field):
    admin = PoolAdmin(str(ckpt))
    before = ModelRegistry.load(ckpt / "registry.json")
    err = refused(admin.add(body))
    assert (err.status, err.field) == (status, field), err.message
    after = ModelRegistry.load(ckpt / "registry.json")
    assert after.version == before.version and after.models == before.models


@pytest.mark.parametrize("name, body, status, field", [
    ("nobody", {"price": 0.1}, 404, "name"),
    ("small", {"price": -0.5}, 422, "price"),
    ("small", {"price": float("inf")}, 422, "price"),
    ("small", {"price": True}, 422, "price"),
    ("small", {}, 422, "price"),
    ("small", {"price": 0.1, "mu": [1]}, 422, "price"),
])
def test_bad_price_changes_are_refused_naming_the_field(ckpt, name, body, status, field):
    err = refused(PoolAdmin(str(ckpt)).set_price(name, body))
    assert (err.status, err.field) == (status, field)
    assert ModelRegistry.load(ckpt / "registry.json").prices()["small"] == 0.0002


def test_removing_an_unknown_or_the_last_model_is_refused(ckpt):
    admin = PoolAdmin(str(ckpt))
    assert (refused(admin.remove("nobody")).status, refused(admin.remove("nobody")).field) == (404, "name")
    run(admin.remove("small"))
    run(admin.remove("medium"))
    err = refused(admin.remove("large"))
    assert (err.status, err.field) == (409, "name")


def test_fixed_pool_policies_answer_409_naming_the_policy(tmp_path):
    from banditroute.serve.testing import hashing_policy

    barp = hashing_policy()
    barp.save(tmp_path / "barp")
    for admin in (PoolAdmin(str(tmp_path / "barp")), PoolAdmin(None)):
        err = refused(admin.set_price(barp.models[0], {"price": 0.1}))
        assert (err.status, err.field) == (409, "policy") and "fixed pool" in err.message
