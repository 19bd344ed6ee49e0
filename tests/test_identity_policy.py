"""The identity policy: any candidate set, permutation invariance, live registry and prices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from banditroute.core.data import RoutingData
from banditroute.core.records import WeightsSnapshot
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.checkpoint import checkpoint_kind, load_policy
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.identity_policy import CandidateSetError, IdentityNetworkConfig, IdentityPolicy
from banditroute.policy.identity_train import IdentityTrainConfig, train_identity_policy
from banditroute.policy.irt import IrtConfig
from banditroute.policy.model_registry import ModelRegistry, RegistryError, UnknownModelError

TASK_WORDS = {
    "math": "add sum integer divide multiply fraction equation number solve algebra".split(),
    "code": "python function return list loop string variable class import def".split(),
    "trivia": "capital river country painter novel year king ocean planet city".split(),
}
# per-task accuracy and USD per call of each model
SKILL = {
    "tiny": ({"math": 0.25, "code": 0.2, "trivia": 0.6}, 0.0001),
    "coder": ({"math": 0.5, "code": 0.9, "trivia": 0.4}, 0.0006),
    "mid": ({"math": 0.6, "code": 0.55, "trivia": 0.7}, 0.0008),
    "big": ({"math": 0.92, "code": 0.9, "trivia": 0.92}, 0.006),
    "newcomer": ({"math": 0.9, "code": 0.85, "trivia": 0.9}, 0.001),
}


def make_data(n=240, seed=0, models=("tiny", "coder", "mid", "big", "newcomer")) -> RoutingData:
    """Text prompts of three tasks; Bernoulli scores from each model's per-task skill."""
    rng = np.random.default_rng(seed)
    tasks = list(TASK_WORDS)
    eval_names = np.array([tasks[i % 3] for i in range(n)])
    prompts = [
        f"question {i}: " + " ".join(rng.choice(TASK_WORDS[t], size=8)) + f" ? id{i}" for i, t in enumerate(eval_names)
    ]
    scores = np.zeros((n, len(models)), np.float32)
    costs = np.zeros((n, len(models)))
    for k, m in enumerate(models):
        skill, price = SKILL[m]
        p = np.array([skill[t] for t in eval_names])
        scores[:, k] = rng.random(n) < p
        costs[:, k] = price * rng.uniform(0.8, 1.2, size=n)
    return RoutingData(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        prompts=prompts,
        eval_names=eval_names,
        models=tuple(models),
        scores=scores,
        costs=costs,
        source="synthetic",
    )


def embed(data: RoutingData) -> tuple[np.ndarray, str, EncoderConfig]:
    from banditroute.policy.encoders import embed_prompts

    enc = EncoderConfig(name="hashing", dim=64)
    emb, enc_id = embed_prompts(data.prompts, enc, cache_dir=None)
    return emb, enc_id, enc


def small_config(**kw) -> IdentityTrainConfig:
    cfg = IdentityTrainConfig(
        epochs=4,
        batch_size=64,
        irt=IrtConfig(dim=2, steps=150, identity_steps=120),
        network=IdentityNetworkConfig(hidden_dim=32, prompt_dim=16, preference_dim=8, attention_heads=2),
        quiz_bank_size=2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained():
    data = make_data().select_models(["tiny", "coder", "mid", "big"])
    emb, enc_id, enc = embed(data)
    policy, env, history = train_identity_policy(data, emb, small_config(), enc, enc_id)
    return policy, data, emb


def fresh(policy: IdentityPolicy) -> IdentityPolicy:
    """The same weights with a detached copy of the registry (tests may mutate it)."""
    return IdentityPolicy(policy.meta, policy.registry.copy(), network=policy.network)


def test_training_uses_bandit_feedback_only():
    data = make_data(n=90).select_models(["tiny", "mid", "big"])
    emb, enc_id, enc = embed(data)
    policy, env, history = train_identity_policy(data, emb, small_config(epochs=2), enc, enc_id)
    log = env.log_frame()
    assert len(log) == 2 * len(data)  # one revealed outcome per prompt per epoch
    assert set(log.columns) >= {"row", "action", "propensity", "reward"}
    assert ((log["propensity"] > 0) & (log["propensity"] <= 1)).all()
    assert policy.models == ["tiny", "mid", "big"]
    assert policy.meta.kind == "identity" and len(history) == 2


def test_permutation_invariance(trained):
    policy, data, emb = trained
    names = policy.models
    rng = np.random.default_rng(0)
    for w in (0.0, 0.3, 0.8):
        base = policy.probabilities(emb[:16], w, names)
        for _ in range(3):
            shuffled = list(rng.permutation(names))
            again = policy.probabilities(emb[:16], w, shuffled)
            for m in names:
                np.testing.assert_allclose(again[m], base[m], atol=1e-5)
        # a subset, in two orders: same probabilities for its members, summing to 1
        sub = policy.probabilities(emb[:16], w, [names[2], names[0]])
        sub2 = policy.probabilities(emb[:16], w, [names[0], names[2]])
        for m in (names[0], names[2]):
            np.testing.assert_allclose(sub[m], sub2[m], atol=1e-5)
        np.testing.assert_allclose(sub[names[0]] + sub[names[2]], 1.0, atol=1e-5)


def test_any_number_of_candidates_and_masks(trained):
    policy, data, emb = trained
    k = len(policy.models)
    single = policy.probabilities(emb[:4], 0.5, ["mid"])
    np.testing.assert_allclose(single["mid"], 1.0)
    cands = [["tiny"], ["big", "coder"], None, list(reversed(policy.models))]
    mask = policy.candidate_mask(cands, 4)
    assert mask.shape == (4, k)
    dec = policy.decide(emb[:4], 0.2, mask)
    assert dec.probabilities.shape == (4, k)
    assert dec.models == policy.models
    assert policy.models[dec.actions[0]] == "tiny"
    assert policy.models[dec.actions[1]] in ("big", "coder")
    np.testing.assert_allclose(dec.probabilities.sum(1), 1.0, atol=1e-5)
    assert dec.probabilities[1, policy.models.index("mid")] == 0.0
    explored = policy.decide(emb[:4], np.array([0.0, 0.3, 0.6, 0.9]), mask, explore=True, generator=torch.Generator().manual_seed(0))
    assert ((explored.propensities > 0) & (explored.propensities <= 1)).all()


def test_bad_candidate_sets_are_clear_errors(trained):
    policy, data, emb = trained
    with pytest.raises(CandidateSetError, match="empty candidate set"):
        policy.candidate_mask([[]], 1)
    with pytest.raises(CandidateSetError, match="empty candidate set"):
        policy.probabilities(emb[:1], 0.5, [])
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-9'") as info:
        policy.candidate_mask([["mid", "gpt-9"]], 1)
    assert isinstance(info.value, KeyError)  # same contract as BarpPolicy.candidate_mask
    with pytest.raises(CandidateSetError, match="empty candidate set"):
        policy.decide(emb[:2], 0.5, np.zeros((2, len(policy.models)), bool))
    with pytest.raises(CandidateSetError, match="columns"):
        policy.decide(emb[:2], 0.5, np.ones((2, len(policy.models) + 1), bool))
    with pytest.raises(ValueError, match="width"):
        policy.decide(np.zeros((1, 7), np.float32), 0.5)


def test_new_model_is_routable_at_once_without_retraining(trained):
    policy = fresh(trained[0])
    _, data, emb = trained
    weights_before = {k: v.clone() for k, v in policy.network.state_dict().items()}
    strong = policy.registry.get("big")
    policy.registry.add("big-but-free", 0.0, strong.mu, strong.sigma, n_observations=30)
    assert policy.models[-1] == "big-but-free"
    dec = policy.decide(emb[:50], 0.5)
    picked = [policy.models[a] for a in dec.actions]
    # same quality as 'big', no cost: it should take most of the traffic at a balanced preference
    assert picked.count("big-but-free") > 25
    for k, v in policy.network.state_dict().items():
        assert torch.equal(v, weights_before[k])
    policy.registry.retire("big-but-free")
    assert "big-but-free" not in policy.models


def test_price_change_flips_the_decision(trained):
    policy = fresh(trained[0])
    _, data, emb = trained
    w = 0.3
    before = [policy.models[a] for a in policy.decide(emb[:60], w).actions]
    top = max(set(before), key=before.count)
    old_price = policy.registry.get(top).price
    policy.registry.set_price(top, old_price * 1000)  # the favourite becomes very expensive
    after = [policy.models[a] for a in policy.decide(emb[:60], w).actions]
    assert after.count(top) < before.count(top) / 2, (top, before.count(top), after.count(top))
    policy.registry.set_price(top, old_price)
    assert [policy.models[a] for a in policy.decide(emb[:60], w).actions] == before
    # and the other way round: making an expensive strong model cheap attracts traffic
    base = [policy.models[a] for a in policy.decide(emb[:60], 0.6).actions].count("big")
    policy.registry.set_price("big", 0.0)
    assert [policy.models[a] for a in policy.decide(emb[:60], 0.6).actions].count("big") > base


def test_registry_rejects_bad_changes_atomically(trained, tmp_path):
    reg = trained[0].registry.copy()
    reg.save(tmp_path / "registry.json")
    snapshot = json.loads((tmp_path / "registry.json").read_text())["models"]
    prices = reg.prices()
    for bad in (-0.001, float("nan"), float("inf"), None, "cheap", True):
        with pytest.raises(RegistryError, match="price"):
            reg.set_price("mid", bad)
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        reg.set_price("nope", 0.1)
    with pytest.raises(UnknownModelError):
        reg.set_prices({"mid": 0.5, "nope": 0.1})  # all or nothing
    with pytest.raises(RegistryError):
        reg.set_prices({"mid": 0.5, "tiny": -1})
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("mid", 0.1, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(RegistryError, match="2 dimensions"):
        reg.add("other", 0.1, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(RegistryError, match="std"):
        reg.add("other", 0.1, [0.0, 0.0], [1.0, -1.0])
    with pytest.raises(RegistryError, match="missing price"):
        reg.add("other", None, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(RegistryError, match="non-empty"):
        reg.add("", 0.1, [0.0, 0.0], [1.0, 1.0])
    assert reg.prices() == prices and "other" not in reg.all_models
    assert json.loads((tmp_path / "registry.json").read_text())["models"] == snapshot
    # a good change persists
    reg.set_price("mid", 0.002)
    stored = {m["name"]: m["price"] for m in json.loads((tmp_path / "registry.json").read_text())["models"]}
    assert stored["mid"] == 0.002


def test_price_config_file_and_refresh_from_another_writer(trained, tmp_path):
    reg = trained[0].registry.copy()
    reg.save(tmp_path / "registry.json")
    other = ModelRegistry.load(tmp_path / "registry.json")
    (tmp_path / "prices.yaml").write_text("prices:\n  mid: 0.0123\n  tiny: 0.0\n")
    assert other.apply_price_config(tmp_path / "prices.yaml") == {"mid": 0.0123, "tiny": 0.0}
    assert reg.get("mid").price != 0.0123
    assert reg.refresh() is True
    assert reg.get("mid").price == 0.0123 and reg.get("tiny").price == 0.0
    assert reg.refresh() is False
    (tmp_path / "bad.yaml").write_text("prices:\n  mid: -1\n")
    with pytest.raises(RegistryError):
        other.apply_price_config(tmp_path / "bad.yaml")
    assert ModelRegistry.load(tmp_path / "registry.json").get("mid").price == 0.0123


def test_mask_survives_a_registry_change(trained):
    policy = fresh(trained[0])
    _, data, emb = trained
    mask = policy.candidate_mask([["mid", "tiny"]], 1)
    e = policy.registry.get("big")
    policy.registry.add("late", 0.0, e.mu, e.sigma)  # added between mask and decision
    dec = policy.decide(emb[:1], 0.5, mask)
    assert dec.models[-1] == "late" and dec.models[dec.actions[0]] in ("mid", "tiny")


def test_save_load_state_round_trip_and_dispatch(trained, tmp_path):
    policy = fresh(trained[0])
    _, data, emb = trained
    path = policy.save(tmp_path / "identity")
    assert checkpoint_kind(path) == "identity"
    loaded = load_policy(path)
    assert isinstance(loaded, IdentityPolicy) and loaded.models == policy.models
    np.testing.assert_allclose(loaded.decide(emb[:8], 0.4).probabilities, policy.decide(emb[:8], 0.4).probabilities, atol=1e-6)
    assert loaded.meta.encoder_id == policy.meta.encoder_id and loaded.tau == policy.tau
    # live price change through the loaded policy's registry is persisted beside the weights
    loaded.registry.set_price("mid", 0.05)
    assert load_policy(path).registry.get("mid").price == 0.05
    # snapshots for replicas
    replica = IdentityPolicy.from_state(policy.state())
    np.testing.assert_allclose(replica.logits(emb[:4], 0.2).numpy(), policy.logits(emb[:4], 0.2).numpy(), atol=1e-6)
    replica.load_weights(WeightsSnapshot(7, policy.state()))
    assert replica.policy_version == 7
    # BaRP checkpoints still load as BarpPolicy (kind defaults to 'barp')
    barp = BarpPolicy(PolicyMeta(models=["a", "b"], tau=1.0, embed_dim=4, network=NetworkConfig(hidden_dim=8)))
    bpath = barp.save(tmp_path / "barp")
    assert json.loads((bpath / "meta.json").read_text())["kind"] == "barp"
    meta = json.loads((bpath / "meta.json").read_text())
    del meta["kind"]  # a checkpoint written before the field existed
    (bpath / "meta.json").write_text(json.dumps(meta))
    assert isinstance(load_policy(bpath), BarpPolicy)
    with pytest.raises(ValueError, match="not an identity policy"):
        IdentityPolicy.load(bpath)


def test_logits_accept_device_tensors_like_routing_policy(trained):
    policy, data, emb = trained
    k = len(policy.models)
    emb_t = torch.as_tensor(emb[:3])
    mask = torch.ones(3, k, dtype=torch.bool)
    mask[0, 1:] = False
    logits = policy.logits(emb_t, torch.tensor([0.1, 0.5, 0.9]), mask)
    assert logits.shape == (3, k) and torch.isinf(logits[0, 1:]).all()
    np.testing.assert_allclose(logits[1:].numpy(), policy.logits(emb[1:3], np.array([0.5, 0.9])).numpy(), atol=1e-5)
    with pytest.raises(CandidateSetError):
        policy.logits(emb_t, 0.5, torch.zeros(3, k, dtype=torch.bool))


def test_serving_core_routes_an_identity_policy_over_a_changing_pool(trained):
    """The replica's inference core takes the identity policy as is: a model added
    to the registry is offered and chosen by the next batch, no retraining, no restart."""
    from banditroute.serve.core import RouteRequest, RouterCore

    policy = fresh(trained[0])
    _, data, _ = trained
    core = RouterCore(policy, seed=0)
    before = core.route_batch([RouteRequest(p, 0.5, None, "greedy") for p in data.prompts[:40]])
    assert all(r.ok for r in before) and "big-but-free" not in before[0].probabilities
    strong = policy.registry.get("big")
    # an established identity (>= fresh_models.min_observations): a fresh one would be capped (test_fresh_models.py)
    policy.registry.add("big-but-free", 0.0, strong.mu, strong.sigma, n_observations=300)
    after = core.route_batch([RouteRequest(p, 0.5, ["big", "big-but-free"], "greedy") for p in data.prompts[:40]])
    assert all(set(r.probabilities) == {"big", "big-but-free"} for r in after)
    assert sum(r.model == "big-but-free" for r in after) > 30
