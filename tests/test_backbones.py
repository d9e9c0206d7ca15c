"""The winner's tricks on the families that lead Brain-Score in 2026 (issue #35): `winner-convnext`
and `winner-vit` run on the toy set with their overrides from a weights file, freeze what
`--dry-run` says by name, sweep FixRes (a ViT at multiples of its patch) and evaluate."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from fasttricks.models.factory import create_model, patch_size
from fasttricks.models.weights import read_info, save_weights
from fasttricks.recipes import ModelConfig, load_recipe
from fasttricks.training.loop import train
from fasttricks.training.plan import describe_plan


def _weights_file(arch: str, path) -> str:
    """A weights file of the family's tiny model, as a user names a local pretrained file."""
    torch.manual_seed(0)
    save_weights(path, create_model(ModelConfig(arch=arch), 10).net, {"arch": arch, "num_classes": 10})
    return str(path)


@pytest.mark.parametrize("family,arch", [("convnext", "test_convnext"), ("vit", "test_vit")])
def test_the_winner_runs_on_each_leading_family_and_freezes_what_the_dry_run_names(family, arch, toy_data,
                                                                                   tmp_path):
    weights = _weights_file(arch, tmp_path / "start.safetensors")
    recipe = load_recipe(f"winner-{family}", [f"overrides/toy-winner-{family}"], [
        f"model.weights={weights}", "stages.0.epochs=1", "stages.1.epochs=2", "stages.1.average.last=2",
        "evaluation.attack.steps=1"])
    assert recipe.model.arch == arch
    plan = describe_plan(recipe, toy_data, tmp_path / "r")
    said = next(line for line in plan if line.startswith("stage 1 'behaviour' freezes (first_half"))
    named = said.split(": ", 1)[1].split(", ")
    summary = train(recipe, toy_data, tmp_path / "r", show_progress=False)
    out = tmp_path / "r"
    info = read_info(out / "final.safetensors")
    assert info["frozen"] == named and info["batch_norm"] is None  # LayerNorm networks
    # the frozen part is the robust stage's, to the bit, after the behaviour stage and its averaging
    robust, final = (load_file(str(p)) for p in (out / "checkpoints" / "s0-e001" / "model.safetensors",
                                                 out / "final.safetensors"))
    frozen = [k for k in final if any(k == n or k.startswith(n + ".") for n in named)]
    assert frozen and all(torch.equal(final[k], robust[k]) for k in frozen)
    assert any(not torch.equal(final[k], robust[k]) for k in final if k not in frozen)
    assert summary["final_evaluation"] == "done" and "val_robust_top1" in summary
    with open(out / "fixres.csv") as f:
        crops = {int(row["crop"]) for row in csv.DictReader(f)}
    assert len(crops) >= 3 and all(c % patch_size(create_model(ModelConfig(arch=arch), 10).net) == 0 for c in crops)
    assert summary["test_crop"] in crops and (out / "fixres.png").is_file()
    assert json.loads((out / "summary.json").read_text())["final_evaluation"] == "done"
