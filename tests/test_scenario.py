"""`banditroute up --scenario`: the typed scenario file, the pure figures, and the policy copy it serves."""

from __future__ import annotations

import pytest

from banditroute.cluster.scenario import ScenarioConfig, event_effect, load_scenario, most_used, spend_per_1k
from banditroute.cluster.scenario_run import prepare_policy, scenario_summary
from banditroute.cluster.traffic import TrafficState
from banditroute.core.config import ConfigError
from banditroute.policy.model_registry import ModelRegistry
from banditroute.testkit.identity import tiny_identity_checkpoint

ISSUE_EXAMPLE = """
withhold: [gpt-3.5-turbo-1106]
budget_usd_per_1k: 0.3
events:
  - {at: 1000, onboard: gpt-3.5-turbo-1106, quiz: 20}
  - {at: 2500, price: top, factor: 10}
"""


def write(tmp_path, text: str):
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_the_issues_example_parses(tmp_path):
    s = load_scenario(write(tmp_path, ISSUE_EXAMPLE))
    assert s.withhold == ["gpt-3.5-turbo-1106"] and s.budget_usd_per_1k == 0.3 and s.window == 500
    assert [(e.kind, e.at) for e in s.events] == [("onboard", 1000), ("price", 2500)]
    assert s.events[0].quiz == 20 and s.events[1].price == "top" and s.events[1].factor == 10


@pytest.mark.parametrize("text, field", [
    ("events: [{at: 0, onboard: m}]", "events[0].at"),
    ("events: [{at: 5, onboard: m, price: top, factor: 2}]", "events[0]"),
    ("events: [{at: 5}]", "events[0]"),
    ("events: [{at: 5, price: top}]", "events[0]"),
    ("events: [{at: 5, price: top, factor: -2}]", "events[0].factor"),
    ("events: [{at: 5, onboard: m, quiz: 2}]", "events[0].quiz"),
    ("events: [{at: 5, onboard: m, colour: red}]", "events[0].colour"),
    ("events: [{at: 9, onboard: m}, {at: 5, onboard: n}]", "events"),
    ("budget_usd_per_1k: -0.3", "budget_usd_per_1k"),
    ("withhold: [a, a]", "withhold"),
    ("[1, 2]", "up.scenario"),
])
def test_bad_scenarios_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(write(tmp_path, text))


def test_model_names_are_checked_against_the_data_and_the_pool():
    s = ScenarioConfig.__new__(ScenarioConfig)
    s.__init__(withhold=["x"])
    with pytest.raises(ValueError, match=r"withhold\[0\]"):
        s.check_models(["a", "b"], ["a", "b"])


def test_figures_are_pure_functions_of_the_driven_traffic():
    chosen = ["a"] * 6 + ["b"] * 2 + ["a", "c", "c", "c"]
    rewards = [0.0] * 8 + [1.0] * 4
    assert most_used(chosen, 8, 2) == "b"
    assert most_used(chosen, 6, 6) == "a" and most_used([], 3, 5) is None
    eff = event_effect(8, "c", chosen, rewards, 4)
    assert eff == {"share_before": 0.0, "share_after": 0.75, "reward_before": 0.0, "reward_after": 1.0, "n_after": 4}
    assert spend_per_1k([0.001, 0.001, 0.003, 0.001]) == pytest.approx({"whole": 1.5, "last_half": 2.0})
    assert spend_per_1k([]) == {"whole": None, "last_half": None}


def test_the_served_copy_has_its_own_registry_with_the_withheld_models_retired(tmp_path):
    src = tiny_identity_checkpoint(tmp_path / "src")
    policy = prepare_policy(str(src), tmp_path / "out" / "policy", ["medium"])
    served = ModelRegistry.load(tmp_path / "out" / "policy" / "registry.json")
    assert served.models == ["small", "large"] and "medium" in served.all_models
    assert ModelRegistry.load(src / "registry.json").models == ["small", "medium", "large"]  # the source is untouched
    assert policy.registry.models == ["small", "large"]


def test_summary_reports_events_and_spend():
    state = TrafficState(["a", "b"], 10)
    for i in range(20):
        state.record(0.5 if i < 10 else 0.7, 0 if i < 10 else 1, 0, i, 0.3, 0.0002 if i < 10 else 0.0004)
    s = ScenarioConfig(window=10, budget_usd_per_1k=0.3)
    out = scenario_summary(state, s, [{"at": 10, "kind": "onboard", "model": "b"}], 0.005, 2.0, "ckpt")
    assert out["events"][0]["share_before"] == 0.0 and out["events"][0]["share_after"] == 1.0
    assert out["spend_usd_per_1k"] == pytest.approx({"whole": 0.3, "last_half": 0.4})
    assert out["budget_error_last_half"] == pytest.approx(0.4 / 0.3 - 1)


def test_budget_comparison_puts_the_runs_second_half_next_to_the_static_weight_that_spends_the_target(tmp_path):
    from banditroute.cluster.scenario_run import budget_comparison
    from banditroute.testkit.synthetic import make_routing_data

    data = make_routing_data(60, seed=1)
    pool = {"cheap-math": ([-0.5, 0.0], 1e-4), "cheap-code": ([0.0, -0.5], 1e-4), "expensive": ([1.5, 1.5], 2e-3)}
    src = tiny_identity_checkpoint(tmp_path / "src", pool=pool)
    state = TrafficState(list(data.models), 10)
    for i in range(40):  # first half all 'expensive', second half all 'cheap-math'
        k = 2 if i < 20 else 0
        state.record(0.5, k, 0, i, 0.5, float(data.costs[i, k]))
    out = budget_comparison(str(src), data, state, 1.0)
    run = out["run_last_half"]
    assert out["target_usd_per_1k"] == 1.0
    assert run["spend_usd_per_1k"] == pytest.approx(1000 * data.costs[20:40, 0].mean())  # the second half only
    assert run["mean_score"] == pytest.approx(data.scores_filled[20:40, 0].mean()) and run["mean_reward"] == 0.5
    static = out["static_in_hindsight"]
    assert 0.0 <= static["w_cost"] <= 1.0 and static["spend_usd_per_1k"] <= 1.0 + 1e-9
    dearer = budget_comparison(str(src), data, state, 3.0)["static_in_hindsight"]
    assert dearer["w_cost"] <= static["w_cost"] and dearer["mean_score"] >= static["mean_score"] - 1e-9
    assert dearer["spend_usd_per_1k"] <= 3.0 + 1e-9
