"""``OUT/ablation.png``: an ablation's accuracies, a panel per metric, each row's seeds as dots joined
seed by seed to the first row's. A paired difference of 1 point with a 3-point spread between seeds
is read at a glance from the slopes; from a table of means ± sd it is not."""

from __future__ import annotations

from pathlib import Path

from fasttricks.atomic import atomic_path

PLOT_NAME = "ablation.png"


def panels(rows: list[dict], metrics: dict[str, str]) -> dict[str, list[list[float]]]:
    """Per metric any row has (times left out: they are ratios, not accuracies), each row's values:
    one per seed (in seed order, so index k pairs across rows), or the single run's."""
    out = {}
    for key in metrics:
        if key.endswith("_seconds") or not any(key in r for r in rows):
            continue
        out[key] = [r.get("per_seed", {}).get(key, [r[key]] if key in r else []) for r in rows]
    return out


def plot_ablation(rows: list[dict], metrics: dict[str, str], out: Path) -> Path | None:
    """Write the plot atomically; None when no row has an accuracy to show."""
    data = panels(rows, metrics)
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["recipe"] for r in rows]
    fig, axes = plt.subplots(1, len(data), figsize=(1.2 + 1.3 * len(rows) * len(data), 4), squeeze=False)
    for ax, (key, values) in zip(axes[0], data.items(), strict=True):
        seeds = max(len(v) for v in values)
        for k in range(seeds):  # one line per seed: its slope is that seed's paired difference
            xs = [i for i, v in enumerate(values) if k < len(v)]
            ax.plot(xs, [values[i][k] for i in xs], "o-", color="tab:blue", alpha=0.35, markersize=4)
        means = [sum(v) / len(v) if v else float("nan") for v in values]
        ax.plot(range(len(rows)), means, "_", color="black", markersize=22, markeredgewidth=2,
                label="mean" if seeds > 1 else None)
        ax.set_title(metrics[key])
        ax.set_ylabel("%" if key.endswith("_top1") else "score")  # Brain-Score columns are 0-1
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    if max(len(v) for values in data.values() for v in values) > 1:
        axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(out / PLOT_NAME) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out / PLOT_NAME
