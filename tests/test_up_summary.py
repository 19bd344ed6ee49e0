"""`banditroute up`'s verdict (cluster/summary.py) and its plot: pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from banditroute.cluster.plotting import plot_learning_curve, version_steps
from banditroute.cluster.summary import (
    compare_with_fixed_models, fixed_model_rewards, gate_checks, gate_summary, promotions_from_versions, quarter_slices,
    reward_by_quarter, verdict_line,
)
from banditroute.policy.reward import reward


def test_promotions_are_the_first_decision_of_each_newer_version():
    # a replica still on v0 after v1 was served (decision 4) is no promotion; -1 = no version in the answer
    assert promotions_from_versions([0, 0, 1, 0, 1, 2, 2, -1, 3]) == [[3, 1], [6, 2], [9, 3]]
    assert promotions_from_versions([5, 5, 5]) == []  # the starting version is not a promotion
    assert promotions_from_versions([]) == []
    assert version_steps([[3, 1], [6, 2]], 0, 10) == [[1, 0], [3, 1], [6, 2], [10, 2]]
    assert version_steps([], 4, 1) == [[1, 4]]


def test_reward_by_quarter_splits_the_decisions_in_order():
    assert reward_by_quarter([1, 2, 3, 4, 5, 6, 7, 8]) == [1.5, 3.5, 5.5, 7.5]
    assert reward_by_quarter([]) == [None, None, None, None]
    sizes = [s.stop - s.start for s in quarter_slices(10)]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1
    assert reward_by_quarter([1.0, 3.0]) == [None, 1.0, None, 3.0]


def _table():
    # 3 prompts x 2 models: "a" is good and dear, "b" is cheap and mediocre
    scores = np.array([[1.0, 0.5], [1.0, np.nan], [0.0, 1.0]])
    costs = np.array([[0.02, 0.001], [0.02, 0.001], [0.02, 0.001]])
    return scores, costs


def test_fixed_model_rewards_use_the_same_requests_and_tau():
    scores, costs = _table()
    rows, w = [0, 1, 2, 0], [0.0, 0.5, 1.0, 0.2]
    tau = 0.01
    got = fixed_model_rewards(scores, costs, rows, w, tau, ["a", "b"])
    filled = np.nan_to_num(scores)
    for j, m in enumerate("ab"):
        expect = np.mean([reward(filled[r, j], costs[r, j], wc, tau) for r, wc in zip(rows, w)])
        assert got[m] == pytest.approx(expect)
    # a subset of the table's columns, by name
    assert fixed_model_rewards(scores, costs, rows, w, tau, ["b"], columns=[1]) == {"b": pytest.approx(got["b"])}
    assert fixed_model_rewards(scores, costs, [], [], tau, ["a"]) == {}
    with pytest.raises(ValueError, match="one entry per request"):
        fixed_model_rewards(scores, costs, [0], [0.1, 0.2], tau, ["a"])


def test_compare_with_fixed_models_pairs_the_last_quarter():
    scores, costs = _table()
    tau = 0.01
    rows = [0, 1, 2, 0, 1, 2, 0, 1]
    w = [0.1] * 8
    fixed = fixed_model_rewards(scores, costs, rows, w, tau, ["a", "b"])
    best = max(fixed, key=fixed.get)
    col = ["a", "b"].index(best)
    best_last = fixed_model_rewards(scores, costs, rows[6:], w[6:], tau, [best], [col])[best]

    winning = [0.0] * 6 + [best_last + 0.1] * 2
    out = compare_with_fixed_models(winning, scores, costs, rows, w, tau, ["a", "b"])
    assert out["fixed_model_rewards"] == pytest.approx(fixed)
    assert out["best_fixed_model"] == {"model": best, "reward": pytest.approx(fixed[best]),
                                       "reward_last_quarter": pytest.approx(best_last)}
    assert out["reward_by_quarter"][-1] == pytest.approx(best_last + 0.1) == out["last_quarter_reward"]
    assert out["beats_best_fixed_model"] is True
    assert "last quarter" in verdict_line(out) and " beats the best fixed model " + best in verdict_line(out)

    losing = compare_with_fixed_models([1.0] * 6 + [best_last - 0.1] * 2, scores, costs, rows, w, tau, ["a", "b"])
    assert losing["beats_best_fixed_model"] is False and "does not beat" in verdict_line(losing)

    empty = compare_with_fixed_models([], scores, costs, [], [], tau, ["a", "b"])
    assert empty["beats_best_fixed_model"] is None and empty["best_fixed_model"] is None
    assert verdict_line(empty).endswith("no decisions to compare")


def _gate(t, promote, diff, candidate, serving):
    return {"action": "gate", "time": t, "promote": promote, "reason": "why", "n_events": 40, "margin": 0.02,
            "candidate_version": candidate, "serving_version": serving, "events_received": 100,
            "difference": {"value": diff, "lower_bound": diff - 0.03}}


def test_gate_checks_are_placed_on_the_decision_axis_and_plotted(tmp_path):
    times = [10.0, 11.0, 12.0, 13.0, 14.0]
    history = [_gate(11.5, False, -0.05, 3, 0), {"action": "pin", "time": 12.5}, _gate(13.5, True, 0.01, 6, 0)]
    checks = gate_checks(history, times)
    assert [c["decision"] for c in checks] == [2, 4] and [c["promote"] for c in checks] == [False, True]
    assert checks[1]["difference"] == 0.01 and checks[1]["difference_lower_bound"] == pytest.approx(-0.02)
    summary = gate_summary({"enabled": True, "holdout_events": 7, "last_decision": {"reason": "last"}}, checks)
    assert (summary["checks_recent"], summary["promoted_recent"], summary["last_reason"]) == (2, 1, "last")

    path = plot_learning_curve(tmp_path / "curve.png", [[1, 0.1], [3, 0.2], [5, 0.3]], version_steps([[4, 6]], 0, 5),
                               "t", reference={"best fixed model": 0.25}, promotions=[[4, 6]], gate_checks=checks)
    assert path.stat().st_size > 1000
    assert plot_learning_curve(tmp_path / "plain.png", [], [], "t").stat().st_size > 1000


def test_served_checkpoint_is_the_served_version_beside_the_last_one():
    from banditroute.cluster.up import served_checkpoint

    assert served_checkpoint("/runs/x/storage/run-1/checkpoints/v1812", 1804) == "/runs/x/storage/run-1/checkpoints/v1804"
    assert served_checkpoint("s3://b/p/checkpoints/v9/", 7) == "s3://b/p/checkpoints/v7"
    assert served_checkpoint(None, 3) is None and served_checkpoint("/c/v2", None) is None
