"""The learning-curve plot of an online run: running mean reward, the served version and the promotion gate.

Top panel: the running mean reward against decisions, reference levels
(e.g. the best fixed model on the same requests), a dotted line at each
promotion (the first decision a new version answered) and the served
version as a step (right axis). Bottom panel, when the gate checked: its
estimate of candidate minus serving at each check with the lower bound it
tested against ``-margin`` (filled = promoted, hollow = held).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def version_steps(promotions: Sequence[Sequence[int]], start_version: int, decisions: int) -> list[list[int]]:
    """``[[decision, version], ...]`` of a step plot of the served version, from decision 1 to ``decisions``."""
    steps = [[1, int(start_version)]] + [[int(d), int(v)] for d, v in promotions]
    if decisions > steps[-1][0]:
        steps.append([int(decisions), steps[-1][1]])
    return steps


def plot_learning_curve(path: Path, curve: list[list[float]], versions: list[list[float]], title: str,
                        reference: Mapping[str, float] | None = None, promotions: Sequence[Sequence[int]] = (),
                        gate_checks: Sequence[Mapping[str, Any]] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = [c for c in gate_checks if c.get("difference") is not None]
    if checks:
        fig, (ax, gate_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        gate_ax = None
    if curve:
        xs, ys = zip(*curve)
        ax.plot(xs, ys, label="running mean reward (online, explore)", color="tab:blue")
    for i, (name, level) in enumerate((reference or {}).items()):
        ax.axhline(level, linestyle="--", color=f"C{i + 2}", label=name)
    for k, (decision, version) in enumerate(promotions):
        ax.axvline(decision, linestyle=":", color="tab:green", alpha=0.6, linewidth=1,
                   label="promotion (first decision of a new version)" if k == 0 else None)
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if versions:
        ax2 = ax.twinx()
        vx, vy = zip(*versions)
        ax2.step(vx, vy, where="post", color="tab:gray", alpha=0.6, linewidth=1, label="served version (right axis)")
        ax2.set_ylabel("served policy version")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    if gate_ax is not None:
        _plot_gate(gate_ax, checks)
        gate_ax.set_xlabel("decisions")
    else:
        ax.set_xlabel("decisions")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_gate(ax, checks: Sequence[Mapping[str, Any]]) -> None:
    """Each check: the estimate of V(candidate) - V(serving) and down to its lower bound; -margin dashed."""
    for promoted, color, label in ((True, "tab:green", "promoted"), (False, "tab:red", "held")):
        group = [c for c in checks if bool(c.get("promote")) == promoted]
        if not group:
            continue
        xs = [c["decision"] for c in group]
        ys = [c["difference"] for c in group]
        lows = [c.get("difference_lower_bound") for c in group]
        ax.vlines([x for x, lo in zip(xs, lows) if lo is not None], [lo for lo in lows if lo is not None],
                  [y for y, lo in zip(ys, lows) if lo is not None], color=color, alpha=0.5, linewidth=1)
        ax.scatter(xs, ys, color=color if promoted else "none", edgecolors=color, s=22, zorder=3,
                   label=f"candidate - serving, {label}")
    margins = {c.get("margin") for c in checks if c.get("margin") is not None}
    if len(margins) == 1:
        ax.axhline(-margins.pop(), linestyle="--", color="tab:red", alpha=0.5, linewidth=1, label="-margin")
    ax.axhline(0.0, color="black", linewidth=0.6, alpha=0.5)
    ax.set_ylabel("gate estimate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
