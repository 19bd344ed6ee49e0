"""The learning-curve plot of an online run: running mean reward and policy version against decisions."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curve(path: Path, curve: list[list[float]], versions: list[list[float]], title: str,
                        reference: dict[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if curve:
        xs, ys = zip(*curve)
        ax.plot(xs, ys, label="running mean reward (online, explore)", color="tab:blue")
    for i, (name, level) in enumerate((reference or {}).items()):
        ax.axhline(level, linestyle="--", color=f"C{i + 2}", label=name)
    ax.set_xlabel("decisions")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if versions:
        ax2 = ax.twinx()
        vx, vy = zip(*versions)
        ax2.plot(vx, vy, color="tab:gray", alpha=0.5, linewidth=1, label="policy version (right axis)")
        ax2.set_ylabel("policy version")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
