import json

import numpy as np
import pytest
import torch

from banditroute.core.records import WeightsSnapshot
from banditroute.policy.barp import BarpPolicy, PolicyMeta
from banditroute.policy.base import RoutingPolicy
from banditroute.policy.checkpoint import POLICY_KINDS, load_policy, policy_from_snapshot, policy_from_state
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.exploration import DEFAULT_EXPLORATION_CEILING, DEFAULT_EXPLORATION_FLOOR
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.reward import reward, reward_matrix
from banditroute.policy.train import BanditEnvironment, TrainConfig, train_bandit_policy
from banditroute.testkit.synthetic import make_routing_data

ENC = EncoderConfig(name="hashing", dim=128)


def _embedded(n=150, seed=0):
    data = make_routing_data(n, seed=seed)
    enc = make_encoder(ENC)
    return data, enc.encode(data.prompts), enc.encoder_id


def _mean_reward(policy, data, emb, grid=(0.0, 0.5, 0.9)):
    out = []
    for w in grid:
        actions = policy.decide(emb, np.full(len(data), w)).actions
        r = reward_matrix(data.scores_filled, data.costs, w, policy.tau)
        out.append(r[np.arange(len(data)), actions].mean())
    return float(np.mean(out))


def test_training_beats_random_and_every_single_model():
    data, emb, eid = _embedded(240)
    cfg = TrainConfig(epochs=60, batch_size=32, seed=1)
    policy, env, history = train_bandit_policy(data, emb, cfg, ENC, eid)
    learned = _mean_reward(policy, data, emb)
    singles = []
    for k in range(data.n_models):
        singles.append(np.mean([reward_matrix(data.scores_filled, data.costs, w, policy.tau)[:, k].mean() for w in (0.0, 0.5, 0.9)]))
    assert learned > max(singles) + 0.02, (learned, singles)
    assert history[-1]["mean_reward"] > history[0]["mean_reward"]


def test_trainer_sees_only_bandit_feedback():
    data, emb, eid = _embedded(50)
    policy, env, _ = train_bandit_policy(data, emb, TrainConfig(epochs=2, batch_size=16), ENC, eid)
    log = env.log_frame()
    # exactly one pulled model per prompt per epoch, each with its propensity
    assert len(log) == 2 * len(data)
    assert log.groupby("row").size().eq(2).all()
    assert ((log.propensity > 0) & (log.propensity <= 1)).all()
    # and the revealed reward is that of the pulled model only
    rows, actions = log.row.to_numpy(), log.action.to_numpy()
    expected = reward(data.scores_filled[rows, actions], data.costs[rows, actions], log.w_cost.to_numpy(), policy.tau)
    np.testing.assert_allclose(log.reward, expected)


def test_dial_changes_choice_without_retraining():
    data, emb, eid = _embedded(240)
    policy, _, _ = train_bandit_policy(data, emb, TrainConfig(epochs=60, batch_size=32, seed=2), ENC, eid)
    expensive = data.models.index("expensive")
    share_quality = np.mean(policy.decide(emb, np.zeros(len(data))).actions == expensive)
    share_cost = np.mean(policy.decide(emb, np.full(len(data), 0.9)).actions == expensive)
    assert share_cost < share_quality


def test_candidate_mask_and_explore_probabilities():
    meta = PolicyMeta(models=["a", "b", "c"], tau=1.0, embed_dim=8, encoder=ENC)
    policy = BarpPolicy(meta)
    emb = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    mask = policy.candidate_mask([["a", "c"]] * 64, 64)
    gen = torch.Generator().manual_seed(0)
    dec = policy.decide(emb, np.full(64, 0.3), mask, explore=True, generator=gen)
    assert set(dec.actions.tolist()) <= {0, 2}
    np.testing.assert_allclose(dec.probabilities[:, 1], 0.0)
    np.testing.assert_allclose(dec.probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(dec.propensities, dec.probabilities[np.arange(64), dec.actions], atol=1e-6)
    greedy = policy.decide(emb, np.full(64, 0.3), mask)
    assert (greedy.propensities == 1.0).all()
    np.testing.assert_array_equal(greedy.actions, dec.probabilities.argmax(1))
    with pytest.raises(KeyError):
        policy.candidate_mask([["zzz"]], 1)


def test_checkpoint_round_trip(tmp_path):
    data, emb, eid = _embedded(40)
    policy, _, _ = train_bandit_policy(data, emb, TrainConfig(epochs=2), ENC, eid)
    policy.meta.policy_version = 7
    path = policy.save(tmp_path / "ckpt")
    loaded = BarpPolicy.load(path)
    assert loaded.models == list(data.models) and loaded.tau == policy.tau and loaded.policy_version == 7
    assert loaded.meta.encoder == ENC and loaded.meta.encoder_id == eid
    np.testing.assert_allclose(loaded.decide(emb, 0.4).probabilities, policy.decide(emb, 0.4).probabilities, atol=1e-6)
    # and through the picklable state (the weights snapshot path)
    clone = BarpPolicy.from_state(policy.state())
    np.testing.assert_allclose(clone.decide(emb, 0.4).probabilities, policy.decide(emb, 0.4).probabilities, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        BarpPolicy.load(tmp_path / "missing")


def test_training_explores_within_the_serving_bounds():
    assert (TrainConfig().exploration_floor, TrainConfig().exploration_ceiling) == (DEFAULT_EXPLORATION_FLOOR, DEFAULT_EXPLORATION_CEILING)
    data, emb, eid = _embedded(50)
    cfg = TrainConfig(epochs=3, batch_size=16, exploration_floor=0.2, exploration_ceiling=0.5)
    _, env, _ = train_bandit_policy(data, emb, cfg, ENC, eid)
    log = env.log_frame()  # every pull's propensity is its probability under the bounded distribution
    assert log.propensity.min() >= 0.2 - 1e-6 and log.propensity.max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="train.exploration_floor"):
        TrainConfig(exploration_floor=0.6, exploration_ceiling=0.5).validate()


def test_policies_share_one_interface_and_the_registry_builds_them(tmp_path):
    meta = PolicyMeta(models=["a", "b", "c"], tau=1.0, embed_dim=8, encoder=ENC, policy_version=4)
    policy = BarpPolicy(meta)
    assert isinstance(policy, RoutingPolicy) and POLICY_KINDS["barp"] is BarpPolicy
    assert POLICY_KINDS["identity"] is IdentityPolicy
    state = policy.state()
    assert state["kind"] == "barp" and policy_from_state(state).policy_version == 4
    # the snapshot owns the version: whatever the state's meta says, the policy serves the snapshot's
    served = policy_from_snapshot(WeightsSnapshot(9, state))
    assert isinstance(served, BarpPolicy) and served.policy_version == 9
    assert policy.snapshot(trained_through=3.0).policy_version == 4
    other = BarpPolicy(PolicyMeta(models=["a", "b", "c"], tau=1.0, embed_dim=8, encoder=ENC))
    other.load_weights(WeightsSnapshot(11, state))
    emb = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    assert other.policy_version == 11 and torch.equal(other.logits(emb, 0.3), policy.logits(emb, 0.3))
    # checkpoints keep policy_version in meta.json
    path = served.save(tmp_path / "p")
    assert json.loads((path / "meta.json").read_text())["policy_version"] == 9
    assert load_policy(path).policy_version == 9
    with pytest.raises(ValueError, match="unknown policy kind"):
        policy_from_state({**state, "meta": {**state["meta"], "kind": "nope"}})
