"""No host sync between logging points (fasttricks/runtime/syncguard.py): the guard catches the operators
that make the host wait and the tensors made from host data (a blocking copy on CUDA), and whole
training runs of each stage kind pass under it on the CPU."""

import numpy as np
import pytest
import torch

from fasttricks.recipes import load_recipe
from fasttricks.runtime.syncguard import HostSyncError, no_host_sync
from fasttricks.training.loop import train


@pytest.mark.parametrize("call,op", [
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: bool(x.sum() > 0), "_local_scalar_dense"),
    (lambda x: x[x > 0.5], "index"),
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: torch.linalg.inv(x[0, 0]), "_linalg_check_errors"),
    (lambda x: torch.unique(x), "_unique2"),
])
def test_the_guard_names_each_kind_of_sync(call, op):
    x = torch.rand(2, 1, 3, 3)
    with pytest.raises(HostSyncError, match=f"aten.{op} .*called from"), no_host_sync():
        call(x)
    with no_host_sync():  # what a step does instead passes
        torch.where(x > 0.5, x, 0).sum()


@pytest.mark.parametrize("call,name", [
    (lambda x: x * torch.tensor([2.0, 3.0, 4.0]), "torch.tensor"),
    (lambda x: x + torch.as_tensor([1.0, 2.0, 3.0], device=x.device), "torch.as_tensor"),
    (lambda x: x.new_tensor([0.5]), "Tensor.new_tensor"),
    (lambda x: torch.asarray(np.ones(3, np.float32), device=x.device), "torch.asarray"),
    # a library's, from a Python number: the rate 1.0 becomes torch.tensor(1.0, device)
    (lambda x: torch.distributions.Gamma(x, 1.0, validate_args=False).sample(), "torch.tensor"),
])
def test_the_guard_names_a_tensor_made_from_host_data(call, name):
    """On CUDA each is a blocking copy from pageable host memory; on the CPU only a constructor, so
    the guard sees the call itself."""
    x = torch.rand(3) + 0.1
    with pytest.raises(HostSyncError, match=f"{name} makes a tensor from host data.*called from"), no_host_sync():
        call(x)
    with no_host_sync():  # made on the device instead
        rate = torch.ones_like(x)
        x * torch.full((), 2.0, device=x.device) + torch.distributions.Gamma(x, rate, validate_args=False).sample()


SMALL = ["stages.0.epochs=4", "stages.0.resolution={min: 32, max: 32}", "data.val_resize=40", "data.val_crop=32"]
KINDS = [
    ("plain SGD + PGD-3", ["stages.0.adversarial={eps: 2/255, step_size: 1/255, steps: 3}"]),
    ("N-FGSM", ["stages.0.adversarial={method: n_fgsm, eps: 2/255}"]),
    ("frozen half + Adam + EMA", ["stages.0.freeze=first_half", "stages.0.optimizer={name: adam, lr: 0.001}",
                                  "stages.0.average={ema_decay: 0.9, bn_batches: 1}"]),
    ("Foreground-CutMix", ["stages.0.mixing={kind: foreground_cutmix, p: 0.5}"]),
    ("heavy augmentation + CutMix", ["stages.0.augment={}", "stages.0.mixing={kind: cutmix, p: 0.5}"]),
    ("SAM around Adam", ["stages.0.optimizer={name: adam, lr: 0.001, sam: {rho: 0.05}}"]),
    ("AugMix with its JSD loss", ["stages.0.augmix={jsd: true}"]),
]


@pytest.mark.parametrize("kind,sets", KINDS)
def test_training_steps_of_each_kind_dispatch_no_syncing_operator(toy_data, tmp_path, monkeypatch, kind, sets):
    monkeypatch.setenv("FASTTRICKS_CHECK_SYNCS", "1")  # every step of the run under no_host_sync
    recipe = load_recipe("baseline", ["overrides/toy"], [*SMALL, *sets])
    summary = train(recipe, toy_data, tmp_path / "r", show_progress=False)
    assert summary["epochs"] == 4  # 4 epochs of 6 steps: 24 guarded steps


@pytest.mark.gpu
@pytest.mark.parametrize("kind,sets", KINDS)
def test_cuda_training_steps_of_each_kind_never_sync(toy_data, tmp_path, monkeypatch, kind, sets):
    """The same runs on CUDA (compiled, as model.compile defaults there), every step under
    torch.cuda.set_sync_debug_mode("error") as well: 24 steps of each kind."""
    monkeypatch.setenv("FASTTRICKS_CHECK_SYNCS", "1")
    recipe = load_recipe("baseline", ["overrides/toy"], [*SMALL, *sets])
    summary = train(recipe, toy_data, tmp_path / "r", device=torch.device("cuda"), show_progress=False)
    assert summary["epochs"] == 4


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_the_heavy_augmentation_dispatches_no_syncing_operator(p):
    from fasttricks.augment.heavy import OPS, HeavyAugmentation
    from fasttricks.recipes import AugmentConfig

    augment = HeavyAugmentation(AugmentConfig(**{op: {"p": p} for op in OPS}))
    with no_host_sync():
        out = augment(torch.rand(9, 3, 32, 32))  # B·p = 4.5 at p = 0.5: the coin for the fifth image
    assert out.shape == (9, 3, 32, 32)


def test_the_guard_is_on_in_the_loop(toy_data, tmp_path, monkeypatch):
    from fasttricks.training import loop as train_mod

    real = train_mod.training_step

    def step_that_reads_the_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item()
        return loss

    monkeypatch.setattr(train_mod, "training_step", step_that_reads_the_loss)
    monkeypatch.setenv("FASTTRICKS_CHECK_SYNCS", "1")
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        train(load_recipe("baseline", ["overrides/toy"], SMALL), toy_data, tmp_path / "r", show_progress=False)


def test_on_the_cpu_the_guard_refuses_a_compiled_step_and_says_how_to_check_it(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRICKS_CHECK_SYNCS", "1")
    recipe = load_recipe("baseline", ["overrides/toy"], [*SMALL, "model.compile=true"])
    with pytest.raises(ValueError, match="model.compile=false"):
        train(recipe, toy_data, tmp_path / "r", show_progress=False)
