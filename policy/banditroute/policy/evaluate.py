"""Offline evaluation of routers on held-out prompts, over a grid of preferences.

Pure functions: fit routers, score their choices against the test outcome
table, and write ``report.json`` / ``report.md`` / ``pareto.png``. Every
router is scored with the SAME reward (the evaluated policy's ``tau``), so
the numbers are comparable across routers.

report.json::

    {"preferences": [w_cost, ...],
     "routers": {NAME: [{"w_cost": w, "score": s, "cost": c, "reward": r}, ...]},
     "summary": {NAME: {"mean_reward": .., "mean_score": .., "mean_cost": ..}},
     "tau": .., "n_test": .., "upper_bounds": ["oracle"], ...}

``score`` is the mean quality (NaN = 0), ``cost`` the mean USD per prompt and
``reward`` the mean of (1 - w) * score - w * min(cost / tau, 1).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from banditroute.core.data import RoutingData
from banditroute.policy.reward import DEFAULT_PREFERENCE_GRID, reward
from banditroute.policy.baselines import UPPER_BOUNDS
from banditroute.policy.routers import Router

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PARETO_PNG = "pareto.png"


def parse_grid(text: str | None) -> tuple[float, ...]:
    """'0,0.1,0.5' -> (0.0, 0.1, 0.5); None/'' -> the default grid. Values must lie in [0, 1]."""
    if not text:
        return tuple(DEFAULT_PREFERENCE_GRID)
    try:
        grid = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--grid: expected comma-separated numbers, got {text!r}") from None
    if not grid:
        raise ValueError("--grid: no values")
    bad = [w for w in grid if not (math.isfinite(w) and 0.0 <= w <= 1.0)]
    if bad:
        raise ValueError(f"--grid: w_cost must be in [0, 1], got {bad}")
    return grid


def score_choices(choices: np.ndarray, test: RoutingData, w_cost: float, tau: float) -> dict[str, float]:
    """Mean score (NaN = 0), mean USD cost and mean reward of routing row i to model choices[i]."""
    choices = np.asarray(choices, dtype=np.int64)
    if choices.shape != (len(test),):
        raise ValueError(f"expected {len(test)} choices, got shape {choices.shape}")
    if len(test) and (choices.min() < 0 or choices.max() >= test.n_models):
        raise ValueError(f"choice out of range [0, {test.n_models})")
    rows = np.arange(len(test))
    score = test.scores_filled[rows, choices].astype(np.float64)
    cost = test.costs[rows, choices].astype(np.float64)
    r = reward(score, cost, w_cost, tau)
    return {"w_cost": float(w_cost), "score": float(score.mean()), "cost": float(cost.mean()), "reward": float(r.mean())}


def evaluate_router(
    router: Router, test: RoutingData, test_embeddings: np.ndarray, grid: Sequence[float], tau: float
) -> list[dict[str, float]]:
    """One (fitted) router over the preference grid: [{"w_cost", "score", "cost", "reward"}, ...]."""
    return [score_choices(router.choose(test_embeddings, float(w), test), test, float(w), tau) for w in grid]


def evaluate_routers(
    routers: Sequence[Router],
    train: RoutingData,
    train_embeddings: np.ndarray,
    test: RoutingData,
    test_embeddings: np.ndarray,
    grid: Sequence[float] = DEFAULT_PREFERENCE_GRID,
    tau: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, float]]:
    """Fit every router on train (with ``tau``), evaluate on test.

    Returns (results by router name, fit+evaluation seconds by router name).
    """
    results: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    for router in routers:
        start = time.perf_counter()
        router.fit(train, train_embeddings, tau, seed)
        results[router.name] = evaluate_router(router, test, test_embeddings, grid, tau)
        seconds[router.name] = time.perf_counter() - start
        if progress is not None:
            progress(1)
    return results, seconds


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean reward, score and cost across the grid, per router."""
    return {
        name: {
            "mean_reward": float(np.mean([p["reward"] for p in points])),
            "mean_score": float(np.mean([p["score"] for p in points])),
            "mean_cost": float(np.mean([p["cost"] for p in points])),
        }
        for name, points in results.items()
    }


def build_report(
    results: dict[str, list[dict[str, float]]],
    grid: Sequence[float],
    tau: float,
    n_test: int,
    **extra: Any,
) -> dict[str, Any]:
    """The report.json document (``extra`` adds top-level keys such as data provenance)."""
    for name, points in results.items():
        if [p["w_cost"] for p in points] != [float(w) for w in grid]:
            raise ValueError(f"router {name!r} was not evaluated on the grid {list(grid)}")
    return {
        "preferences": [float(w) for w in grid],
        "routers": results,
        "summary": summarise(results),
        "tau": float(tau),
        "n_test": int(n_test),
        "upper_bounds": sorted(n for n in results if n in UPPER_BOUNDS),
        **extra,
    }


def _ordered_names(report: dict[str, Any]) -> list[str]:
    """Upper bounds first, then routers by mean reward across the grid, best first."""
    summary = report.get("summary") or summarise(report["routers"])
    names = list(report["routers"])
    bounds = [n for n in names if n in UPPER_BOUNDS]
    rest = sorted((n for n in names if n not in UPPER_BOUNDS), key=lambda n: -summary[n]["mean_reward"])
    return bounds + rest


def _fmt_cost(c: float) -> str:
    return f"{c:.2e}"


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown table: one row per router, mean reward per w_cost, then means across the grid."""
    grid = report["preferences"]
    summary = report.get("summary") or summarise(report["routers"])
    header = ["router"] + [f"w={w:g}" for w in grid] + ["mean reward", "mean score", "mean cost (USD)"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for name in _ordered_names(report):
        label = f"{name} (upper bound: reads test outcomes)" if name in UPPER_BOUNDS else name
        if name == "policy":
            label = "**policy**"
        s = summary[name]
        cells = [label] + [f"{p['reward']:.4f}" for p in report["routers"][name]]
        cells += [f"{s['mean_reward']:.4f}", f"{s['mean_score']:.4f}", _fmt_cost(s["mean_cost"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Reward per prompt: (1 - w) * score - w * min(cost / tau, 1), tau = {report['tau']:.6g} USD "
        f"(the policy's); mean over {report['n_test']} test prompts. Rows sorted by mean reward across the grid.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot_pareto(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Mean score vs mean cost: one curve per router across the grid, single models as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(11, 6))
    names = _ordered_names(report)
    singles = [n for n in names if n.startswith("single:")]
    curves = [n for n in names if not n.startswith("single:")]
    palette = [c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3]]  # red is the policy's
    others = iter(palette * 3)
    for name in curves:
        pts = report["routers"][name]
        xs = [max(p["cost"], 1e-12) for p in pts]
        ys = [p["score"] for p in pts]
        if name in UPPER_BOUNDS:
            style = {"linestyle": "--", "color": "black"}
        elif name == "policy":
            style = {"linewidth": 2.5, "color": "tab:red", "zorder": 4}
        else:
            style = {"color": next(others)}
        label = f"{name} (upper bound)" if name in UPPER_BOUNDS else name
        ax.plot(xs, ys, marker="o", markersize=4, label=label, **style)
    markers = "sDv^<>pPX*hH+x"
    for i, name in enumerate(singles):
        p = report["routers"][name][0]
        ax.scatter([max(p["cost"], 1e-12)], [p["score"]], marker=markers[i % len(markers)], s=50, color="grey",
                   edgecolors="black", label=name, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per prompt (USD, log scale)")
    ax.set_ylabel("mean score")
    ax.set_title(f"quality vs cost over w_cost in {report['preferences']} ({report['n_test']} test prompts)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and pareto.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / PARETO_PNG}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(render_markdown(report))
    plot_pareto(report, paths["png"])
    return paths
