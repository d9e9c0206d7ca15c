"""FixRes: the sweep evaluates every size, picks the argmax of its own curve, writes the CSV and
the plot, and records the choice where eval and export read it; the fine-tuning step trains only
the classifier and the free batch norms."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.data.loader import beton_paths
from fasttricks.evaluation import fixres
from fasttricks.evaluation.evaluate import load_classifier
from fasttricks.models.freezing import freeze
from fasttricks.models.weights import read_info
from fasttricks.recipes import PIPELINES, FixResFineTuneConfig, load_recipe
from fasttricks.training.loop import train


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    recipe = load_recipe("baseline", [PIPELINES / "overrides" / "toy.yaml"],
                         ["stages.0.epochs=2", "stages.0.resolution.min=40", "stages.0.resolution.max=40",
                          "data.val_resize=48", "data.val_crop=40"])
    out = tmp_path_factory.mktemp("runs") / "r"
    train(recipe, toy_data, out, show_progress=False)
    return out


def test_best_is_the_argmax_and_a_tie_goes_to_the_smaller_size():
    rows = [{"crop": c, "resize": c + 8, "val_top1": v} for c, v in ((32, 50.0), (40, 70.0), (48, 70.0), (56, 60.0))]
    assert fixres.best(rows)["crop"] == 40
    assert fixres.best(rows, "crop")["crop"] == 56
    with pytest.raises(ValueError, match="val_clutter_top1"):
        fixres.best(rows, "val_clutter_top1")


def test_sizes_take_crops_ranges_and_resize_crop_pairs():
    from fasttricks.recipes import FixResConfig

    sizes = FixResConfig(sizes="32:48:8,324/288").sizes
    assert sizes == [32, 40, 48, "324/288"]
    assert fixres.size_pairs(sizes, 40 / 48) == [(38, 32), (48, 40), (58, 48), (324, 288)]


def test_fixres_command_writes_the_curve_and_records_the_best_size_for_eval(trained, toy_data):
    runner = CliRunner()
    weights = trained / "final.safetensors"
    result = runner.invoke(app, ["fixres", str(weights), "--data", str(toy_data), "--sizes", "32:56:8",
                                 "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    with open(trained / "fixres.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["crop"]) for r in rows] == [32, 40, 48, 56]
    assert [int(r["resize"]) for r in rows] == [round(c * 48 / 40) for c in (32, 40, 48, 56)]  # training ratio
    top1 = [float(r["val_top1"]) for r in rows]
    chosen = rows[top1.index(max(top1))]  # the curve is the even half's; the choice its argmax
    assert (trained / "fixres.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["test_crop"] == int(chosen["crop"]) == summary["fixres"]["crop"]
    assert summary["fixres"]["chosen_on"] == "even half" and summary["fixres"]["metric"] == "val"
    held_out = summary["fixres"]["held_out"]["val_top1"]  # the chosen size measured on the other half
    info = read_info(weights)
    assert (info["val_crop"], info["val_resize"]) == (int(chosen["crop"]), int(chosen["resize"]))
    assert (info["train_val_crop"], info["train_val_resize"]) == (40, 48)
    # eval now defaults to the chosen size and reproduces the curve's point
    report = runner.invoke(app, ["eval", str(weights), "--data", str(toy_data)])
    assert report.exit_code == 0, report.output
    measured = json.loads(report.output.strip().splitlines()[-1])
    assert measured["crop"] == int(chosen["crop"])
    # the whole split (50 + 50 images) is the mean of the two halves at that size
    assert measured["val"]["top1"] == pytest.approx((float(chosen["val_top1"]) + held_out) / 2)


def test_fixres_sweeps_given_pairs_and_picks_by_the_named_metric(trained, toy_data, tmp_path):
    result = CliRunner().invoke(app, ["fixres", str(trained / "final.safetensors"), "--data", str(toy_data),
                                      "--sizes", "48/40,56/48,64/48", "--metric", "val_clutter", "--no-held-out",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "fixres.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["resize"]), int(r["crop"])) for r in rows] == [(48, 40), (56, 48), (64, 48)]
    clutter = [float(r["val_clutter_top1"]) for r in rows]
    assert "by val_clutter" in result.output
    best = rows[clutter.index(max(clutter))]
    assert f"resize {best['resize']} / crop {best['crop']} by val_clutter" in " ".join(result.output.split())


def test_bad_sizes_are_refused_naming_the_option(trained, toy_data):
    result = CliRunner().invoke(app, ["fixres", str(trained / "final.safetensors"), "--data", str(toy_data),
                                      "--sizes", "64:32:8"])
    assert result.exit_code == 2 and "--sizes" in result.output


def test_fixres_fine_tuning_trains_only_the_classifier_and_free_batch_norms(trained, toy_data, cpu):
    model, _ = load_classifier(trained / "final.safetensors", cpu)
    frozen = ["conv_stem", "bn1"]
    freeze(model.net, frozen)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    fixres.finetune(model, model.net, beton_paths(toy_data)["train"], crop=48, resize=56,
                    cfg=FixResFineTuneConfig(steps=3, batch_size=32, lr=1e-2), seed=0, device=cpu,
                    frozen=frozen, show_progress=False)
    after = model.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"classifier.weight", "classifier.bias", "bn2.weight", "bn2.running_mean"} <= changed
    assert not any(k.startswith(("conv_stem", "bn1.")) for k in changed)  # frozen: weights and statistics
    assert not any(k.endswith("conv.weight") or "conv_" in k for k in changed)  # convolutions untouched
    assert all(p.requires_grad == (not n.startswith(("conv_stem", "bn1."))) for n, p in model.net.named_parameters())


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run: choosing by a benchmark rewrites its summary and test size."""
    import shutil

    return shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))


def test_fixres_by_a_brainscore_benchmark_scores_each_size_through_its_export(run_copy, toy_data, tmp_path,
                                                                             monkeypatch):
    import brainscore_vision
    from fake_benchmarks import CropBenchmark, stimulus_set

    bench = CropBenchmark(stimulus_set(tmp_path / "stimuli", f"fake.crops.{tmp_path.name}"), best_crop=24)
    loads = []
    monkeypatch.setattr(brainscore_vision, "load_benchmark", lambda name: loads.append(name) or bench)
    weights = run_copy / "final.safetensors"
    result = CliRunner().invoke(app, ["fixres", str(weights), "--data", str(toy_data), "--sizes",
                                      "28/24,48/40,64/56", "--metric", "brainscore:Fake.crops", "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert loads == ["Fake.crops"]  # loaded once, scored at every size
    assert bench.crops == [24, 40, 56]  # each export fed the network its own size
    with open(run_copy / "fixres.csv") as f:
        rows = list(csv.DictReader(f))
    scores = [float(r["brainscore:Fake.crops"]) for r in rows]
    assert scores == pytest.approx([1.0, 0.84, 0.68])
    top1 = [float(r["val_top1"]) for r in rows]
    assert top1[0] < max(top1)  # the benchmark, not val, made the choice
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["fixres"]["metric"] == "brainscore:Fake.crops"
    assert summary["fixres"]["chosen_on"] == "benchmark Fake.crops" and "held_out" not in summary["fixres"]
    assert summary["fixres"]["score"] == pytest.approx(1.0) and summary["test_crop"] == 24
    assert read_info(weights)["val_crop"] == 24
    exports = sorted(p.name for p in (run_copy / "brainscore").iterdir() if p.is_dir())
    assert [name.rsplit("-", 1)[1] for name in exports] == ["28x24", "48x40", "64x56"]
    records = json.loads((run_copy / "brainscore" / "scores.json").read_text())
    assert [r["crop"] for r in records] == [24, 40, 56]
    assert [r["score"] for r in records] == pytest.approx(scores)


def test_fixres_by_a_benchmark_that_cannot_load_stops_before_measuring(run_copy, toy_data, tmp_path, monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # offline whatever the machine
    monkeypatch.setenv("BRAINIO_HOME", str(tmp_path / "brainio"))
    (run_copy / "fixres.csv").unlink(missing_ok=True)
    before = (run_copy / "summary.json").read_text()
    runner = CliRunner()
    result = runner.invoke(app, ["fixres", str(run_copy), "--data", str(toy_data), "--sizes", "48/40",
                                 "--metric", "brainscore:FreemanZiemba2013public.V1-pls"])
    assert result.exit_code == 2, result.output
    assert "could not score benchmark 'FreemanZiemba2013public.V1-pls'" in " ".join(result.output.split())
    assert not (run_copy / "fixres.csv").exists() and (run_copy / "summary.json").read_text() == before
    bad = runner.invoke(app, ["fixres", str(run_copy), "--data", str(toy_data), "--metric", "top1"])
    assert bad.exit_code == 2 and "--metric" in bad.output and "brainscore:" in bad.output


def test_a_recipe_cannot_choose_its_test_size_by_a_benchmark():
    from fasttricks.recipes import FixResConfig

    with pytest.raises(ValueError, match="fasttricks fixres RUN --metric brainscore:Rajalingham2018public-i2n"):
        FixResConfig(metric="brainscore:Rajalingham2018public-i2n")
    assert FixResConfig(metric="val_clutter").metric == "val_clutter"


def test_a_vit_takes_every_test_size_with_its_position_embedding_resized_as_timm_resizes_it():
    """A ViT is made with timm's dynamic_img_size, so the FixRes sweep can test it at any multiple
    of its patch: the same logits as timm's own model made for that size, its 160-px position
    embedding resampled by timm; and the sweep's sizes are rounded to the patch."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from fasttricks.evaluation.fixres import size_pairs
    from fasttricks.models.factory import Classifier, create_model, patch_size
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_vit"), 10).eval()
    assert patch_size(model.net) == 16
    for side in (48, 96):
        x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        theirs = timm.create_model("test_vit", num_classes=10, img_size=side).eval()
        state = dict(model.net.state_dict())
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (side // 16, side // 16),
                                                    num_prefix_tokens=theirs.num_prefix_tokens)
        theirs.load_state_dict(state)
        with torch.no_grad():
            same_input = Classifier(theirs, model.mean.flatten().tolist(), model.std.flatten().tolist())
            torch.testing.assert_close(model(x), same_input(x), rtol=1e-4, atol=1e-5)
    assert [c for _, c in size_pairs([40, 56, 64, 100], 0.875, 16)] == [32, 64, 96]
    with pytest.raises(ValueError, match="multiple of the model's patch side"):
        size_pairs(["64/56"], 0.875, 16)
