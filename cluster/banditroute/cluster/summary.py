"""`banditroute up`'s verdict: pure functions over what the replay driver recorded, and the summary's lines.

- :func:`promotions_from_versions`: which version was served from which decision.
- :func:`reward_by_quarter`: the mean reward of each quarter of the run's decisions.
- :func:`fixed_model_rewards` / :func:`compare_with_fixed_models`: what each single model would have
  earned on the SAME requests (the prompts and the w_cost draws the driver sent, the policy's tau), and
  whether the router's last quarter beats the best of them.
- :func:`gate_checks`: the promotion gate's checks on the decision axis (version, reasons, estimate of
  candidate minus serving).
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

import numpy as np

from banditroute.policy.reward import reward_matrix

QUARTERS = 4


def promotions_from_versions(versions: Sequence[int]) -> list[list[int]]:
    """``[[decision, version], ...]``: the first decision (1-based) answered by each version newer than all before.

    ``versions[i]`` is the policy version that answered decision i+1. The
    version of the first decision is where the run started, not a promotion;
    a replica still on an older version after a newer one was served changes
    nothing (versions only move forward).
    """
    out: list[list[int]] = []
    newest = None
    for i, version in enumerate(versions):
        version = int(version)
        if version < 0:  # the answer carried no version
            continue
        if newest is not None and version > newest:
            out.append([i + 1, version])
        newest = version if newest is None else max(newest, version)
    return out


def quarter_slices(n: int, quarters: int = QUARTERS) -> list[slice]:
    """Contiguous slices of ``range(n)`` into ``quarters`` parts whose sizes differ by at most one."""
    bounds = [(n * q) // quarters for q in range(quarters + 1)]
    return [slice(bounds[q], bounds[q + 1]) for q in range(quarters)]


def reward_by_quarter(rewards: Sequence[float], quarters: int = QUARTERS) -> list[float | None]:
    """Mean reward of each quarter of the decisions, in order (None for an empty quarter)."""
    arr = np.asarray(rewards, dtype=np.float64)
    return [float(arr[s].mean()) if s.stop > s.start else None for s in quarter_slices(len(arr), quarters)]


def fixed_model_rewards(scores: np.ndarray, costs: np.ndarray, rows: Sequence[int], w_costs: Sequence[float],
                        tau: float, models: Sequence[str], columns: Sequence[int] | None = None) -> dict[str, float]:
    """Mean reward each model would have earned answering every request (data row, w_cost) itself.

    ``scores``/``costs`` are the data's outcome table (prompts x models, NaN
    scores count as 0 as in the driver), ``rows``/``w_costs`` the requests in
    order, ``columns[j]`` the table column of ``models[j]`` (default: j).
    """
    if len(rows) != len(w_costs):
        raise ValueError(f"rows ({len(rows)}) and w_costs ({len(w_costs)}) must have one entry per request")
    if not len(rows):
        return {}
    cols = np.arange(len(models)) if columns is None else np.asarray(columns, dtype=np.int64)
    idx = np.asarray(rows, dtype=np.int64)
    r = reward_matrix(np.asarray(scores)[idx][:, cols], np.asarray(costs)[idx][:, cols], np.asarray(w_costs), tau)
    means = r.mean(axis=0)
    return {m: float(means[j]) for j, m in enumerate(models)}


def compare_with_fixed_models(rewards: Sequence[float], scores: np.ndarray, costs: np.ndarray, rows: Sequence[int],
                              w_costs: Sequence[float], tau: float, models: Sequence[str],
                              columns: Sequence[int] | None = None) -> dict[str, Any]:
    """The router's rewards against every single model on the same requests.

    Returns ``reward_by_quarter``, ``fixed_model_rewards`` (whole run),
    ``best_fixed_model`` ``{model, reward, reward_last_quarter}`` (the best
    over the whole run, and what it earns on the last quarter's requests) and
    ``beats_best_fixed_model``: the router's mean reward over the last
    quarter > the best fixed model's on those same requests (paired: the
    same prompts and preferences, so traffic luck cancels); None without
    decisions.
    """
    if not (len(rewards) == len(rows) == len(w_costs)):
        raise ValueError("rewards, rows and w_costs must have one entry per decision")
    quarters = reward_by_quarter(rewards)
    fixed = fixed_model_rewards(scores, costs, rows, w_costs, tau, models, columns)
    out: dict[str, Any] = {"reward_by_quarter": quarters, "fixed_model_rewards": fixed, "best_fixed_model": None,
                           "last_quarter_reward": quarters[-1], "beats_best_fixed_model": None}
    if not fixed or quarters[-1] is None:
        return out
    best = max(fixed, key=fixed.__getitem__)
    last = quarter_slices(len(rows))[-1]
    j = list(models).index(best)
    best_last = fixed_model_rewards(scores, costs, rows[last], w_costs[last], tau, [best],
                                    None if columns is None else [columns[j]])[best]
    out["best_fixed_model"] = {"model": best, "reward": fixed[best], "reward_last_quarter": best_last}
    out["beats_best_fixed_model"] = bool(quarters[-1] > best_last)
    return out


def gate_checks(history: Sequence[Mapping[str, Any]], decision_times: Sequence[float]) -> list[dict[str, Any]]:
    """The promotion gate's checks, each placed on the decision axis.

    ``history`` is the learner's gate history (``promotion_status()["history"]``);
    ``decision_times`` the wall-clock time of each decision, ascending. A
    check's ``decision`` is the number of decisions made before it ran.
    """
    out = []
    for record in history:
        if record.get("action") != "gate":
            continue
        diff = record.get("difference") or {}
        out.append({
            "decision": bisect.bisect_right(decision_times, float(record.get("time", 0.0))),
            "events_received": record.get("events_received"),
            "candidate_version": record.get("candidate_version"),
            "serving_version": record.get("serving_version"),
            "promote": bool(record.get("promote")),
            "reason": record.get("reason"),
            "n_events": record.get("n_events"),
            "difference": diff.get("value"),
            "difference_lower_bound": diff.get("lower_bound"),
            "margin": record.get("margin"),
        })
    return out


def gate_summary(promotion: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The promotion gate in the summary: on/off, how many checks promoted, the last reason, every check."""
    last = promotion.get("last_decision") or {}
    return {
        "enabled": promotion.get("enabled"),
        "checks_recent": len(checks),
        "promoted_recent": sum(bool(c["promote"]) for c in checks),
        "holdout_events": promotion.get("holdout_events"),
        "last_reason": last.get("reason"),
        "checks": list(checks),
    }


def experiments_summary(experiments: Sequence[Any], storage_uri: str, tau: float) -> dict[str, Any]:
    """summary.json's ``experiments``: per experiment and arm, from the run's decision and event logs
    (policy.experiments.experiment_report; ``{"experiments": []}`` without experiments)."""
    from banditroute.policy.experiments import experiment_report
    from banditroute.serve.experiments import read_experiment_rows

    if not experiments:
        return {"experiments": []}
    decisions, events = read_experiment_rows(storage_uri)
    return experiment_report(experiments, decisions, events, tau)


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def verdict_line(summary: Mapping[str, Any]) -> str:
    """The last line of `up`: the router's last quarter against the best single model on the same requests."""
    best, last = summary.get("best_fixed_model"), summary.get("last_quarter_reward")
    if not best or last is None:
        return "versus fixed models: no decisions to compare"
    verdict = "beats" if summary.get("beats_best_fixed_model") else "does not beat"
    quarters = ", ".join("-" if q is None else f"{q:+.4f}" for q in summary.get("reward_by_quarter") or [])
    return (f"reward by quarter [{quarters}]; last quarter {last:+.4f} {verdict} the best fixed model "
            f"{best['model']} ({best['reward_last_quarter']:+.4f} on the same requests, {best['reward']:+.4f} over the run)")
