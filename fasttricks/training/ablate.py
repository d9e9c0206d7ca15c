"""``fasttricks ablate``: train every recipe of a folder and tabulate them the way the paper does
(one row per recipe, the tricks it uses ticked, then the metrics), as Markdown and JSON.

Each recipe trains into ``OUT/<file stem>``; a row whose run already finished with the same
recipe is read back instead of retrained, and an unfinished one is resumed, so an interrupted
ablation continues where it stopped.

With ``seeds=n`` every row trains n times (``seed`` 0..n-1, into ``OUT/<stem>/seed-<k>``) and the
table shows each metric's mean ± standard deviation, and its paired difference from the first row
± its standard error: the seeds are shared between rows, so a difference between rows is read
against the spread of differences, not the (larger) spread of each row.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import yaml

from fasttricks import recipes
from fasttricks.atomic import make_folder, write_json, write_text
from fasttricks.errors import InputError, InputMissing
from fasttricks.progress import console
from fasttricks.recipes import Recipe
from fasttricks.robust.pgd import describe_eps
from fasttricks.runs import folder as run_folder
from fasttricks.runs.scores import BRAINSCORE
from fasttricks.training.ablation_plot import plot_ablation

METRICS = {"val_top1": "val top-1", "val_clutter_top1": "val_clutter top-1", "val_robust_top1": "robust top-1",
           "val_autoattack_top1": "AutoAttack top-1", "robust_seconds": "robust-stage s",
           "guard_seconds": "of which guard s"}
TIME, GUARD = "robust_seconds", "guard_seconds"  # compared as ratios to the first row's, not as differences


def _metrics(rows_or_summaries: list[dict]) -> dict[str, str]:
    """METRICS, then a column per Brain-Score benchmark any of them holds."""
    found = sorted({k for r in rows_or_summaries for k in r if k.startswith(BRAINSCORE)})
    return {**METRICS, **{k: f"Brain-Score {k.removeprefix(BRAINSCORE)}" for k in found}}


def recipe_files(folder: Path) -> list[Path]:
    """The folder's recipes in name order; files starting with ``_`` are shared bases, not rows."""
    folder = recipes.recipe_folder(folder)
    files = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        raise InputMissing(f"{folder} holds no recipe (*.yaml not starting with '_')")
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
        "SAM": tick if any_stage(lambda s: s.optimizer.sam is not None) else "",
        "AugMix": tick if any_stage(lambda s: s.augmix is not None) else "",
    }


def run_one(recipe: Recipe, data_dir: Path, out: Path, device: torch.device | None) -> dict:
    """Train (or resume, or read back) one row's run; returns its summary."""
    from fasttricks.training.loop import train

    summary_file = out / "summary.json"
    same = _same_recipe(out, recipe)
    if same and summary_file.is_file():
        console.print(f"{out}: finished earlier with this recipe, read back")
        return json.loads(summary_file.read_text())
    if run_folder.is_run(out) and not same:
        console.print(f"[yellow]{out} holds a run of a different recipe: replacing it (--overwrite)")
    return train(recipe, data_dir, out, device=device, resume=same, overwrite=not same)


def _same_recipe(out: Path, recipe: Recipe) -> bool:
    config = out / "config.yaml"
    # by value, key by key: a recipe's notes (what an override changed) are not part of it
    return config.is_file() and not run_folder.recipe_differences(recipes.validate(yaml.safe_load(config.read_text())),
                                                            recipe)


def _check_replacements(runs_by_file: dict[Path, list[tuple[Recipe, Path]]], overwrite: bool) -> None:
    """Refuse, before any training, to replace finished or started rows trained with another recipe."""
    if overwrite:
        return
    other = [run_dir for pairs in runs_by_file.values() for recipe, run_dir in pairs
             if run_folder.is_run(run_dir) and not _same_recipe(run_dir, recipe)]
    if other:
        raise run_folder.RunFolderError(
            f"{len(other)} row(s) already hold runs of another recipe (another --set or --override?): "
            + ", ".join(str(p) for p in other[:6]) + (" ..." if len(other) > 6 else "")
            + "; choose another --out, or pass --overwrite to replace them")


def ablate(folder: Path, data_dir: str | os.PathLike, out: Path, *, overrides=(), sets=(),
           device: torch.device | None = None, seeds: int = 1, overwrite: bool = False,
           benchmarks: list[str] = (), toy: bool = False) -> dict:
    """Run every recipe of ``folder`` (``seeds`` times each); write ``OUT/ablation.md``, ``.json``
    and ``.png`` (each row's accuracies, seed by seed).
    With ``benchmarks``, each run's final model is also scored on those Brain-Score benchmarks (a
    column each, the records in the run's ``brainscore/scores.jsonl``, each model scored once).
    With ``toy`` and no ``overrides``, each row gets its own recipe's toy override, as ``train
    --data toy`` gives it."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, not {seeds}")
    files = recipe_files(folder)
    planned = _runs(files, out, overrides, sets, seeds, toy)  # every recipe validated before any training
    _check_replacements(planned, overwrite)
    loaded = _benchmarks(benchmarks)  # before any training: one that cannot load stops here
    summaries = {file: [] for file in files}
    # seed by seed, every row in turn: a drift in the machine's speed then falls on every row alike
    # (the time ratios between rows are read within a seed)
    for k in range(seeds):
        for i, file in enumerate(files, start=1):
            recipe, run_dir = planned[file][k]
            console.rule(f"[bold]{i}/{len(files)} {file.stem}" + (f" · {run_dir.name}" if seeds > 1 else ""))
            summary = run_one(recipe, Path(data_dir), run_dir, device)
            summaries[file].append({**summary, **_final_scores(run_dir, loaded),
                                    **robust_stage_time(run_dir, recipe)})
    rows = [_row(file.stem, planned[file][0][0], summaries[file]) for file in files]
    if seeds > 1:
        _add_differences(rows)
    _add_time_ratios(rows, [summaries[file] for file in files])
    result = {"folder": str(folder), "data": str(data_dir), "overrides": [str(o) for o in overrides],
              "sets": list(sets), "seeds": seeds, "rows": rows}
    make_folder(out)
    write_json(out / "ablation.json", result)
    write_text(out / "ablation.md", markdown(rows))
    plot_ablation(rows, _metrics(rows), out)
    return result


def robust_stage_time(run_dir: Path, recipe: Recipe) -> dict[str, float]:
    """``robust_seconds``: the seconds the run's adversarial stages took to train, their guard's
    measurements and any epoch a collapse discarded included (from metrics.jsonl); empty when the
    run has no adversarial stage. Evaluation and checkpointing are left out: they do not depend on
    the training attack."""
    adversarial = {i for i, s in enumerate(recipe.stages) if s.adversarial is not None}
    rows = [r for r in run_folder.read_metrics(run_dir) if r.get("stage_index") in adversarial]
    if not rows:
        return {}
    guard = sum(r.get("guard_seconds", 0.0) for r in rows)
    trained = sum(r.get("seconds", 0.0) + r.get("discarded_seconds", 0.0) for r in rows)
    return {"robust_seconds": trained + guard,
            **({"guard_seconds": guard} if any("guard_seconds" in r for r in rows) else {})}


def _benchmarks(benchmarks: list[str]) -> dict:
    if not benchmarks:
        return {}
    from fasttricks.brainscore.follow import load_all

    return load_all(list(benchmarks))


def _final_scores(run_dir: Path, loaded: dict) -> dict[str, float]:
    """``brainscore:ID`` -> the final model's score on each loaded benchmark."""
    if not loaded:
        return {}
    from fasttricks.brainscore.follow import score_pending
    from fasttricks.runs.scores import read_scores

    score_pending(run_dir, loaded, lambda run, found: [t for t in found if t.name == "final"])
    final = [r for r in read_scores(run_dir) if r["checkpoint"] == "final" and r["error"] is None]
    return {f"{BRAINSCORE}{r['benchmark']}": r["score"] for r in final if r["benchmark"] in loaded}


def _runs(files: list[Path], out: Path, overrides, sets, seeds: int,
          toy: bool = False) -> dict[Path, list[tuple[Recipe, Path]]]:
    """Each file's (recipe, run folder) pairs: one with the recipe's own seed, or one per seed."""
    variants = [([], "")] if seeds == 1 else [([f"seed={k}"], f"seed-{k}") for k in range(seeds)]
    planned, used = {}, set()
    for f in files:
        row_overrides = overrides or ([recipes.toy_override(recipes.load_recipe(f))] if toy else [])
        used.update(str(o) for o in row_overrides)
        planned[f] = [(recipes.load_recipe(f, row_overrides, [*sets, *extra]), out / f.stem / sub)
                      for extra, sub in variants]
    if toy and not overrides:
        console.print(f"--data toy: each row with its recipe's toy override ({', '.join(sorted(used))}; "
                      "--no-toy-settings trains the recipes as written)", soft_wrap=True)
    return planned


def _row(name: str, recipe: Recipe, summaries: list[dict]) -> dict:
    """One table row: a single run's metrics, or their mean over seeds with the spread and values."""
    row = {"recipe": name, "tricks": tricks(recipe), "paper": recipe.paper}
    for k in _metrics(summaries):
        values = [s[k] for s in summaries if k in s]
        if values:
            row[k] = statistics.fmean(values)
            if len(summaries) > 1:
                row.setdefault("per_seed", {})[k] = values
                row.setdefault("sd", {})[k] = statistics.stdev(values)
    row["test_crop"] = summaries[0].get("test_crop")
    row["run"] = summaries[0]["run"] if len(summaries) == 1 else [s["run"] for s in summaries]
    return row


def _add_differences(rows: list[dict]) -> None:
    """Each row's paired difference from the first row, per metric: mean and standard error over
    seeds; for the robust stage's time, the paired ratio instead (``time_ratio``)."""
    first = rows[0]["per_seed"]
    for row in rows:
        row["vs_first"] = {}
        for k, values in row["per_seed"].items():
            if k not in first or k in (TIME, GUARD):
                continue
            row["vs_first"][k] = _mean_se([v - f for v, f in zip(values, first[k], strict=True)])


def _add_time_ratios(rows: list[dict], summaries: list[list[dict]]) -> None:
    """Each row's robust-stage time as a ratio to the first row's, seed by seed (the runs of one
    seed ran one after another, so they share the machine's state): mean and standard error."""
    def steps(s: dict) -> float:
        return s[TIME] - s.get(GUARD, 0.0)

    first = summaries[0]
    for row, runs_of_row in zip(rows, summaries, strict=True):
        if not all(TIME in s for s in runs_of_row + first):
            continue
        row["time_ratio"] = _mean_se([s[TIME] / f[TIME] for s, f in zip(runs_of_row, first, strict=True)])
        if any(GUARD in s for group in summaries for s in group):  # the guard's share apart
            row["steps_time_ratio"] = _mean_se([steps(s) / steps(f) for s, f in zip(runs_of_row, first, strict=True)])


def _mean_se(values: list[float]) -> dict:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se}


def markdown(rows: list[dict]) -> str:
    """The paper's layout: recipe, the paper's figures, the trick columns used by any row, our metrics
    (with seeds: mean ± sd, then each metric's difference from the first row ± its standard error)."""
    trick_cols = [c for c in rows[0]["tricks"] if any(r["tricks"][c] for r in rows)]
    paper_cols = sorted({k for r in rows for k in r["paper"]})
    names = _metrics(rows)
    metric_cols = [k for k in names if any(k in r for r in rows)]
    seeded = "vs_first" in rows[0]
    delta_cols = [k for k in metric_cols if k not in (TIME, GUARD)] if seeded else []
    ratio_cols = [k for k in ("time_ratio", "steps_time_ratio") if any(k in r for r in rows)]
    ratio_names = {"time_ratio": f"robust-stage time ÷ {rows[0]['recipe']}",
                   "steps_time_ratio": f"without the guard ÷ {rows[0]['recipe']}"}
    header = ["recipe", *(f"paper: {c}" for c in paper_cols), *trick_cols,
              *(names[k] + (" (paper)" if k in PAPER_KEYS else "") for k in metric_cols),
              *(ratio_names[k] for k in ratio_cols),
              *(f"Δ {names[k]} vs {rows[0]['recipe']}" for k in delta_cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["recipe"], *(_num(r["paper"].get(c), 4) for c in paper_cols),
                 *(r["tricks"][c] for c in trick_cols),
                 *(_metric_cell(r, k, seeded) for k in metric_cols),
                 *(_ratio(r.get(k)) for k in ratio_cols),
                 *(_delta_cell(r, rows[0], k) for k in delta_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    if seeded:
        n = len(next(iter(rows[0]["per_seed"].values())))
        lines.append(f"\n{n} seeds per row (the same seeds in every row); mean ± standard deviation; "
                     "Δ: mean paired difference ± its standard error.")
    if ratio_cols:
        lines.append(("\n" if not seeded else "") + "Robust-stage time: the adversarial stages' training seconds, the "
                     "guard's measurements included (and, where a row has a guard, without them); its ratio to "
                     "the first row's is taken seed by seed (mean ± standard error).")
    return "\n".join(lines) + "\n"


# The paper's figure beside ours for the benchmarks its tables report (Table 1: public behaviour,
# Table 2: public V1); the recipes' paper: keys hold them.
PAPER_KEYS = {f"{BRAINSCORE}Rajalingham2018public-i2n": "public_behavior",
              f"{BRAINSCORE}FreemanZiemba2013public.V1-pls": "public_v1"}


def _digits(key: str) -> int:
    return 4 if key.startswith(BRAINSCORE) else 1  # scores in [0, 1], accuracies in %


def _metric_cell(row: dict, key: str, seeded: bool) -> str:
    digits = _digits(key)
    cell = _num(row.get(key), digits) + (f" ± {row['sd'][key]:.{digits}f}" if seeded and key in row else "")
    paper = row["paper"].get(PAPER_KEYS.get(key, ""))
    return cell + (f" ({paper:.4f})" if paper is not None and key in row else "")


def _ratio(ratio: dict | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio['mean']:.2f}" + ("" if ratio["se"] is None else f" ± {ratio['se']:.2f}")


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _delta(diff: dict | None, digits: int = 1) -> str:
    return "" if diff is None else f"{diff['mean']:+.{digits}f} ± {diff['se']:.{digits}f}"


def _delta_cell(row: dict, first: dict, key: str) -> str:
    """The first row against itself is no measurement: a dash."""
    return "—" if row is first else _delta(row["vs_first"].get(key), _digits(key))
