"""Shadow mode end to end on replayed synthetic data: the served model is the client's, the router's choice is
logged beside it, and OPE over the shadow-only log recovers the router's true value (issue 16)."""

from __future__ import annotations

import numpy as np

from banditroute.core.records import JoinedEvent, events_to_table
from banditroute.learner.ope import evaluate_policy
from banditroute.policy.reward import reward_matrix
from banditroute.serve.core import RouterCore
from banditroute.serve.protocol import RouteRequest
from banditroute.serve.testing import hashing_policy
from banditroute.testkit.synthetic import make_routing_data


def test_ope_on_a_shadow_only_log_agrees_with_the_outcome_table():
    data = make_routing_data(n=1500, seed=3)
    models = list(data.models)
    policy = hashing_policy(tuple(models), seed=2)
    core = RouterCore(policy, seed=0)
    rng = np.random.default_rng(0)
    served = rng.integers(len(models), size=len(data))  # the application's own choice, not the router's
    w = rng.uniform(0.0, 1.0, size=len(data))
    reqs = [RouteRequest(data.prompts[i], float(w[i]), None, "explore", shadow_model=models[served[i]]) for i in range(len(data))]
    results = [r for start in range(0, len(reqs), 64) for r in core.route_batch(reqs[start:start + 64])]
    scores = np.nan_to_num(data.scores.astype(np.float64))
    events = []
    for i, r in enumerate(results):
        d = r.decision
        assert d.chosen_model == models[served[i]] and d.probability == 1.0 and d.override == "shadow"
        assert d.router_model in models  # the router decided, and its choice is in the log
        events.append(JoinedEvent(d, float(scores[i, served[i]]), float(data.costs[i, served[i]]), d.time))
    # truth: the router's explore policy scored on the full outcome table, at the same preferences
    pi = np.array([r.decision.candidate_probabilities for r in results])
    truth = float((pi * reward_matrix(scores, data.costs, w, policy.tau)).sum(axis=1).mean())
    report = evaluate_policy(events_to_table(events), policy, modes=("explore",))
    dr = report["modes"]["explore"]["estimates"]["dr"]
    lo, hi = dr["ci95_low"], dr["ci95_high"]
    # DR (the reward model corrects for the client's unknown choice rule; the logged propensity is 1) covers the truth.
    assert lo <= truth <= hi, (truth, dr)
