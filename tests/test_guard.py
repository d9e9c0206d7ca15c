"""The guard against catastrophic overfitting: a collapse of robust accuracy on the guard's images
rolls the stage back to its previous epoch and trains the rest with PGD; the event is recorded and
a resumed run makes the same decision."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fasttricks.data import crops
from fasttricks.recipes import AdversarialConfig, load_recipe
from fasttricks.training import guard
from fasttricks.training import step as step_module
from fasttricks.training.loop import train

SETS = ["stages.0.epochs=4", "stages.0.resolution={min: 32, max: 32}", "data.val_resize=40", "data.val_crop=32",
        "stages.0.adversarial={method: n_fgsm, eps: 2/255, guard: {images: 64, steps: 2, drop: 0.2}}"]


def _recipe():
    return load_recipe("baseline", ["overrides/toy"], SETS)


@pytest.fixture
def scripted(monkeypatch):
    """Robust top-1 as the guard would read it: 50%, 60%, then 10% (a collapse in epoch 3); and the
    attack every training step used."""
    readings, attacks = iter([0.5, 0.6, 0.1]), []
    monkeypatch.setattr(guard, "robust_top1", lambda *a, **k: next(readings))
    real_pgd = step_module.pgd

    def recording_pgd(model, images, targets, cfg, **kwargs):
        attacks.append((cfg.method, cfg.steps))
        return real_pgd(model, images, targets, cfg, **kwargs)

    monkeypatch.setattr(step_module, "pgd", recording_pgd)
    return attacks


def test_a_collapse_rolls_back_to_the_previous_epoch_and_continues_with_pgd(toy_data, tmp_path, scripted):
    summary = train(_recipe(), toy_data, tmp_path / "r", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r.get("guard")) for r in rows] == [(1, None), (2, None), (3, "collapse"), (3, None),
                                                            (4, None)]
    event = rows[2]
    assert event["guard_robust_top1"] == 10.0 and event["guard_best"] == 60.0
    assert event["rolled_back_to"] == "s0-e002" and event["fallback"] == "pgd-3"
    assert event["discarded_seconds"] > 0 and "seconds" not in event  # its cost, apart from the epochs' times
    assert summary["guard"]["0"]["fell_back_at_epoch"] == 3
    steps_per_epoch = rows[0]["steps"]
    # epochs 1-3 with N-FGSM (the third thrown away), then epochs 3-4 again with PGD-3
    assert scripted == [("n_fgsm", 1)] * 3 * steps_per_epoch + [("pgd", 3)] * 2 * steps_per_epoch


def test_a_run_resumed_after_the_fall_back_keeps_pgd_and_ends_as_the_uninterrupted_one(toy_data, tmp_path, scripted,
                                                                                       monkeypatch):
    full = train(_recipe(), toy_data, tmp_path / "full", show_progress=False)
    readings = iter([0.5, 0.6, 0.1])  # the same readings for the run that stops
    monkeypatch.setattr(guard, "robust_top1", lambda *a, **k: next(readings))
    train(_recipe(), toy_data, tmp_path / "r", stop_after=3, show_progress=False)  # stops after epoch 3, redone
    steps = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["steps"]
    scripted.clear()
    resumed = train(_recipe(), toy_data, tmp_path / "r", resume=True, show_progress=False)
    assert scripted == [("pgd", 3)] * steps  # epoch 4 with the fallback: the decision came back with the run
    a, b = (load_file(str(tmp_path / r / "final.safetensors")) for r in ("full", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["guard"] == full["guard"]


def test_the_guard_measures_pgd_on_a_fixed_training_subset(toy_data):
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    recipe = _recipe()
    cfg = AdversarialConfig(method="n_fgsm", eps="8/255", guard={"images": 50, "steps": 2})
    cpu = torch.device("cpu")
    images = guard.guard_images(toy_data / "train.beton", cfg.guard, recipe.data, device=cpu, seed=0,
                                distributed=False)
    assert len(images.sample_indices()) == 50
    first = guard.robust_top1(model, images, cfg, cpu)
    compiled = len(crops._KEEP_ALIVE)  # the loader's pipeline, compiled on its first pass
    again = guard.robust_top1(model, images, cfg, cpu)
    assert len(crops._KEEP_ALIVE) == compiled  # a second measurement compiles nothing more
    assert first == again and 0 <= first <= 1 and round(first * 50) == first * 50  # the same 50 images, PGD-seeded
    assert not guard.collapsed(0.1, None, cfg.guard) and guard.collapsed(0.1, 0.31, cfg.guard)
    assert not guard.collapsed(0.12, 0.31, cfg.guard)


def test_a_guarded_run_builds_the_guards_loader_once(toy_data, tmp_path, monkeypatch):
    """Four guarded epochs, four measurements, one loader (a loader per epoch re-compiled FFCV's
    pipeline each time and kept the compiled code alive)."""
    built, measured = [], []
    real = guard.guard_images
    monkeypatch.setattr(guard, "guard_images", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    monkeypatch.setattr(guard, "robust_top1", lambda model, images, *a: measured.append(images) or 0.5)
    train(_recipe(), toy_data, tmp_path / "r", show_progress=False)
    assert len(built) == 1 and measured == built * 4
