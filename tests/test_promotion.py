"""The promotion gate without Ray: holdout split, paired OPE, the decision rule, and the learner actor's
gate / pin / restart logic (LearnerActor runs in process with local storage and no parameter server)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from banditroute.core.config import ConfigError, from_dict
from banditroute.learner.actor import LearnerActor
from banditroute.learner.checkpoint import list_checkpoints, load_checkpoint, read_manifest
from banditroute.learner.config import LearnerConfig
from banditroute.learner.ope import Estimate, paired_estimates, served_probabilities
from banditroute.learner.promotion import (
    HoldoutBuffer,
    PromotionConfig,
    compare_on_holdout,
    holdout_score,
    is_held_out,
    promotion_decision,
    split_holdout,
)
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.exploration import bound_probabilities
from banditroute.policy.reward import fit_tau
from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.testkit.synthetic import make_routing_data

ENC = EncoderConfig(name="hashing", dim=64)
GATE = {"every_updates": 5, "holdout_fraction": 0.5, "min_holdout_events": 40}


@pytest.fixture(scope="module")
def problem():
    data = make_routing_data(300, seed=0)
    encoder = make_encoder(ENC)
    return data, encoder.encode(data.prompts), encoder.encoder_id


def new_policy(data, encoder_id, seed=0) -> BarpPolicy:
    torch.manual_seed(seed)
    meta = PolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=64, encoder=ENC, encoder_id=encoder_id,
                      network=NetworkConfig(hidden_dim=32, preference_dim=8))
    return BarpPolicy(meta)


def uniform_events(problem, rng, n, start, poison_training=False, tau=None, mode="explore"):
    """Events logged by a uniform router (mu = 1/3). ``poison_training``: the events that will be TRAINED on
    (not held out) carry the opposite reward (score 1 - s, normalised cost 1 - c), so the learner gets worse
    while the held-out events stay true."""
    data, emb, enc_id = problem
    rows, w, acts = rng.integers(0, len(data), n), rng.uniform(0, 1, n), rng.integers(0, 3, n)
    events = []
    for i, (r, k) in enumerate(zip(rows, acts)):
        did = f"d{start + i}"
        score, cost = float(data.scores_filled[r, k]), float(data.costs[r, k])
        if poison_training and holdout_score(did) >= GATE["holdout_fraction"]:
            score, cost = 1.0 - score, tau * (1.0 - min(cost / tau, 1.0))
        events.append(JoinedEvent(DecisionRecord(did, 0.0, emb[r].tolist(), float(w[i]), list(data.models), data.models[k],
                                                 1 / 3, 0, mode=mode, encoder_id=enc_id), score, cost, 0.0))
    return events_to_table(events)


# --- pure pieces --------------------------------------------------------------------------


def test_holdout_split_is_deterministic_and_has_the_right_fraction():
    ids = [f"decision-{i}" for i in range(20000)]
    held = is_held_out(ids, 0.1)
    assert abs(held.mean() - 0.1) < 0.01
    assert np.array_equal(held, is_held_out(ids, 0.1))  # same ids, same side (restarts, replays)
    assert not (is_held_out(ids, 0.05) & ~held).any()  # a smaller fraction holds out a subset
    assert 0.0 <= holdout_score("x") < 1.0 and holdout_score("x") == holdout_score("x")


def test_split_and_bounded_buffer(problem):
    table = uniform_events(problem, np.random.default_rng(0), 200, 0)
    train, held = split_holdout(table, 0.5)
    assert len(train) + len(held) == 200 and 0 < len(held) < 200
    assert not set(train.column("decision_id").to_pylist()) & set(held.column("decision_id").to_pylist())
    buf = HoldoutBuffer(capacity=50)
    for part in (held.slice(0, 30), held.slice(30, 30), held.slice(60)):
        buf.add(part)
    assert len(buf) == 50 and buf.seen == len(held)
    assert buf.table().column("decision_id").to_pylist() == held.column("decision_id").to_pylist()[-50:]  # the most recent


def test_paired_difference_has_a_smaller_se_than_independent_estimates():
    rng = np.random.default_rng(0)
    r = rng.uniform(-1, 1, 2000)
    rho_a = rng.uniform(0.5, 1.5, 2000)
    rho_b = rho_a * 1.01  # nearly the same policy
    for est in ("ips", "snips"):
        a, b, d = paired_estimates(est, r, rho_a, rho_b)
        assert d.value == pytest.approx(a.value - b.value)
        assert d.se < 0.2 * math.hypot(a.se, b.se), est
    q = rng.uniform(-1, 1, 2000)
    a, b, d = paired_estimates("dr", r, rho_a, rho_b, q, q + 0.1, q)
    assert d.value == pytest.approx(a.value - b.value) and d.value == pytest.approx(0.1 + np.mean((rho_a - rho_b) * (r - q)))


def test_promotion_decision_rules():
    cfg = PromotionConfig(margin=0.02, min_holdout_events=30)
    serving = Estimate("dr", 0.30, 0.01)
    few = promotion_decision(Estimate("dr", 0.9, 0.01), serving, 10, cfg)
    assert not few.promote and "insufficient evidence" in few.reason  # even a great-looking candidate, on 10 events
    better = promotion_decision(Estimate("dr", 0.32, 0.01), serving, 500, cfg, difference=Estimate("dr", 0.02, 0.005))
    assert better.promote and better.difference["lower_bound"] > 0
    slightly = promotion_decision(Estimate("dr", 0.295, 0.01), serving, 500, cfg, difference=Estimate("dr", -0.005, 0.005))
    assert slightly.promote  # within the margin
    worse = promotion_decision(Estimate("dr", 0.25, 0.01), serving, 500, cfg, difference=Estimate("dr", -0.05, 0.005))
    assert not worse.promote and "possibly worse" in worse.reason
    unsure = promotion_decision(Estimate("dr", 0.30, 0.01), serving, 500, cfg, difference=Estimate("dr", 0.0, 0.05))
    assert not unsure.promote  # can't tell: held
    # Without a paired difference the SEs combine as if independent: sqrt(2) * 0.01 here.
    indep = promotion_decision(Estimate("dr", 0.29, 0.01), serving, 500, cfg)
    assert indep.difference["se"] == pytest.approx(math.sqrt(2) * 0.01) and not indep.promote
    paired = promotion_decision(Estimate("dr", 0.29, 0.01), serving, 500, cfg, difference=Estimate("dr", -0.01, 0.002))
    assert paired.promote  # the same values with the (smaller) paired SE pass
    nan = promotion_decision(Estimate("snips", float("nan"), float("nan")), serving, 500, cfg)
    assert not nan.promote and "not finite" in nan.reason
    off = promotion_decision(None, None, 0, PromotionConfig(enabled=False))
    assert off.promote and "disabled" in off.reason
    assert set(better.as_dict()) >= {"promote", "reason", "candidate", "serving", "difference", "n_events", "margin"}


def test_config_validation_names_the_field():
    cfg = from_dict(LearnerConfig, {"promotion": {"margin": 0.05, "estimator": "snips"}}, prefix="learner")
    assert isinstance(cfg.promotion, PromotionConfig) and cfg.promotion.margin == 0.05
    assert LearnerConfig(promotion={"every_updates": 3}).promotion.every_updates == 3
    for bad, name in (({"holdout_fraction": 1.5}, "learner.promotion.holdout_fraction"),
                      ({"estimator": "magic"}, "learner.promotion.estimator"),
                      ({"exploration_floor": 0.9, "exploration_ceiling": 0.5}, "learner.promotion.exploration_floor"),
                      ({"min_holdout_events": 10, "holdout_capacity": 5}, "learner.promotion.min_holdout_events"),
                      ({"reward_model_l2": 0.0}, "learner.promotion.reward_model_l2")):
        with pytest.raises((ValueError, ConfigError), match=name.replace(".", r"\.")):
            from_dict(LearnerConfig, {"promotion": bad}, prefix="learner")


def test_ope_sees_a_worse_policy_as_worse(problem):
    """A policy that always picks the expensive model at w_cost ~ 1 is worse than one picking cheap models."""
    data, _, enc_id = problem
    table = uniform_events(problem, np.random.default_rng(1), 600, 0)
    good, bad = new_policy(data, enc_id, 1), new_policy(data, enc_id, 2)
    with torch.no_grad():
        for policy, bias in ((good, [2.0, 2.0, -4.0]), (bad, [-4.0, -4.0, 4.0])):
            policy.network.decision_head.weight.mul_(0.0)
            policy.network.decision_head.bias.copy_(torch.tensor(bias))
    cfg = PromotionConfig()
    cmp = compare_on_holdout(table, bad, good, cfg)
    assert cmp.n_events == 600 and cmp.difference.value < -0.05
    decision = promotion_decision(cmp.candidate, cmp.serving, cmp.n_events, cfg, cmp.difference)
    assert not decision.promote
    assert promotion_decision(*(lambda c: (c.candidate, c.serving, c.n_events, cfg, c.difference))(
        compare_on_holdout(table, good, bad, cfg))).promote
    # The gate's reward-model penalty reaches the fit (issue 13 round 3: promotion.reward_model_l2).
    loose = compare_on_holdout(table, bad, good, PromotionConfig(reward_model_l2=1e-3, estimator="dm"))
    tight = compare_on_holdout(table, bad, good, PromotionConfig(reward_model_l2=1e3, estimator="dm"))
    assert loose.difference.value != pytest.approx(tight.difference.value, abs=1e-4)


def test_served_probabilities_are_what_a_replica_decides_from(problem):
    """Explore rows: the bounded softmax over the candidates; greedy rows: one-hot argmax; torch's global RNG untouched."""
    data, emb, enc_id = problem
    policy = new_policy(data, enc_id, 4)
    with torch.no_grad():  # a sharp policy, so the bounds bind
        policy.network.decision_head.bias.add_(torch.tensor([6.0, 0.0, -6.0]))
    n = 40
    w = np.random.default_rng(0).uniform(0, 1, n).astype(np.float32)
    mask = np.ones((n, 3), bool)
    mask[::3, 1] = False
    explore = np.arange(n) % 2 == 0
    rng_before = torch.get_rng_state()
    served = served_probabilities(policy, emb[:n], w, mask, explore, 0.05, 0.9)
    assert torch.equal(torch.get_rng_state(), rng_before)
    probs = torch.softmax(policy.logits(emb[:n], w, torch.as_tensor(mask)).float(), dim=-1)
    bounded = bound_probabilities(probs, torch.as_tensor(mask), 0.05, 0.9).numpy()
    one_hot = np.eye(3)[probs.argmax(dim=-1).numpy()]
    assert served.dtype == np.float64 and served.shape == (n, 3)
    assert np.allclose(served[explore], bounded[explore], atol=1e-7) and np.array_equal(served[~explore], one_hot[~explore])
    assert (served[explore] <= 0.9 + 1e-6).all() and (served[explore & mask[:, 1]].min() >= 0.05 - 1e-6)
    assert (served[~mask] == 0).all()
    # One mode for the whole batch: all greedy is the one-hot argmax everywhere.
    assert np.array_equal(served_probabilities(policy, emb[:n], w, mask, np.zeros(n, bool)), one_hot)


# --- the learner actor's gate, in process -------------------------------------------------


def make_actor(problem, tmp_path, lr=0.1, **gate):
    data, _, enc_id = problem
    storage = StorageConfig(uri=str(tmp_path / "storage"))
    cfg = {"learning_rate": lr, "replay_sample": 16, "checkpoint_every": 5, "promotion": {**GATE, **gate}}
    return LearnerActor(cfg, storage, new_policy(data, enc_id).state(), parameter_server_name=None), storage, cfg


def test_poisoned_candidate_is_held_and_a_good_one_promoted(problem, tmp_path):
    data, _, enc_id = problem
    tau = fit_tau(data.costs)
    actor, storage, _ = make_actor(problem, tmp_path)
    rng = np.random.default_rng(1)
    for u in range(30):
        actor.update(uniform_events(problem, rng, 16, u * 100, poison_training=True, tau=tau))
    status = actor.promotion_status()
    gates = [h for h in status["history"] if h["action"] == "gate"]
    # 5 evidence-based holds in a row re-base the candidate on the served v0 (learner/drift.py): one version more.
    assert len(gates) == 6 and actor.status()["rebases"] == 1 and status["candidate_version"] == 31
    assert gates[-1]["rebased_to_version"] == 31
    assert "insufficient evidence" in gates[0]["reason"]
    assert all(not g["promote"] for g in gates), [g["reason"] for g in gates]
    assert any("possibly worse" in g["reason"] for g in gates)
    assert status["serving_version"] == 0 and actor.status()["policy_version"] == 0  # nothing published
    assert actor.status()["events_held_out"] + actor.status()["events_trained"] == 30 * 16
    # Checkpoints still written, marked not promoted; the served v0 stays recoverable (protected from pruning).
    ckpt = open_storage(storage).child("checkpoints")
    versions = list_checkpoints(ckpt)
    assert versions[-1] == 31 and read_manifest(ckpt, 31)["promoted"] is False and 0 in versions

    # With true rewards and a sane learning rate the gate lets candidates through.
    good, _, _ = make_actor(problem, tmp_path / "good", lr=1e-2)
    for u in range(30):
        good.update(uniform_events(problem, rng, 16, 10_000 + u * 100))
    promoted = [h for h in good.promotion_status()["history"] if h["action"] == "gate" and h["promote"]]
    assert promoted and good.status()["policy_version"] == promoted[-1]["candidate_version"] > 0


def test_pin_unpin_and_restart_keep_versions_moving_forward(problem, tmp_path):
    data, _, enc_id = problem
    actor, storage, cfg = make_actor(problem, tmp_path, lr=1e-2)
    rng = np.random.default_rng(2)
    for u in range(10):
        actor.update(uniform_events(problem, rng, 16, u * 100))
    assert actor.list_checkpoints()[-2:] == [5, 10]
    with pytest.raises(ValueError, match="version: no checkpoint v7"):
        actor.pin(7)
    before = actor.promotion_status()
    out = actor.pin(5)
    assert out["pinned"] and out["source_version"] == 5
    assert out["serving_version"] > max(before["candidate_version"], before["serving_version"])  # a NEW number
    assert out["candidate_version"] > out["serving_version"]  # the candidate counts above the pinned number
    ckpt = open_storage(storage).child("checkpoints")
    pinned, _, manifest = load_checkpoint(ckpt, out["serving_version"])
    source, _, _ = load_checkpoint(ckpt, 5)
    assert manifest["pinned_from"] == 5 and manifest["promoted"] is True
    for k, v in source.network.state_dict().items():
        assert torch.equal(v, pinned.network.state_dict()[k]) and torch.equal(v, actor.serving.network.state_dict()[k])
    # Promotions are held while pinned (no gate runs), training goes on.
    for u in range(10, 20):
        actor.update(uniform_events(problem, rng, 16, u * 100))
    st = actor.promotion_status()
    assert st["pinned"] and st["serving_version"] == out["serving_version"] and st["candidate_version"] == out["candidate_version"] + 10
    assert not [h for h in st["history"] if h["action"] == "gate" and h["time"] > st["history"][-1]["time"]]

    # A restart (a new actor on the same storage) keeps the pin and never counts backwards.
    actor.checkpoint()
    again = LearnerActor(cfg, storage, new_policy(data, enc_id).state(), parameter_server_name=None)
    st2 = again.promotion_status()
    assert st2["pinned"] and st2["serving_version"] == st["serving_version"]
    assert st2["candidate_version"] >= st["candidate_version"]
    back = again.unpin()
    assert back["was_pinned"] and not back["pinned"]
    for u in range(20, 40):
        again.update(uniform_events(problem, rng, 16, u * 100))
    st3 = again.promotion_status()
    assert any(h["action"] == "gate" for h in st3["history"])  # the gate runs again
    assert st3["serving_version"] >= st2["serving_version"] and st3["candidate_version"] > st2["candidate_version"]


def test_gate_off_publishes_every_version_and_trains_on_everything(problem, tmp_path):
    actor, _, _ = make_actor(problem, tmp_path, lr=1e-2, enabled=False)
    rng = np.random.default_rng(3)
    for u in range(6):
        actor.update(uniform_events(problem, rng, 16, u * 100))
    s = actor.status()
    assert s["policy_version"] == s["candidate_version"] == 6 and s["events_trained"] == 96 and s["events_held_out"] == 0


def test_parameter_server_recovers_only_served_weights_and_remembers_reserved_numbers(problem, tmp_path):
    from banditroute.learner.checkpoint import save_checkpoint
    from banditroute.learner.learner import mint_version
    from banditroute.learner.param_server import ParameterServer, ParameterServerState

    data, _, enc_id = problem
    storage = StorageConfig(uri=str(tmp_path / "storage"))
    ckpt = open_storage(storage).child("checkpoints")
    policy = new_policy(data, enc_id)
    for version, promoted in ((3, True), (7, False)):
        mint_version(policy, version)
        save_checkpoint(ckpt, policy, extra={"promoted": promoted})
    recovered = ParameterServer(storage, "checkpoints")
    assert recovered.state.latest_version() == 3  # v7 was a held candidate: never served by recovery
    state = ParameterServerState()
    assert state.reserve_version(12) == -1 and state.reserved_version() == 12  # returns the newest PUBLISHED
    assert state.reserve_version(5) == -1 and state.reserved_version() == 12  # never goes down


def _near_deterministic_log(rng, n):
    """A serving policy that picks model 0 with 0.98 (floor 0.01 on the two others), as a value policy serves.

    Prompt type t in {0, 1}; true scores: model 0 = 0.5, model 1 = 0.6 if t else 0.2, model 2 = 0.1.
    """
    t = rng.integers(0, 2, n)
    x = np.stack([t, 1 - t], axis=1).astype(np.float32)
    mu_all = np.tile([0.98, 0.01, 0.01], (n, 1))
    a = np.array([rng.choice(3, p=p) for p in mu_all])
    means = np.stack([np.full(n, 0.5), np.where(t == 1, 0.6, 0.2), np.full(n, 0.1)], axis=1)
    r = (rng.random(n) < means[np.arange(n), a]).astype(np.float64)
    return x, t, a, mu_all[np.arange(n), a], r


def _gate_on_log(estimator, seed, target):
    from banditroute.learner.ope import cross_fitted_components

    rng = np.random.default_rng(seed)
    x, t, a, mu, r = _near_deterministic_log(rng, 300)  # held-out events
    x_tr, _, a_tr, _, r_tr = _near_deterministic_log(rng, 3000)  # training events (the reward model's extra rows)
    zeros = np.zeros
    s_hat, _ = cross_fitted_components(x, a, r, zeros(len(r)), 3, extra=(x_tr, a_tr, r_tr, zeros(len(r_tr))))
    serving = np.tile([0.98, 0.01, 0.01], (len(r), 1))
    pi = target(t)
    idx = np.arange(len(r))
    cfg = PromotionConfig(estimator=estimator)
    c, s, d = paired_estimates(estimator, r, pi[idx, a] / mu, serving[idx, a] / mu, s_hat[idx, a],
                               (pi * s_hat).sum(1), (serving * s_hat).sum(1), cfg.switch_max_weight)
    return promotion_decision(c, s, len(r), cfg, d)


def _better(t):  # model 1 on type-1 prompts: true value +0.05 over serving
    return np.where((t == 1)[:, None], [0.01, 0.98, 0.01], [0.98, 0.01, 0.01])


def _poisoned(t):  # model 2 everywhere: true value -0.39
    return np.tile([0.01, 0.01, 0.98], (len(t), 1))


def test_switch_dr_lets_a_better_near_deterministic_candidate_through_and_still_holds_a_poisoned_one():
    """Issue 13 round 2: with a near-deterministic logger (floor 1%), DR's importance weights reach 98 where the
    candidate departs from serving, so its paired SE is ~0.1 and the lower bound holds every candidate, better or
    not (the value runs served an early version to the end). switch_dr counts those events by the reward model."""
    seeds = range(12)
    dr = [_gate_on_log("dr", s, _better) for s in seeds]
    switch = [_gate_on_log("switch_dr", s, _better) for s in seeds]
    assert sum(d.promote for d in switch) >= 8 > 5 >= sum(d.promote for d in dr)
    dr_se, switch_se = (np.median([d.difference["se"] for d in ds]) for ds in (dr, switch))
    assert switch_se < 0.03 and dr_se > 3 * switch_se
    assert not any(_gate_on_log("switch_dr", s, _poisoned).promote for s in seeds)
