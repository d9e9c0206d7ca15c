"""``fasttricks plot``: a run's curves across its stages in one PNG, several runs overlaid (people
would rather look than read a 15-hour run's metrics.jsonl). Also written as ``RUN/curves.png``
at the end of every stage."""

from __future__ import annotations

import json
from pathlib import Path

from fasttricks.atomic import atomic_path
from fasttricks.errors import InputError
from fasttricks.runs.folder import read_metrics, saved_recipe
from fasttricks.runs.scores import BRAINSCORE, epoch_of, read_scores

PANELS = {"train_loss": "train loss", "lr": "learning rate", "resolution": "training resolution (px)",
          "val_top1": "val top-1 (%)", "val_clutter_top1": "val_clutter top-1 (%)",
          "val_robust_top1": "robust top-1 (%)", "guard_robust_top1": "guard: robust top-1, train subset (%)",
          "images_per_s": "images/s"}
CURVES_NAME = "curves.png"


def curves(run: Path) -> dict[str, list[tuple[float, float]]]:
    """Per metric, (x, value) points: x counts epochs across the run's stages (a stage's averaged
    model sits at its stage's end). Robust top-1 is measured once, on the final model: one point."""
    recipe = saved_recipe(run)
    starts = recipe.stage_starts()
    points: dict[str, list[tuple[float, float]]] = {}
    for row in read_metrics(run):
        x = starts[row["stage_index"]] + row["epoch"]
        for key in PANELS:
            if key in row:
                points.setdefault(key, []).append((x, row[key]))
    summary = run / "summary.json"
    if summary.is_file() and "val_robust_top1" in (s := json.loads(summary.read_text())):
        points["val_robust_top1"] = [(float(recipe.total_epochs()), s["val_robust_top1"])]
    for record in read_scores(run):  # brainscore follow / score --checkpoints; the final model at the end
        if record["error"] is None and not record.get("step"):
            x = epoch_of(record, starts, recipe.total_epochs())
            points.setdefault(f"{BRAINSCORE}{record['benchmark']}", []).append((float(x), record["score"]))
    for key in [k for k in points if k.startswith(BRAINSCORE)]:
        points[key].sort()
    return points


def plot(runs: list[Path], out: Path) -> Path:
    """Write one PNG with a panel per metric any run has, every run a line (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: curves(run) for run in runs}
    keys = [k for k in PANELS if any(k in d for d in data.values())]
    if any(k.startswith(BRAINSCORE) for d in data.values() for k in d):
        keys.append(BRAINSCORE)
    if not keys:
        raise InputError(f"no metrics to plot in {', '.join(map(str, runs))} (no metrics.jsonl rows yet)")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    boundaries = saved_recipe(runs[0]).stage_starts()[1:]  # stage boundaries of the first run
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), dpi=110, squeeze=False, sharex=True)
    for ax, key in zip(axes.flat, keys, strict=False):
        for run, points in data.items():
            for name in [k for k in points if k == key or (key == BRAINSCORE and k.startswith(BRAINSCORE))]:
                xs, ys = zip(*points[name], strict=True)
                label = run.name if key != BRAINSCORE else f"{run.name}: {name.removeprefix(BRAINSCORE)}"
                ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", markersize=3, label=label)
        for start in boundaries:
            ax.axvline(start, color="gray", linestyle=":", linewidth=1)
        ax.set(title=PANELS.get(key, "Brain-Score (brainscore follow)"), xlabel="epoch (all stages)")
        if key == BRAINSCORE:
            ax.legend(fontsize=6)
        if key == "lr":  # stage 2's 1e-4 beside stage 1's 0.1 must not look like zero
            ax.set_yscale("log", nonpositive="mask")
        ax.tick_params(labelbottom=True)  # shared x, but every panel keeps its numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
