"""pipelines/fast-at/ and what `ablate` measures of it: each row with its own toy override (an
override file may start from another with base:), AutoAttack beside PGD-10 in the final evaluation,
the robust stage's time (the guard's included) as a ratio to the first row's, seed by seed, the
rows of one seed run one after another."""

from __future__ import annotations

import json

import pytest

from fasttricks.recipes import PIPELINES, RecipeError, load_recipe
from fasttricks.robust import autoattack
from fasttricks.runs import folder as run_folder
from fasttricks.training.ablate import _runs, ablate, recipe_files

SIZES = ["start=scratch", "model.arch=test_efficientnet", "data.val_resize=48", "data.val_crop=40",
         "data.val_batch_size=200", "stages.0.epochs=2", "stages.0.batch_size=64",
         "stages.0.resolution={min: 32, max: 32}"]
ROW = """base: {baseline}
name: {name}
evaluation:
  attack: {{eps: 2/255, step_size: 0.5/255, steps: 10}}
  autoattack: {{eps: 2/255}}
stages:
  "*":
    adversarial: {adversarial}
"""


def test_ablate_with_toy_data_gives_each_fast_at_row_its_own_toy_override(tmp_path):
    files = recipe_files(PIPELINES / "fast-at")
    assert [f.stem for f in files] == ["1-pgd3", "2-fgsm-rs", "3-n-fgsm", "4-winner-fast"]
    planned = _runs(files, tmp_path, [], [], 1, toy=True)
    pgd3, fgsm, nfgsm, fast = (planned[f][0][0] for f in files)
    for recipe in (pgd3, fgsm, nfgsm, fast):
        assert recipe.model.arch == "test_efficientnet" and recipe.evaluation.autoattack.images == 100
        assert recipe.total_epochs() == 12 and recipe.stages[0].adversarial.eps == pytest.approx(2 / 255)
    assert pgd3.stages[0].adversarial.guard is None and fgsm.stages[0].adversarial.guard is None
    assert nfgsm.stages[0].adversarial.guard.images == 256  # toy-fast-at-n-fgsm.yaml over its base:
    assert [s.epochs for s in fast.stages] == [9, 3] and fast.stages[0].adversarial.method == "n_fgsm"
    assert fast.stages[1].adversarial.steps == 3 and fast.stages[1].optimizer.lr == pytest.approx(0.0526)
    assert _runs(files, tmp_path, [], [], 1)[files[0]][0][0].model.arch == "efficientnet_b1"  # not toy: as written


def test_an_override_base_that_is_missing_or_a_loop_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="is a loop"):
        load_recipe("baseline", [tmp_path / "a.yaml"])
    with pytest.raises(RecipeError, match="base: nowhere.yaml does not exist"):
        load_recipe("baseline", [tmp_path / "c.yaml"])


def test_ablate_reports_autoattack_and_the_robust_stage_time_as_a_ratio_seed_by_seed(toy_data, tmp_path,
                                                                                     monkeypatch):
    # AutoAttack itself is tested in test_autoattack.py; here a stand-in that leaves the images
    # as they are keeps four runs quick (Square's 5,000 queries are minutes on a CPU)
    monkeypatch.setattr(autoattack, "attack_chunk", lambda model, images, *rest: images)
    folder = tmp_path / "rows"
    folder.mkdir()
    baseline = PIPELINES / "baseline.yaml"
    (folder / "1-pgd.yaml").write_text(ROW.format(baseline=baseline, name="pgd", adversarial="{eps: 2/255, steps: 2}"))
    (folder / "2-n-fgsm.yaml").write_text(ROW.format(baseline=baseline, name="nf", adversarial=(
        "{method: n_fgsm, eps: 2/255, guard: {images: 32}}")))
    result = ablate(folder, toy_data, tmp_path / "out", sets=SIZES, seeds=2)
    out = tmp_path / "out"
    order = sorted(((out / row / f"seed-{k}" / "config.yaml").stat().st_mtime_ns, f"{row}/{k}")
                   for row in ("1-pgd", "2-n-fgsm") for k in (0, 1))
    assert [name for _, name in order] == ["1-pgd/0", "2-n-fgsm/0", "1-pgd/1", "2-n-fgsm/1"]  # seed by seed
    times = {}
    for row in ("1-pgd", "2-n-fgsm"):
        times[row] = []
        for k in (0, 1):
            run = out / row / f"seed-{k}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["autoattack"]["images"] == {"val": 100}
            assert summary["autoattack"]["library"].startswith("torchattacks ")
            assert summary["val_autoattack_top1"] == summary["val_top1"]  # every image, the stand-in changes none
            metrics = run_folder.read_metrics(run)
            guard = sum(r.get("guard_seconds", 0.0) for r in metrics)
            assert (guard > 0) == (row == "2-n-fgsm")
            times[row].append(sum(r["seconds"] for r in metrics) + guard)
    pgd, nf = result["rows"]
    assert pgd["per_seed"]["robust_seconds"] == pytest.approx(times["1-pgd"])
    assert nf["per_seed"]["guard_seconds"] == pytest.approx(
        [sum(r.get("guard_seconds", 0.0) for r in run_folder.read_metrics(out / "2-n-fgsm" / f"seed-{k}"))
         for k in (0, 1)])
    ratios = [n / p for n, p in zip(times["2-n-fgsm"], times["1-pgd"], strict=True)]
    assert pgd["time_ratio"] == {"mean": 1.0, "se": 0.0}
    assert nf["time_ratio"]["mean"] == pytest.approx(sum(ratios) / 2)
    assert nf["time_ratio"]["se"] == pytest.approx(abs(ratios[0] - ratios[1]) / 2)
    steps = [(n - g) / p for n, g, p in zip(times["2-n-fgsm"], nf["per_seed"]["guard_seconds"], times["1-pgd"],
                                            strict=True)]
    assert nf["steps_time_ratio"]["mean"] == pytest.approx(sum(steps) / 2)  # the guard's share apart
    assert "robust_seconds" not in nf["vs_first"] and "guard_seconds" not in nf["vs_first"]
    assert "val_autoattack_top1" in nf["vs_first"]
    header = (out / "ablation.md").read_text().splitlines()[0]
    for column in ("AutoAttack top-1", "robust-stage s", "of which guard s", "robust-stage time ÷ 1-pgd",
                   "without the guard ÷ 1-pgd", "Δ AutoAttack top-1 vs 1-pgd"):
        assert f" {column} |" in header
