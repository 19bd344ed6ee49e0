"""Off-policy evaluation: IPS, SNIPS and DR recover a known policy value; the `ope` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from banditroute.cli import main
from banditroute.learner.ope import (
    cross_fitted_components,
    doubly_robust,
    effective_sample_size,
    evaluate_policy,
    ips,
    snips,
)
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.reward import fit_tau, reward
from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.testkit.synthetic import make_routing_data


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_estimators_recover_the_true_value_on_synthetic_logs():
    rng = np.random.default_rng(0)
    n, d, k = 20_000, 5, 4
    x = rng.normal(size=(n, d))
    theta = rng.normal(size=(k, d))
    p_score = 1 / (1 + np.exp(-(x @ theta.T)))  # true E[score | x, a]
    cost_norm = np.array([0.05, 0.2, 0.6, 1.0])
    w = rng.uniform(0, 1, n)
    expected_r = (1 - w)[:, None] * p_score - w[:, None] * cost_norm
    mu = softmax(x @ rng.normal(size=(d, k)) * 0.5)  # logging policy: stochastic, full support
    pi = softmax(6.0 * expected_r)  # target policy: a much better one than the logger
    a = np.array([rng.choice(k, p=p) for p in mu])
    score = (rng.uniform(size=n) < p_score[np.arange(n), a]).astype(float)
    r = (1 - w) * score - w * cost_norm[a]
    true_value = float((pi * expected_r).sum(axis=1).mean())
    rho = pi[np.arange(n), a] / mu[np.arange(n), a]

    s_hat, c_hat = cross_fitted_components(x, a, score, cost_norm[a], k, folds=2)
    q = (1 - w)[:, None] * s_hat - w[:, None] * c_hat
    estimates = [ips(r, rho), snips(r, rho), doubly_robust(r, rho, q[np.arange(n), a], (pi * q).sum(axis=1))]
    for est in estimates:
        assert abs(est.value - true_value) < max(4 * est.se, 0.01), (est, true_value)
        assert 0 < est.se < 0.02
    # DR with a decent reward model has a smaller standard error than IPS.
    assert estimates[2].se < estimates[0].se
    # The logged policy's own value is NOT the target's (so the test is not trivial).
    assert abs(r.mean() - true_value) > 0.02
    assert 0 < effective_sample_size(rho) < n


def test_degenerate_inputs():
    with pytest.raises(ValueError):
        ips(np.array([]), np.array([]))
    assert np.isnan(snips(np.array([1.0, 0.0]), np.array([0.0, 0.0])).value)
    same = ips(np.ones(10), np.ones(10))
    assert same.value == 1.0 and same.se == 0.0


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A logging policy routes synthetic prompts (explore); the full outcome table gives the truth."""
    data = make_routing_data(240, seed=1)
    enc_cfg = EncoderConfig(name="hashing", dim=32)
    encoder = make_encoder(enc_cfg)
    emb = encoder.encode(data.prompts)
    tau = fit_tau(data.costs)

    def policy(seed):
        torch.manual_seed(seed)
        meta = PolicyMeta(models=list(data.models), tau=tau, embed_dim=emb.shape[1], encoder=enc_cfg,
                          encoder_id=encoder.encoder_id, network=NetworkConfig(hidden_dim=32, preference_dim=8))
        p = BarpPolicy(meta)
        with torch.no_grad():
            p.network.decision_head.weight.mul_(30.0)  # a confident, prompt-dependent policy
        return p

    logger_policy, target = policy(0), policy(1)
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(2)
    rows = np.repeat(np.arange(len(data)), 25)
    w = rng.uniform(0, 1, rows.size)
    dec = logger_policy.decide(emb[rows], w, explore=True, generator=gen)
    events = [
        JoinedEvent(
            DecisionRecord(f"e{i}", 0.0, emb[r].tolist(), float(w[i]), list(data.models), data.models[dec.actions[i]],
                           float(dec.propensities[i]), 0, encoder_id=encoder.encoder_id),
            float(data.scores_filled[r, dec.actions[i]]), float(data.costs[r, dec.actions[i]]), 0.0,
        )
        for i, r in enumerate(rows)
    ]
    table = events_to_table(events)
    full = reward(data.scores_filled[rows], data.costs[rows], w[:, None], tau)  # every model's reward per event
    probs = torch.softmax(target.logits(emb[rows], w), dim=-1).numpy()
    greedy = probs.argmax(axis=1)
    truth = {"explore": float((probs * full).sum(axis=1).mean()), "greedy": float(full[np.arange(rows.size), greedy].mean())}
    root = tmp_path_factory.mktemp("ope")
    target_dir = target.save(root / "target")
    return table, target, truth, root, target_dir


def test_evaluate_policy_on_logged_events_matches_the_truth(logged):
    table, target, truth, _, _ = logged
    report = evaluate_policy(table, target, modes=("explore", "greedy"))
    for mode in ("explore", "greedy"):
        for name, est in report["modes"][mode]["estimates"].items():
            assert abs(est["value"] - truth[mode]) < max(4 * est["se"], 0.02), (mode, name, est, truth[mode])
    assert abs(report["logged_policy_value"] - truth["explore"]) > 0.02


def test_ope_command_prints_a_table_and_writes_json(logged, capsys):
    table, _, truth, root, target_dir = logged
    events_dir = root / "log" / "events" / "dt=2025-01-01" / "hr=00"
    events_dir.mkdir(parents=True)
    half = table.num_rows // 2
    import pyarrow.parquet as pq

    pq.write_table(table.slice(0, half), events_dir / "part-1735689600000-a-00000001.parquet")
    pq.write_table(table.slice(half), events_dir / "part-1735689600001-a-00000002.parquet")
    out = root / "ope.json"
    assert main(["ope", "--events", str(root / "log"), "--policy", str(target_dir), "--w-cost", "0.2,0.8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "snips" in printed and "dr" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert [r["w_cost"] for r in report["reports"]] == [0.2, 0.8]
    assert report["reports"][0]["events_used"] == table.num_rows
    # Bad arguments are clear errors, not tracebacks.
    assert main(["ope", "--events", str(root / "log"), "--policy", str(target_dir), "--w-cost", "2"]) == 2


def test_reward_model_extra_rows_fit_a_model_the_evaluated_log_rarely_picked():
    """The gate fits q on recent training events too (learner.promotion.reward_model_events): a model the held-out
    log took a handful of times gets its score from the many training rows instead of a global mean."""
    rng = np.random.default_rng(0)

    def log(n):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        a = (rng.random(n) < 0.02).astype(np.int64)  # model 1 taken ~2% of the time
        s = np.where(a == 1, (x[:, 0] > 0).astype(float), 0.5)
        return x, a, s, np.zeros(n)

    x, a, s, c = log(300)
    extra = log(5000)
    truth = (x[:, 0] > 0).astype(float)
    alone, _ = cross_fitted_components(x, a, s, c, 2, folds=2)
    helped, _ = cross_fitted_components(x, a, s, c, 2, folds=2, extra=extra)
    err_alone = np.abs(alone[:, 1] - truth).mean()
    err_helped = np.abs(helped[:, 1] - truth).mean()
    assert err_helped < 0.5 * err_alone


def test_direct_method_is_the_reward_models_value_and_pairs_with_a_small_se():
    """Issue 13 round 3: `dm` (the gate-replay diagnostic of the reward-model part of DR) is mean(q_target) with
    SE sd(q_target)/sqrt(n), ignores the logged rewards, and its paired difference cancels the shared part."""
    from banditroute.learner.ope import ESTIMATORS, estimate_terms, paired_estimates

    assert "dm" in ESTIMATORS
    rng = np.random.default_rng(0)
    n = 500
    q_target = rng.uniform(0, 1, n)
    rewards, rho = rng.uniform(0, 1, n), rng.uniform(0, 3, n)
    value, terms = estimate_terms("dm", rewards, rho, None, q_target)
    assert value == pytest.approx(q_target.mean()) and terms.std(ddof=1) == pytest.approx(q_target.std(ddof=1))
    assert estimate_terms("dm", rewards[::-1].copy(), rho, None, q_target)[0] == pytest.approx(value)  # rewards unused
    a, b, d = paired_estimates("dm", rewards, rho, rho, None, q_target + 0.01, q_target)
    assert d.value == pytest.approx(0.01) and d.se < 1e-9 < a.se
    with pytest.raises(ValueError, match="dm estimator needs q_target"):
        estimate_terms("dm", rewards, rho)


def test_reward_model_l2_sets_the_shrinkage_of_the_gates_reward_model():
    """A smaller ridge penalty shrinks a rarely picked model's fit less toward its mean (promotion.reward_model_l2)."""
    rng = np.random.default_rng(1)
    n, d = 20, 32  # fewer rows than dims: a model the logger picks 1% of the time
    x = rng.normal(size=(n, d)) / np.sqrt(d)  # unit-scale embeddings: per-dim variance 1/d, as real ones
    y = (x @ rng.normal(size=d) * 3 > 0).astype(float)
    spread = {}
    for l2 in (1.0, 0.01):
        s_hat, _ = cross_fitted_components(x, np.zeros(n, int), y, np.zeros(n), 1, folds=1, l2=l2)
        spread[l2] = float(s_hat[:, 0].std())
    assert spread[0.01] > 1.5 * spread[1.0]
