"""SAM (optimizer.sam): one step is the formula worked by hand, it makes two forward-backward
passes of which only the first moves batch-norm statistics, and a resumed run is the uninterrupted
run to the bit."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fasttricks.recipes import PIPELINES, OptimizerConfig, SamConfig, StageConfig, load_recipe
from fasttricks.training.loop import train
from fasttricks.training.step import create_optimizer, training_step


def _problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, x, y


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_sgd_step_equals_the_formula_worked_by_hand(adaptive):
    model, x, y = _problem()
    lr, rho = 0.1, 0.05
    w = model.weight.detach().clone()

    def grad(at):  # ∇ of the mean squared error of the linear model, by hand
        return 2 * ((x @ at.T - y).T @ x) / len(x)

    g = grad(w)
    scale = w.abs() if adaptive else torch.ones_like(w)  # ASAM measures the gradient in |w| units
    e = rho * scale ** 2 * g / (scale * g).norm()
    expected = w - lr * grad(w + e)

    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                                                  sam=SamConfig(rho=rho, adaptive=adaptive)))
    optimizer = create_optimizer(model, stage.optimizer)
    loss = training_step(model, x, y, optimizer, nn.MSELoss(), stage)
    torch.testing.assert_close(model.weight.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, nn.functional.mse_loss(x @ w.T, y))  # the loss at w, not at w + e


def test_a_step_makes_two_passes_and_only_the_first_moves_batch_norm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 2, (6,))
    model(x)  # materialise the lazy layer
    model[1].reset_running_stats()
    one_pass = copy.deepcopy(model)
    one_pass(x)  # what a single training-mode pass at the starting weights does to the statistics
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    stage = StageConfig(optimizer=OptimizerConfig(name="adam", lr=0.01, weight_decay=0.0, sam=SamConfig()))
    training_step(model, x, y, create_optimizer(model, stage.optimizer), nn.CrossEntropyLoss(), stage)
    assert len(passes) == 2
    torch.testing.assert_close(model[1].running_mean, one_pass[1].running_mean, atol=0, rtol=0)
    torch.testing.assert_close(model[1].running_var, one_pass[1].running_var, atol=0, rtol=0)
    assert model[1].momentum == one_pass[1].momentum  # restored after the second pass


def test_a_sam_run_resumes_to_the_bit(toy_data, tmp_path):
    sets = ["stages.0.epochs=2", "stages.0.resolution={min: 32, max: 32}", "data.val_resize=40", "data.val_crop=32",
            "stages.0.optimizer={name: adam, lr: 0.001, weight_decay: 0.0, sam: {rho: 0.05}}"]
    recipe = load_recipe("baseline", [PIPELINES / "overrides" / "toy.yaml"], sets)
    full = train(recipe, toy_data, tmp_path / "full", show_progress=False)
    train(recipe, toy_data, tmp_path / "part", stop_after=1, show_progress=False)
    train(recipe, toy_data, tmp_path / "part", resume=True, show_progress=False)
    a, b = (load_file(str(tmp_path / r / "final.safetensors")) for r in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "seconds")}
             for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("full", "part")]
    assert rows[0] == rows[1] and full["epochs"] == 2
