"""The online learner registry, the value learner (kind ``value``), re-basing on drift, and warm/cold starts per kind."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.learner.actor import LearnerActor
from banditroute.learner.base import optimizer_state_from_bytes
from banditroute.learner.checkpoint import load_checkpoint
from banditroute.learner.config import ONLINE_KINDS, LearnerConfig
from banditroute.learner.drift import DriftGuard
from banditroute.learner.learner import OnlineLearner, events_to_rows
from banditroute.learner.registry import LEARNER_KINDS, learner_class, make_learner, resume_or_start_learner
from banditroute.learner.value_learner import ValueLearner
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.checkpoint import policy_from_snapshot
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.reward import fit_tau, normalised_cost, reward
from banditroute.policy.value_policy import ValueNetworkConfig, ValuePolicy, ValuePolicyMeta
from banditroute.testkit.synthetic import make_routing_data

ENC = EncoderConfig(name="hashing", dim=64)


@pytest.fixture(scope="module")
def problem():
    data = make_routing_data(300, seed=0)
    encoder = make_encoder(ENC)
    return data, encoder.encode(data.prompts), encoder.encoder_id


def value_policy(data, emb, encoder_id, seed=0, heads=4) -> ValuePolicy:
    torch.manual_seed(seed)
    meta = ValuePolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=emb.shape[1], encoder=ENC,
                           encoder_id=encoder_id, network=ValueNetworkConfig(hidden_dim=64, n_heads=heads))
    return ValuePolicy(meta)


def barp_policy(data, emb, encoder_id, seed=0) -> BarpPolicy:
    torch.manual_seed(seed)
    meta = PolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=emb.shape[1], encoder=ENC,
                      encoder_id=encoder_id, network=NetworkConfig(hidden_dim=64, preference_dim=16))
    return BarpPolicy(meta)


def logged_batch(policy, data, emb, encoder_id, rng, gen, n=32, tag="", scores=None):
    """Route n random prompts with the policy (explore, as a replica), reveal the chosen model's logged outcome."""
    rows = rng.integers(0, len(data), n)
    w = rng.uniform(0, 1, n)
    d = policy.decide(emb[rows], w, explore=True, generator=gen)
    table = data.scores_filled if scores is None else scores
    events = [
        JoinedEvent(
            DecisionRecord(f"{tag}{i}", 0.0, emb[r].tolist(), float(w[i]), list(data.models), data.models[d.actions[i]],
                           float(d.propensities[i]), policy.policy_version, encoder_id=encoder_id),
            float(table[r, d.actions[i]]), float(data.costs[r, d.actions[i]]), 0.0,
        )
        for i, r in enumerate(rows)
    ]
    return events_to_table(events)


def greedy_value(policy, data, emb, seed=1) -> float:
    w = np.random.default_rng(seed).uniform(0, 1, len(data))
    d = policy.decide(emb, w, explore=False)
    r = reward(data.scores_filled, data.costs, w[:, None], policy.tau)
    return float(r[np.arange(len(data)), d.actions].mean())


def best_fixed_value(data, tau, seed=1) -> float:
    w = np.random.default_rng(seed).uniform(0, 1, len(data))
    return float(reward(data.scores_filled, data.costs, w[:, None], tau).mean(axis=0).max())


def test_registry_has_one_learner_per_online_kind():
    assert tuple(LEARNER_KINDS) == ONLINE_KINDS
    assert learner_class("barp") is OnlineLearner and learner_class("value") is ValueLearner
    with pytest.raises(ValueError, match="'nonesuch'"):
        learner_class("nonesuch")


def test_rows_carry_the_chosen_models_score_and_normalised_cost(problem):
    data, emb, enc_id = problem
    policy = value_policy(data, emb, enc_id)
    d = DecisionRecord("a", 0.0, emb[0].tolist(), 0.4, list(data.models), data.models[1], 0.5, 0, encoder_id=enc_id)
    cost = float(data.costs[0, 1]) * 3
    rows = events_to_rows(events_to_table([JoinedEvent(d, float("nan"), cost, 0.0),
                                           JoinedEvent(dataclasses.replace(d, decision_id="b"), 1.0, 0.0, 0.0)]),
                          policy)
    assert rows.scores.tolist() == [0.0, 1.0]  # NaN (no recorded answer) counts as 0, as in the reward
    assert rows.costs[0] == pytest.approx(min(float(normalised_cost(cost, policy.tau)), 1.0)) and rows.costs[1] == 0.0
    assert rows.rewards[0] == pytest.approx(float(reward(np.nan, cost, 0.4, policy.tau)))


def test_value_learner_learns_online_beats_every_fixed_model_and_versions_step_by_one(problem):
    data, emb, enc_id = problem
    policy = value_policy(data, emb, enc_id)
    before = greedy_value(policy, data, emb)
    learner = make_learner(policy, LearnerConfig(value={"replay_sample": 128}))
    assert isinstance(learner, ValueLearner) and learner.policy is policy
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for step in range(60):
        metrics = learner.update(logged_batch(policy, data, emb, enc_id, rng, gen, tag=f"{step}-"))
        assert metrics["updated"] and metrics["policy_version"] == step + 1 and np.isfinite(metrics["total_loss"])
    after = greedy_value(policy, data, emb)
    best_fixed = best_fixed_value(data, policy.tau)
    assert after > before + 0.05 and after > best_fixed, (before, after, best_fixed)
    assert learner.events_trained == 60 * 32 and learner.replay.size == 60 * 32
    # What replicas load: a 'value' snapshot of the same weights and version.
    served = policy_from_snapshot(learner.snapshot())
    assert isinstance(served, ValuePolicy) and served.policy_version == 60
    assert torch.allclose(served.logits(emb[:5], 0.3), policy.logits(emb[:5], 0.3))


def test_value_learner_trains_only_the_chosen_models_heads(problem):
    data, emb, enc_id = problem
    policy = value_policy(data, emb, enc_id)
    learner = ValueLearner(policy, LearnerConfig(replay_capacity=0, value={"weight_decay": 0.0}))  # decay moves every weight
    before = {k: v.clone() for k, v in policy.network.state_dict().items()}
    table = logged_batch(policy, data, emb, enc_id, np.random.default_rng(3), torch.Generator().manual_seed(3), n=8)
    chosen = {list(data.models).index(m) for m in table.column("chosen_model").to_pylist()}
    learner.update(table)
    heads, k = policy.network.n_heads, len(data.models)
    moved = (policy.network.score_head.weight.detach() - before["score_head.weight"]).abs().sum(dim=1).reshape(heads, k)
    untouched = [j for j in range(k) if j not in chosen]
    assert untouched and float(moved[:, untouched].max()) == 0.0  # unseen models' outputs get no gradient
    assert float(moved[:, sorted(chosen)].max()) > 0.0


def test_value_learner_skips_and_counts_bad_rows(problem):
    data, emb, enc_id = problem
    policy = value_policy(data, emb, enc_id)
    learner = ValueLearner(policy)
    good = DecisionRecord("g", 0.0, emb[0].tolist(), 0.5, list(data.models), data.models[0], 0.5, 0, encoder_id=enc_id)
    unknown = dataclasses.replace(good, decision_id="u", chosen_model="nope")
    metrics = learner.update(events_to_table([JoinedEvent(good, 1.0, 0.0, 0.0), JoinedEvent(unknown, 1.0, 0.0, 0.0)]))
    assert metrics["events"] == 1 and learner.skipped == {"unknown_model": 1} and learner.policy_version == 1
    empty = learner.update(events_to_table([JoinedEvent(unknown, 1.0, 0.0, 0.0)]))
    assert not empty["updated"] and learner.policy_version == 1 and learner.skipped == {"unknown_model": 2}


def test_value_checkpoint_resumes_weights_adam_and_counts_without_pickle(problem, tmp_path):
    data, emb, enc_id = problem
    policy = value_policy(data, emb, enc_id)
    learner = ValueLearner(policy)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for step in range(3):
        learner.update(logged_batch(policy, data, emb, enc_id, rng, gen, tag=f"{step}-"))
    storage = open_storage(str(tmp_path / "ckpt"))
    learner.save_checkpoint(storage)
    loaded, state, manifest = load_checkpoint(storage, 3)
    assert isinstance(loaded, ValuePolicy) and manifest["learner_kind"] == "value" and manifest["events_trained"] == 96
    assert "state" in optimizer_state_from_bytes(state)  # torch.load(weights_only=True) reads it
    # Resuming picks the learner by the checkpoint's kind, and the newer of storage and the seed.
    resumed = resume_or_start_learner(storage, value_policy(data, emb, enc_id, seed=5))
    assert isinstance(resumed, ValueLearner) and resumed.policy_version == 3 and resumed.events_trained == 96
    assert torch.allclose(resumed.policy.logits(emb[:4], 0.5), policy.logits(emb[:4], 0.5))
    assert resumed.optimiser.state_dict()["state"][0]["step"] == learner.optimiser.state_dict()["state"][0]["step"]
    with pytest.raises(ValueError, match="'value' policy"):
        OnlineLearner.resume_or_start(storage, None)


def test_rebase_takes_the_serving_weights_and_a_new_version(problem):
    data, emb, enc_id = problem
    for learner, other in ((ValueLearner(value_policy(data, emb, enc_id)), value_policy(data, emb, enc_id, seed=9)),
                           (OnlineLearner(barp_policy(data, emb, enc_id)), barp_policy(data, emb, enc_id, seed=9))):
        learner.update(logged_batch(learner.policy, data, emb, enc_id, np.random.default_rng(0), torch.Generator().manual_seed(0)))
        v = learner.policy_version
        learner.rebase(other)
        assert learner.policy_version == v + 1
        assert torch.allclose(learner.policy.logits(emb[:4], 0.5), other.logits(emb[:4], 0.5))
        # and it trains on from there
        assert learner.update(logged_batch(learner.policy, data, emb, enc_id, np.random.default_rng(1),
                                           torch.Generator().manual_seed(1)))["updated"]


def test_drift_guard_counts_only_evidence_based_holds_in_a_row():
    guard = DriftGuard(3)
    assert [guard.held(True), guard.held(False), guard.held(True)] == [False, False, False]
    guard.promoted()
    assert [guard.held(True), guard.held(True), guard.held(True), guard.held(True)] == [False, False, True, False]
    assert guard.rebases == 1 and not any(DriftGuard(0).held(True) for _ in range(10))


GATE = {"every_updates": 1, "min_holdout_events": 20, "holdout_fraction": 0.3, "margin": 0.0, "confidence_z": 0.0}


@pytest.mark.parametrize("kind", ["value", "barp"])
def test_actor_gate_promotes_and_rebases_per_kind(problem, tmp_path, kind):
    """The actor builds the learner of the seed's kind; the gate and OPE work unchanged; a held candidate is re-based."""
    data, emb, enc_id = problem
    seed = value_policy(data, emb, enc_id) if kind == "value" else barp_policy(data, emb, enc_id)
    cfg = {"learning_rate": 0.05, "replay_sample": 16, "checkpoint_every": 0, "rebase_after_held_checks": 2,
           "promotion": GATE}
    actor = LearnerActor(cfg, StorageConfig(uri=str(tmp_path / "s")), seed.state(), parameter_server_name=None)
    assert actor.learner.kind == kind and actor.status()["learner_kind"] == kind
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    # Rewards inverted: the more the candidate learns, the worse it gets on the held-out (true) outcomes.
    inverted = 1.0 - data.scores_filled
    promoted, rebased = False, []
    for step in range(40):
        true_table = logged_batch(actor.serving, data, emb, enc_id, rng, gen, n=24, tag=f"t{step}-")
        from banditroute.learner.promotion import split_holdout

        _, held = split_holdout(true_table, GATE["holdout_fraction"])
        actor.holdout.add(held)  # true outcomes are what the gate judges on
        poisoned = logged_batch(actor.serving, data, emb, enc_id, rng, gen, n=24, tag=f"p{step}-", scores=inverted)
        metrics = actor.update(poisoned)
        promoted |= bool(metrics.get("promotion", {}).get("promote"))
        rebased += [r["rebased_to_version"] for r in actor.gate_history if "rebased_to_version" in r]
    history = [r for r in actor.gate_history if r.get("action") == "gate"]
    assert all(r["difference"] is None or "value" in r["difference"] for r in history)
    assert rebased, [r["reason"] for r in history][-5:]
    assert actor.status()["rebases"] >= 1
    # After a re-base the candidate holds the serving weights (until it trains again).
    v = actor.learner.policy_version
    actor.learner.rebase(actor.serving)
    assert actor.learner.policy_version == v + 1
    assert torch.allclose(actor.learner.policy.logits(emb[:4], 0.5), actor.serving.logits(emb[:4], 0.5))


def test_cold_and_warm_start_per_kind_and_serve_accepts_a_value_checkpoint(problem, tmp_path):
    from banditroute.cluster.cold_start import ColdStartConfig, starting_policy
    from banditroute.cluster.runner import check_serve, load_serve_config, seed_policy_state

    data, emb, enc_id = problem
    cold = starting_policy(data, ColdStartConfig(kind="value", encoder="hashing"), seed=1)
    assert isinstance(cold, ValuePolicy) and cold.models == list(data.models) and cold.tau == pytest.approx(fit_tau(data.costs, 0.95))
    assert isinstance(starting_policy(data, ColdStartConfig(encoder="hashing")), BarpPolicy)  # the dataclass default
    with pytest.raises(ValueError, match="up.cold_start.kind"):
        ColdStartConfig(kind="identity").validate()
    folder = str(value_policy(data, emb, enc_id).save(tmp_path / "value-ckpt"))
    warm = starting_policy(data, warm_start=folder)
    assert isinstance(warm, ValuePolicy)
    app = load_serve_config(overrides={"online.initial_policy": folder, "storage.uri": str(tmp_path / "storage")})
    check_serve(app)  # a value checkpoint learns online (it used to be refused)
    state = seed_policy_state(app)
    assert state["kind"] == "value" and make_learner(policy_from_snapshot(warm.snapshot())).kind == "value"


def test_online_loop_seeds_from_a_value_checkpoint(problem, tmp_path):
    """Round 2: cluster.online.initial_policy_state took only BaRP checkpoints, so `up --policy <value ckpt>` failed."""
    from banditroute.cluster.online import initial_policy_state
    from banditroute.policy.checkpoint import policy_from_state

    data, emb, eid = problem
    policy = value_policy(data, emb, eid)
    policy.save(tmp_path / "value")
    state = initial_policy_state(str(tmp_path / "value"), None)
    loaded = policy_from_state(state)
    assert loaded.kind == "value" and loaded.models == policy.models
    assert torch.allclose(loaded.logits(emb[:5], 0.3), policy.logits(emb[:5], 0.3))


def test_up_kind_flag_sets_the_cold_start_kind():
    import argparse

    from banditroute.cli.commands.up import add_arguments, overrides_from_flags

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert overrides_from_flags(parser.parse_args(["--kind", "barp"]))["up.cold_start.kind"] == "barp"
    assert "up.cold_start.kind" not in overrides_from_flags(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "nope"])
