"""The winner recipe end to end on the toy data (tiny model, CPU): every stage, the averaged model,
the FixRes curve and a summary with every field; resuming in the middle of stage 2 ends where the
uninterrupted run ends; weight averaging (checkpoints or EMA) inside a run; `ablate`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from toy_runs import small_winner as _winner

from fasttricks.evaluation import fixres
from fasttricks.models.weights import read_info
from fasttricks.recipes import PIPELINES, load_recipe
from fasttricks.runs.folder import RunFolderError
from fasttricks.training import finish as finish_module
from fasttricks.training.ablate import METRICS, ablate
from fasttricks.training.ablation_plot import panels
from fasttricks.training.loop import train

TIMING = {"images_per_s", "seconds", "seconds_this_call", "guard_seconds"}


def _weights(path):
    return load_file(str(path))


def test_winner_runs_every_stage_and_its_summary_holds_every_field(winner_run):
    out, summary = winner_run
    for name in ("config.yaml", "metrics.jsonl", "final.safetensors", "summary.json", "fixres.csv", "fixres.png",
                 "curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("val_top1", "val_clutter_top1", "val_robust_top1", "val_clutter_robust_top1", "robust_attack",
                "test_crop", "test_resize", "fixres"):
        assert key in summary, key
    assert summary["test_crop"] in (32, 40, 48, 56, 64) and summary["robust_attack"] == "linf:2/255:2"
    assert summary["val_robust_top1"] <= summary["val_top1"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r.get("averaged")) for r in rows] == [
        ("adversarial", 1, None), ("adversarial", 2, None), ("behaviour", 1, None), ("behaviour", 2, None),
        ("behaviour", 3, None), ("behaviour", 3, "epochs 2,3")]
    from fasttricks.runs.plots import curves  # the plot's x runs across both stages; the average at its stage's end

    assert [x for x, _ in curves(out)["val_top1"]] == [1, 2, 3, 4, 5, 5]
    assert curves(out)["val_robust_top1"] == [(5.0, summary["val_robust_top1"])]
    info = read_info(out / "final.safetensors")
    assert (info["val_crop"], info["val_resize"]) == (summary["test_crop"], summary["test_resize"])
    assert info["frozen"][:2] == ["conv_stem", "bn1"]
    assert info["training_data"] == "toy (400 images, 10 classes)"  # what the export's metadata names


def test_the_frozen_half_keeps_stage_one_weights_and_statistics_through_averaging(winner_run):
    out, _ = winner_run
    stage1, final = _weights(out / "checkpoints/s0-e002/model.safetensors"), _weights(out / "final.safetensors")
    frozen = read_info(out / "final.safetensors")["frozen"]
    in_frozen = [k for k in final if any(k.startswith(p + ".") for p in frozen)]
    assert any("running_mean" in k for k in in_frozen)
    assert all(torch.equal(final[k], stage1[k]) for k in in_frozen)
    assert not torch.equal(final["classifier.weight"], stage1["classifier.weight"])


def test_the_averaged_model_is_the_mean_of_the_last_epochs_with_statistics_recomputed(winner_run):
    out, _ = winner_run
    e2, e3 = (_weights(out / f"checkpoints/s1-e00{e}/model.safetensors") for e in (2, 3))
    avg = _weights(out / "checkpoints/s1-e003-avg/model.safetensors")
    assert torch.equal(avg["classifier.weight"], ((e2["classifier.weight"].double() + e3["classifier.weight"].double())
                                                  / 2).float())
    assert not torch.allclose(avg["bn2.running_mean"], (e2["bn2.running_mean"] + e3["bn2.running_mean"]) / 2)
    assert torch.equal(_weights(out / "final.safetensors")["classifier.weight"], avg["classifier.weight"])


def test_resume_in_the_middle_of_stage_two_ends_where_the_uninterrupted_run_ends(winner_run, toy_data, tmp_path):
    out, summary = winner_run
    part = train(_winner(), toy_data, tmp_path / "r", stop_after=3, show_progress=False)
    assert part["stopped_after_epochs"] == 3 and not (tmp_path / "r" / "checkpoints" / "s1-e003").exists()
    resumed = train(_winner(), toy_data, tmp_path / "r", resume=True, show_progress=False)
    a, b = _weights(out / "final.safetensors"), _weights(tmp_path / "r" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = TIMING | {"run", "final_weights"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in summary.items() if k not in drop}
    assert (tmp_path / "r" / "fixres.csv").read_text() == (out / "fixres.csv").read_text()


SHORT = ("stages.0.epochs=1", "stages.1.epochs=2")  # 3 epochs: stage 1's last epoch, then its average


@pytest.fixture(scope="module")
def short_run(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "short"
    train(_winner(*SHORT), toy_data, out, show_progress=False)
    return out


def _stop_after_the_last_epoch(toy_data, out, monkeypatch):
    train(_winner(*SHORT), toy_data, out, stop_after=3, show_progress=False)
    # the stop came after the averaging; as if the process had died before the average was saved
    shutil.rmtree(out / "checkpoints" / "s1-e002-avg")


def _stop_after_the_averaging(toy_data, out, monkeypatch):
    train(_winner(*SHORT), toy_data, out, stop_after=3, show_progress=False)
    assert (out / "checkpoints" / "s1-e002-avg").is_dir() and not (out / "final.safetensors").exists()


def _crash_in(target, name, model_written: bool = False):
    """A crash inside ``target.name``; the final model is on disk already when the crash is in the
    final evaluation (training/finish.py: the model first), and the summary says so."""
    def stop(toy_data, out, monkeypatch):
        def crash(*args, **kwargs):
            raise RuntimeError("node lost")
        with monkeypatch.context() as m:
            m.setattr(target, name, crash)
            with pytest.raises(RuntimeError, match="node lost"):
                train(_winner(*SHORT), toy_data, out, show_progress=False)
        assert (out / "final.safetensors").exists() == model_written
        if model_written:
            assert json.loads((out / "summary.json").read_text())["final_evaluation"] == "pending"
    return stop


def _without(row: dict, keys) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


@pytest.mark.parametrize("stop", [_stop_after_the_last_epoch, _stop_after_the_averaging,
                                  _crash_in(fixres, "choose"),
                                  _crash_in(finish_module, "_final_accuracy", model_written=True)],
                         ids=["after the last epoch", "after the averaging", "during FixRes",
                              "during the final evaluation"])
def test_a_resume_at_every_boundary_after_the_last_stage_leaves_the_uninterrupted_runs_files(
        short_run, toy_data, tmp_path, monkeypatch, stop):
    out = tmp_path / "r"
    stop(toy_data, out, monkeypatch)
    train(_winner(*SHORT), toy_data, out, resume=True, show_progress=False)
    a, b = _weights(short_run / "final.safetensors"), _weights(out / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the run's state is whole: frozen modules, training resolution, the test size FixRes chose
    assert read_info(out / "final.safetensors") == read_info(short_run / "final.safetensors")
    assert read_info(out / "final.safetensors")["frozen"][:2] == ["conv_stem", "bn1"]
    drop = TIMING | {"run", "final_weights"}
    summaries = [json.loads((o / "summary.json").read_text()) for o in (short_run, out)]
    assert _without(summaries[1], drop) == _without(summaries[0], drop)
    rows = [[_without(json.loads(line), TIMING) for line in (o / "metrics.jsonl").read_text().splitlines()]
            for o in (short_run, out)]
    assert rows[1] == rows[0] and sum("averaged" in r for r in rows[1]) == 1
    assert (out / "fixres.csv").read_text() == (short_run / "fixres.csv").read_text()


def test_an_ema_stage_ends_with_the_ema_weights_and_resumes_exactly(toy_data, tmp_path):
    sets = ["stages.1.average={last: null, ema_decay: 0.9, bn_batches: 0}", "stages.0.epochs=1", "stages.1.epochs=2"]
    recipe = _winner(*sets)
    train(recipe, toy_data, tmp_path / "full", show_progress=False)
    last_epoch = _weights(tmp_path / "full" / "checkpoints/s1-e002/model.safetensors")
    final = _weights(tmp_path / "full" / "final.safetensors")
    assert not torch.equal(final["classifier.weight"], last_epoch["classifier.weight"])  # EMA, not the last step
    state = torch.load(tmp_path / "full" / "checkpoints/s1-e002/state.pt", weights_only=True)
    assert torch.equal(state["ema"]["classifier.weight"], final["classifier.weight"])
    train(recipe, toy_data, tmp_path / "r", stop_after=2, show_progress=False)
    train(recipe, toy_data, tmp_path / "r", resume=True, show_progress=False)
    resumed = _weights(tmp_path / "r" / "final.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_ablate_runs_a_folder_and_tabulates_it_like_the_paper(toy_data, tmp_path):
    sets = ["start=scratch", "model.arch=test_efficientnet", "data.val_resize=48", "data.val_crop=40",
            "data.val_batch_size=200", "stages.0.epochs=3", "stages.0.batch_size=64",
            "stages.0.resolution={min: 32, max: 32}"]
    result = ablate(PIPELINES / "table1", toy_data, tmp_path, sets=sets)
    assert [r["recipe"] for r in result["rows"]] == ["1-baseline", "2-heavy-aug", "3-cutmix", "4-fcutmix",
                                                     "5-heavy-aug-fcutmix", "6-fixres", "7-wa", "8-sam", "9-augmix"]
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0].split(" | ")[:2] == ["| recipe", "paper: public_behavior"]
    assert table[0].split(" | ")[-4:-2] == ["SAM", "AugMix"]  # the trick columns, then val and val_clutter
    assert table[-3].startswith("| 7-wa | 0.5563 |") and table[-3].count("✓") == 4  # aug, F-CutMix, FixRes, WA
    assert table[-2].startswith("| 8-sam |  |") and table[-2].count("✓") == 3  # row 5's two, and SAM
    assert table[2].startswith("| 1-baseline | 0.5133 |") and "✓" not in table[2]
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][6]["tricks"]["WA"] == "✓"
    assert table[-1].startswith("| 9-augmix |  |") and table[-1].count("✓") == 3
    stamp = (tmp_path / "7-wa" / "summary.json").stat().st_mtime_ns
    ablate(PIPELINES / "table1", toy_data, tmp_path, sets=sets)  # finished rows are read back
    assert (tmp_path / "7-wa" / "summary.json").stat().st_mtime_ns == stamp
    # another --set on the same --out: refused before any training, naming the rows; nothing replaced
    with pytest.raises(RunFolderError, match=r"9 row\(s\) already hold runs of another recipe.*1-baseline"):
        ablate("table1", toy_data, tmp_path, sets=[*sets, "stages.0.optimizer.lr=0.01"])
    assert (tmp_path / "7-wa" / "summary.json").stat().st_mtime_ns == stamp


def test_a_fine_tuning_recipe_without_a_model_to_fine_tune_is_refused_before_any_file(toy_data, tmp_path):
    from fasttricks.recipes import RecipeError

    for name, toy in (("table1/1-baseline", "toy-finetune"), ("winner-resnet50", "toy-finetune"),
                      ("winner-pretrained", "toy-winner-pretrained")):
        with pytest.raises(RecipeError, match=r"fine-tunes a trained model.*model.weights=FILE.*start=scratch"):
            train(load_recipe(name, [f"overrides/{toy}"]), toy_data, tmp_path / "r", show_progress=False)
        assert not (tmp_path / "r").exists()


def test_winner_pretrained_fine_tunes_the_weights_it_is_given_then_runs_the_behaviour_stage(toy_data, winner_run,
                                                                                             tmp_path):
    """Its robust stage starts from the file: one fine-tuning epoch leaves the network near the
    file's weights, far nearer than a random start is; the behaviour stage follows as the winner's."""
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    start = winner_run[0] / "final.safetensors"
    recipe = load_recipe("winner-pretrained", ["overrides/toy-winner-pretrained"],
                         [f"model.weights={start}", "data.val_resize=48", "data.val_crop=40", "stages.0.epochs=1",
                          "stages.1.epochs=1", "stages.*.resolution={min: 40, max: 40}", "stages.1.average=null",
                          "fixres=null", "evaluation.attack.steps=2"])
    summary = train(recipe, toy_data, tmp_path / "r", show_progress=False)
    given, tuned = _weights(start), _weights(tmp_path / "r" / "checkpoints" / "s0-e001" / "model.safetensors")
    torch.manual_seed(1)
    random = create_model(ModelConfig(arch="test_efficientnet"), 10).net.state_dict()
    keys = [k for k in given if given[k].is_floating_point() and given[k].ndim > 1]  # the conv and linear weights

    def distance(a):
        return sum(float((a[k] - given[k]).norm()) for k in keys)

    assert distance(tuned) < 0.5 * distance(random)
    assert distance(tuned) > 0  # and it was trained
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics if "epoch" in m] == ["robust-finetune", "behaviour"]
    assert summary["val_robust_top1"] is not None


def test_ablate_with_seeds_averages_each_row_and_pairs_its_differences_with_the_first(toy_data, tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    for name in ("1-baseline.yaml", "4-fcutmix.yaml"):
        shutil.copy(PIPELINES / "table1" / name, folder / name)
    base_text = (PIPELINES / "table1" / "_finetune.yaml").read_text()
    (folder / "_finetune.yaml").write_text(base_text.replace("../baseline.yaml", str(PIPELINES / "baseline.yaml")))
    sets = ["start=scratch", "model.arch=test_efficientnet", "data.val_resize=48", "data.val_crop=40",
            "data.val_batch_size=200", "stages.0.epochs=1", "stages.0.batch_size=64",
            "stages.0.resolution={min: 32, max: 32}", "stages.0.optimizer.lr=1e-2"]
    result = ablate(folder, toy_data, tmp_path / "out", sets=sets, seeds=2)
    base, fc = result["rows"]
    for row in (base, fc):
        runs = [tmp_path / "out" / row["recipe"] / f"seed-{k}" for k in (0, 1)]
        assert row["run"] == [str(r) for r in runs]
        assert [load_recipe(r / "config.yaml").seed for r in runs] == [0, 1]
        per_seed = [json.loads((r / "summary.json").read_text())["val_clutter_top1"] for r in runs]
        assert row["per_seed"]["val_clutter_top1"] == per_seed
        assert row["val_clutter_top1"] == pytest.approx(sum(per_seed) / 2)
        assert row["sd"]["val_clutter_top1"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    seed0, seed1 = (_weights(tmp_path / "out/1-baseline" / f"seed-{k}" / "final.safetensors") for k in (0, 1))
    assert not torch.equal(seed0["classifier.weight"], seed1["classifier.weight"])  # the seed reaches the run
    diffs = [f - b for f, b in zip(fc["per_seed"]["val_top1"], base["per_seed"]["val_top1"], strict=True)]
    assert base["vs_first"]["val_top1"] == {"mean": 0.0, "se": 0.0}
    assert fc["vs_first"]["val_top1"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert fc["vs_first"]["val_top1"]["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # sd / sqrt(2)
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "Δ val_clutter top-1 vs 1-baseline" in table and "2 seeds per row" in table
    assert table.splitlines()[2].startswith("| 1-baseline |") and table.splitlines()[2].endswith("| — | — |")
    assert f"| {base['val_top1']:.1f} ± {base['sd']['val_top1']:.1f} |" in table
    # the plot: a panel per accuracy (no time panel), each row's seeds in seed order, so they pair
    shown = panels(result["rows"], METRICS)
    assert set(shown) == {"val_top1", "val_clutter_top1"}
    assert shown["val_clutter_top1"] == [base["per_seed"]["val_clutter_top1"], fc["per_seed"]["val_clutter_top1"]]
    assert (tmp_path / "out" / "ablation.png").read_bytes().startswith(b"\x89PNG")


def test_the_ablation_plot_shows_a_single_runs_accuracies_and_only_what_a_row_measured(tmp_path):
    from fasttricks.training.ablation_plot import plot_ablation

    rows = [{"recipe": "1-a", "val_top1": 80.0, "robust_seconds": 9.0},
            {"recipe": "2-b", "val_top1": 70.0, "val_robust_top1": 30.0, "robust_seconds": 20.0}]
    assert panels(rows, METRICS) == {"val_top1": [[80.0], [70.0]], "val_robust_top1": [[], [30.0]]}
    assert plot_ablation(rows, METRICS, tmp_path).read_bytes().startswith(b"\x89PNG")
    assert plot_ablation([{"recipe": "1-a", "robust_seconds": 9.0}], METRICS, tmp_path / "none") is None
