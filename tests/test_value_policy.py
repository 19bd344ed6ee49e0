"""The value-decomposed policy (kind 'value'): its decision maths, its bandit trainer, checkpoints and the CLI."""

import numpy as np
import pytest
import torch
from banditroute.cli import main
from banditroute.core.records import WeightsSnapshot
from banditroute.policy.base import RoutingPolicy
from banditroute.policy.checkpoint import (
    POLICY_KINDS,
    load_policy,
    policy_from_snapshot,
    policy_from_state,
)
from banditroute.policy.decide import decide
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.exploration import ExplorationBounds, bound_probabilities
from banditroute.policy.reward import reward, reward_matrix
from banditroute.policy.train import TrainConfig, train_bandit_policy
from banditroute.policy.value_policy import (
    ValueNetworkConfig,
    ValuePolicy,
    ValuePolicyMeta,
    decision_logits,
    head_rewards,
    thompson_probabilities,
)
from banditroute.policy.value_train import (
    ReplayBuffer,
    ValueTrainConfig,
    train_value_policy,
    value_loss,
)
from banditroute.testkit.synthetic import make_routing_data

ENC = EncoderConfig(name="hashing", dim=128)


def _embedded(n=150, seed=0):
    data = make_routing_data(n, seed=seed)
    enc = make_encoder(ENC)
    return data, enc.encode(data.prompts), enc.encoder_id


def _untrained(k=3, d=8, heads=4, temperature=0.05):
    meta = ValuePolicyMeta(models=["a", "b", "c"][:k], tau=1.0, embed_dim=d, encoder=ENC,
                           network=ValueNetworkConfig(hidden_dim=16, n_heads=heads, temperature=temperature))
    return ValuePolicy(meta)


# --- decision maths -------------------------------------------------------------------------


def test_head_rewards_apply_the_dial_to_each_prediction():
    score = torch.tensor([[[0.9, 0.5]], [[0.9, 0.5]]])  # (B=2, H=1, K=2)
    cost = torch.tensor([[[0.8, 0.1]], [[0.8, 0.1]]])
    r = head_rewards(score, cost, torch.tensor([0.0, 0.5]))
    np.testing.assert_allclose(r.numpy(), [[[0.9, 0.5]], [[0.05, 0.2]]], atol=1e-6)


def test_hard_thompson_is_the_share_of_heads_voting_for_each_candidate():
    rewards = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.7, 0.99]]])  # 3 heads, 3 models
    all_in = torch.ones(1, 3, dtype=torch.bool)
    np.testing.assert_allclose(thompson_probabilities(rewards, all_in, 0.0).numpy(), [[2 / 3, 0.0, 1 / 3]], atol=1e-6)
    no_c = torch.tensor([[True, True, False]])  # the third model is not offered: head 3 votes for its best candidate
    np.testing.assert_allclose(thompson_probabilities(rewards, no_c, 0.0).numpy(), [[2 / 3, 1 / 3, 0.0]], atol=1e-6)
    soft = thompson_probabilities(rewards, no_c, 0.05)
    assert soft[0, 2] == 0 and torch.allclose(soft.sum(1), torch.ones(1)) and soft[0, 0] > soft[0, 1]


def test_decision_logits_give_the_thompson_distribution_back_through_softmax():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logits = decision_logits(p, mask)
    assert torch.isneginf(logits[0, 2]) and torch.isfinite(logits[1, 1])  # a candidate with P=0 stays a candidate
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), p.numpy(), atol=1e-9)


def test_logged_propensity_is_the_probability_actually_sampled_from():
    policy = _untrained(heads=6)
    emb = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    w = np.random.default_rng(1).uniform(size=64)
    mask = policy.candidate_mask([["a", "c"]] * 32 + [None] * 32, 64)
    bounds = ExplorationBounds(0.05, 0.9)
    dec = policy.decide(emb, w, mask, explore=True, generator=torch.Generator().manual_seed(0), bounds=bounds)
    with torch.no_grad():
        score, cost = policy.predictions(emb)
        p = thompson_probabilities(head_rewards(score, cost, torch.as_tensor(w, dtype=torch.float32)),
                                   torch.as_tensor(mask), policy.meta.network.temperature)
    expected = bound_probabilities(p, torch.as_tensor(mask), bounds.floor, bounds.ceiling).numpy()
    np.testing.assert_allclose(dec.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(dec.propensities, dec.probabilities[np.arange(64), dec.actions], atol=1e-6)
    assert set(dec.actions[:32].tolist()) <= {0, 2} and (dec.probabilities[:32, 1] == 0).all()
    assert dec.probabilities[:, [0, 2]].min() >= 0.05 - 1e-6  # the floor holds for every candidate
    greedy = policy.decide(emb, w, mask)
    assert (greedy.propensities == 1).all()
    np.testing.assert_array_equal(greedy.actions, p.numpy().argmax(1))
    # the serving path (decide on policy.logits with the mask) samples from the same distribution
    served = decide(policy.logits(emb, w, mask), True, bounds, torch.Generator().manual_seed(0), torch.as_tensor(mask))
    np.testing.assert_allclose(served.probabilities.numpy(), dec.probabilities, atol=1e-6)
    with pytest.raises(KeyError):
        policy.candidate_mask([["zzz"]], 1)


# --- training ----------------------------------------------------------------------------------------


def test_value_loss_teaches_only_the_chosen_model_and_the_weighted_heads():
    score_logits = torch.zeros(2, 3, 4, requires_grad=True)  # B=2, H=3, K=4
    cost_logits = torch.zeros(2, 3, 4, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    loss = value_loss(score_logits, cost_logits, torch.tensor([1, 3]), torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.3]), weights)
    loss.backward()
    touched = score_logits.grad.abs() > 0
    assert touched[0, :, 1].tolist() == [True, False, True] and touched[1, :, 3].tolist() == [True, False, False]
    assert touched.sum() == 3 and (cost_logits.grad.abs() > 0).sum() == 3
    assert score_logits.grad[0, 0, 1] < 0 < score_logits.grad[1, 0, 3]  # pushed toward score 1 and score 0


def test_replay_buffer_samples_every_pull_once_while_small():
    buf = ReplayBuffer(n_heads=2)
    buf.add(np.array([3, 4]), np.array([0, 1]), np.array([1.0, 0.0]), np.array([0.1, 0.2]), np.ones((2, 2)))
    buf.add(np.array([5]), np.array([2]), np.array([0.5]), np.array([0.3]), np.ones((1, 2)))
    rows, actions, *_ = buf.sample(np.random.default_rng(0), 10)
    assert len(buf) == 3 and rows.tolist() == [3, 4, 5] and actions.tolist() == [0, 1, 2]
    assert len(buf.sample(np.random.default_rng(0), 2)[0]) == 2
    for start in range(6, 3000, 500):  # past the first capacity: every pull kept, in order
        n = min(500, 3000 - start)
        ids = np.arange(start, start + n)
        buf.add(ids, ids % 3, np.zeros(n), np.zeros(n), np.full((n, 2), 2.0))
    rows, actions, _, _, weights = buf.sample(np.random.default_rng(0), 5000)
    assert len(buf) == 2997 and rows.tolist() == [3, 4, 5] + list(range(6, 3000)) and weights[-1].tolist() == [2.0, 2.0]


def test_training_sees_bandit_feedback_only_and_beats_every_single_model():
    data, emb, eid = _embedded(240)
    cfg = ValueTrainConfig(epochs=8, batch_size=16, seed=1, network=ValueNetworkConfig(hidden_dim=64, n_heads=4))
    policy, env, history = train_value_policy(data, emb, cfg, ENC, eid)
    log = env.log_frame()
    assert len(log) == 8 * len(data) and log.groupby("row").size().eq(8).all()
    assert ((log.propensity >= 0.01 - 1e-6) & (log.propensity <= 0.98 + 1e-6)).all()
    rows, actions = log.row.to_numpy(), log.action.to_numpy()
    np.testing.assert_allclose(log.reward, reward(data.scores_filled[rows, actions], data.costs[rows, actions],
                                                  log.w_cost.to_numpy(), policy.tau))
    grid = (0.0, 0.5, 0.9)
    learned = np.mean([reward_matrix(data.scores_filled, data.costs, w, policy.tau)[np.arange(len(data)),
                                                                                   policy.decide(emb, w).actions].mean()
                       for w in grid])
    singles = [np.mean([reward_matrix(data.scores_filled, data.costs, w, policy.tau)[:, k].mean() for w in grid])
               for k in range(data.n_models)]
    assert learned > max(singles) + 0.02, (learned, singles)
    assert history[-1]["mean_reward"] > history[0]["mean_reward"]
    assert policy.meta.training["pulls"] == len(log)


def test_max_pulls_stops_both_trainers_mid_epoch():
    data, emb, eid = _embedded(50)
    _, env, history = train_value_policy(data, emb, ValueTrainConfig(max_pulls=70, batch_size=16), ENC, eid)
    assert len(env.log_frame()) == 70 and [h["pulls"] for h in history] == [50, 70]
    _, env, history = train_bandit_policy(data, emb, TrainConfig(max_pulls=70, batch_size=16), ENC, eid)
    assert len(env.log_frame()) == 70 and len(history) == 2
    with pytest.raises(ValueError, match="max_pulls"):
        ValueTrainConfig(max_pulls=-1).validate()
    with pytest.raises(ValueError, match="temperature"):
        ValueTrainConfig(network=ValueNetworkConfig(temperature=-1.0)).validate()


# --- checkpoints, snapshots, the registry, the CLI -------------------------------------------------


def test_checkpoint_state_and_snapshot_round_trip_through_the_registry(tmp_path):
    policy = _untrained()
    policy.meta.policy_version = 4
    assert isinstance(policy, RoutingPolicy) and POLICY_KINDS["value"] is ValuePolicy
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    loaded = load_policy(policy.save(tmp_path / "ckpt"))
    assert isinstance(loaded, ValuePolicy) and loaded.policy_version == 4
    assert loaded.meta.network == policy.meta.network and loaded.meta.encoder == ENC
    assert torch.equal(loaded.logits(emb, 0.3), policy.logits(emb, 0.3))
    state = policy.state()
    assert state["kind"] == "value" and policy_from_state(state).policy_version == 4
    served = policy_from_snapshot(WeightsSnapshot(9, state))
    assert isinstance(served, ValuePolicy) and served.policy_version == 9
    assert torch.equal(served.logits(emb, 0.3), policy.logits(emb, 0.3))


def test_cli_trains_a_value_policy_and_evaluates_it(tmp_path, capsys):
    data_path = make_routing_data(90).save(tmp_path / "data.parquet")
    assert main(["split", "--data", str(data_path), "--by", "prompt", "--out", str(tmp_path / "split")]) == 0
    common = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", str(tmp_path / "split" / "train.parquet"), "--out", str(tmp_path / "run"),
                 "--kind", "value", "--set", "encoder.name=hashing", "--set", "train.max_pulls=200",
                 "--set", "train.network.n_heads=3", "--seed", "3", *common]) == 0
    checkpoint = capsys.readouterr().out.strip().splitlines()[-1]
    policy = load_policy(checkpoint)
    assert isinstance(policy, ValuePolicy) and policy.meta.network.n_heads == 3 and policy.meta.training["pulls"] == 200
    assert (tmp_path / "run" / "training_decisions.parquet").exists()
    assert main(["eval", "--train", str(tmp_path / "split" / "train.parquet"), "--test", str(tmp_path / "split" / "test.parquet"),
                 "--policy", checkpoint, "--out", str(tmp_path / "eval"), "--routers", "policy,best-single",
                 "--grid", "0,0.5", *common]) == 0
    assert "**policy**" in capsys.readouterr().out and (tmp_path / "eval" / "report.json").exists()


def test_serving_core_routes_a_value_policy_and_logs_the_sampled_probability():
    """A replica's inference core and OPE take the value policy as is: the logged probability
    is the one the explore decision was sampled with, candidates restrict the pool."""
    from banditroute.learner.ope import served_probabilities
    from banditroute.serve.core import RouterCore, RouteRequest

    data, emb, eid = _embedded(60)
    policy, _, _ = train_value_policy(data, emb, ValueTrainConfig(epochs=2, batch_size=16), ENC, eid)
    core = RouterCore(policy, seed=0)
    results = core.route_batch([RouteRequest(p, 0.3, ["cheap-math", "expensive"], "explore") for p in data.prompts[:20]])
    assert all(r.ok and set(r.probabilities) == {"cheap-math", "expensive"} for r in results)
    assert all(abs(r.probability - r.probabilities[r.model]) < 1e-6 and r.probability >= 0.01 - 1e-6 for r in results)
    mask = policy.candidate_mask([["cheap-math", "expensive"]] * 20, 20)
    ope = served_probabilities(policy, emb[:20], np.full(20, 0.3), mask, np.ones(20, bool), 0.01, 0.98)
    logged = np.array([r.probabilities[m] for r in results for m in ("cheap-math",)])
    np.testing.assert_allclose(ope[:, 0], logged, atol=1e-5)
