"""``fasttricks ablate``: train every recipe of a folder and tabulate them the way the paper does
(one row per recipe, the tricks it uses ticked, then the metrics), as Markdown and JSON.

Each recipe trains into ``OUT/<file stem>``; a row whose run already finished with the same
recipe is read back instead of retrained, and an unfinished one is resumed, so an interrupted
ablation continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from fasttricks import recipes
from fasttricks.adversarial import describe_eps
from fasttricks.atomic import write_json, write_text
from fasttricks.progress import console
from fasttricks.recipes import Recipe

METRICS = {"val_top1": "val top-1", "val_clutter_top1": "val_clutter top-1", "val_robust_top1": "robust top-1"}


def recipe_files(folder: Path) -> list[Path]:
    """The folder's recipes in name order; files starting with ``_`` are shared bases, not rows."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of recipes")
    files = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no recipe (*.yaml not starting with '_')")
    return files


def tricks(recipe: Recipe) -> dict[str, str]:
    """What each trick column shows for this recipe: a tick, a setting, or ''."""
    def any_stage(test) -> bool:
        return any(test(s) for s in recipe.stages)

    adv = next((s.adversarial for s in recipe.stages if s.adversarial is not None), None)
    adversarial = ""
    if adv is not None:
        adversarial = f"{'L∞' if adv.norm == 'linf' else 'L2'} ε={describe_eps(adv)}"
    tick = "✓"
    return {
        "Adversarial": adversarial,
        "Frozen": tick if any_stage(lambda s: s.freeze) else "",
        "Heavy Aug": tick if any_stage(lambda s: s.augment is not None) else "",
        "CutMix": tick if any_stage(lambda s: s.mixing is not None and s.mixing.kind == "cutmix") else "",
        "F-CutMix": tick if any_stage(lambda s: s.mixing is not None and s.mixing.kind == "foreground_cutmix")
        else "",
        "FixRes": tick if recipe.fixres is not None else "",
        "WA": tick if any_stage(lambda s: s.average is not None) else "",
    }


def run_one(recipe: Recipe, data_dir: Path, out: Path, device: torch.device | None) -> dict:
    """Train (or resume, or read back) one row's run; returns its summary."""
    from fasttricks.train import train

    summary_file, config = out / "summary.json", out / "config.yaml"
    same = config.is_file() and recipes.validate(yaml.safe_load(config.read_text())) == recipe
    if same and summary_file.is_file():
        console.print(f"{out}: finished earlier with this recipe, read back")
        return json.loads(summary_file.read_text())
    if config.is_file() and not same:
        console.print(f"[yellow]{out} holds a run of a different recipe: replacing it")
    return train(recipe, data_dir, out, device=device, resume=same, overwrite=not same)


def ablate(folder: Path, data_dir: str | os.PathLike, out: Path, *, overrides=(), sets=(),
           device: torch.device | None = None) -> dict:
    """Run every recipe of ``folder``; write ``OUT/ablation.md`` and ``OUT/ablation.json``."""
    files = recipe_files(folder)
    loaded = [(f, recipes.load_recipe(f, overrides, sets)) for f in files]  # all valid before any training
    rows = []
    for i, (file, recipe) in enumerate(loaded, start=1):
        console.rule(f"[bold]{i}/{len(loaded)} {file.stem}")
        summary = run_one(recipe, Path(data_dir), out / file.stem, device)
        rows.append({"recipe": file.stem, "tricks": tricks(recipe), "paper": recipe.paper,
                     **{k: summary[k] for k in METRICS if k in summary},
                     "test_crop": summary.get("test_crop"), "run": summary["run"]})
    result = {"folder": str(folder), "data": str(data_dir), "overrides": [str(o) for o in overrides],
              "sets": list(sets), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", result)
    write_text(out / "ablation.md", markdown(rows))
    return result


def markdown(rows: list[dict]) -> str:
    """The paper's layout: recipe, the paper's figures, the trick columns used by any row, our metrics."""
    trick_cols = [c for c in rows[0]["tricks"] if any(r["tricks"][c] for r in rows)]
    paper_cols = sorted({k for r in rows for k in r["paper"]})
    metric_cols = [k for k in METRICS if any(k in r for r in rows)]
    header = ["recipe", *(f"paper: {c}" for c in paper_cols), *trick_cols, *(METRICS[k] for k in metric_cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["recipe"], *(_num(r["paper"].get(c), 4) for c in paper_cols),
                 *(r["tricks"][c] for c in trick_cols), *(_num(r.get(k), 1) for k in metric_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
