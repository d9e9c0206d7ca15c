"""AutoAttack evaluation: at most PGD-10's robust accuracy, exactly torchattacks' own AutoAttack on the
same images, independent of batch size and of how many processes share the images, the caller's RNG
untouched; `eval --attack autoattack:...`, a recipe's final evaluation and `ablate` record it."""

from __future__ import annotations

import json
import socket

import ddp_workers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchattacks
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.errors import InputError
from fasttricks.evaluation.evaluate import evaluate_splits, val_loaders
from fasttricks.recipes import AdversarialConfig, AutoAttackConfig, RecipeError, load_recipe
from fasttricks.robust import autoattack
from fasttricks.robust.pgd import parse_attack
from fasttricks.runtime.seeding import AUTOATTACK, stream_seed

CPU = torch.device("cpu")
EPS = "2/255"


@pytest.fixture(scope="module")
def readout(toy_data):
    """A linear read-out of the pixels trained for a few hundred steps on the toy set: right on
    about half of val, with a robust accuracy under PGD that is neither 0 nor the clean one."""
    return ddp_workers.trained_readout(str(toy_data))


def _loaders(toy_data, batch_size=32):
    return val_loaders(toy_data, resize=48, crop=40, batch_size=batch_size, device=CPU, workers=1)


def test_autoattack_robust_accuracy_is_at_most_pgd10s_and_below_the_clean_one(readout, toy_data):
    pgd10 = AdversarialConfig(eps=EPS, steps=10, step_size=0.5 / 255)
    results = evaluate_splits(readout, _loaders(toy_data), CPU, pgd10, AutoAttackConfig(eps=EPS), num_classes=10)
    val = results["val"]
    assert 0 < val["robust_top1"] < val["top1"]
    assert val["autoattack_top1"] <= val["robust_top1"]
    assert val["autoattack_images"] == val["images"] == 100
    assert "autoattack_top1" not in results["val_clutter"]  # val only, RobustBench's split


def test_our_figure_is_torchattacks_autoattack_called_directly_on_the_same_images(readout, toy_data, monkeypatch):
    monkeypatch.setattr(autoattack, "CHUNK", 40)
    cfg = AutoAttackConfig(eps=EPS, images=60)
    loader = _loaders(toy_data)["val"]
    ours = autoattack.robust_top1(readout, loader, cfg, CPU, num_classes=10)
    chosen = autoattack.chosen_images(100, 60)
    assert len(chosen) == 60 and np.all(np.diff(chosen) > 0)
    hits = 0
    for chunk in (chosen[:40], chosen[40:]):  # torchattacks on each chunk, seeded by its first image
        images, labels = next(iter(loader.single_process(chunk, batch_size=len(chunk))))
        attack = torchattacks.AutoAttack(readout, norm="Linf", eps=2 / 255, version="standard", n_classes=10,
                                         seed=stream_seed(0, 0, int(chunk[0]), AUTOATTACK))
        hits += int((readout(attack(images.contiguous(), labels)).argmax(1) == labels).sum())
    assert ours == {"top1": pytest.approx(100 * hits / 60), "images": 60}


def test_the_figure_depends_neither_on_the_batch_size_nor_on_the_processes_and_leaves_the_rng_alone(
        readout, toy_data, tmp_path):
    cfg = AutoAttackConfig(eps=EPS)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = {b: autoattack.robust_top1(readout, _loaders(toy_data, b)["val"], cfg, CPU, 10) for b in (32, 7)}
    assert torch.equal(torch.get_rng_state(), state)  # torchattacks reseeds the global RNG; we restore it
    assert one[32] == one[7]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_workers.sharded_autoattack, args=(2, port, str(toy_data), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"aa-rank{r}.json").read_text()) for r in (0, 1)]
    # chunks of 30: rank 0 attacks images 0-29 and 60-89, rank 1 30-59 and 90-99
    assert [r["mine"] for r in ranks] == [60, 40]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(autoattack, "CHUNK", 30)
        alone = autoattack.robust_top1(readout, _loaders(toy_data)["val"], cfg, CPU, 10)
    assert all(r["result"] == alone for r in ranks)


def test_parse_and_the_eval_command_record_attack_library_and_images(readout, toy_data, tmp_path):
    assert parse_attack("autoattack:l2:0.5") == AutoAttackConfig(norm="l2", eps=0.5)
    with pytest.raises(InputError, match="autoattack:norm:eps"):
        parse_attack("autoattack:linf")
    weights = _saved_model(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(weights), "--data", str(toy_data), "--attack",
                                      "autoattack:linf:2/255", "--attack-images", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["attack"]["library"] == f"torchattacks {torchattacks.__version__}"
    assert report["attack"]["version"] == "standard" and report["attack"]["images_asked"] == 20
    assert report["val"]["autoattack_images"] == report["val_clutter"]["autoattack_images"] == 20
    assert report["val"]["images"] == 100  # clean accuracy on the whole split
    refused = CliRunner().invoke(app, ["eval", str(weights), "--data", str(toy_data), "--attack-images", "20"])
    assert refused.exit_code == 2 and "--attack-images needs --attack" in refused.output


def _saved_model(tmp_path):
    """A tiny timm model saved as a run's final weights (random: the command's plumbing is tested)."""
    from fasttricks.models.factory import create_model
    from fasttricks.models.weights import save_weights
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    info = {"arch": "test_efficientnet", "num_classes": 10, "mean": model.mean.flatten().tolist(),
            "std": model.std.flatten().tolist(), "val_resize": 48, "val_crop": 40}
    save_weights(tmp_path / "final.safetensors", model.net, info)
    return tmp_path / "final.safetensors"


def test_a_recipe_naming_autoattack_without_torchattacks_is_refused_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchattacks" else real(name, *a))
    with pytest.raises(RecipeError, match="pip install --no-deps torchattacks"):
        load_recipe("fast-at/1-pgd3")
    with pytest.raises(autoattack.AutoAttackMissing, match="torchattacks"):
        autoattack.require()
