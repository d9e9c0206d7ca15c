"""Sharpness-aware minimisation (Foret et al. 2021), the "SAM" of the 2022 winning entry
(`effnetb1_cutmixpatch_SAM_...`), as a stage option: ``optimizer: {..., sam: {rho: 0.05}}``.

pytorch-optimizer's ``SAM`` wraps the stage's own optimizer (timm's, fused Adam included), so the
base update, its parameter groups and its state are the ones a plain stage uses, and a checkpoint
holds them (SAM keeps nothing across steps). One step:

1. forward and backward at w; the perturbation e = ρ·g/‖g‖ (ASAM: ρ·w²·g/‖|w|·g‖) is taken along
   **each process's own gradient**: under DDP this pass runs in ``no_sync``, so nothing is
   all-reduced (SAM's m-sharpness with m = the per-process batch, as the SAM paper's multi-device
   runs did, and one all-reduce per step instead of two);
2. forward and backward at w + e, gradients all-reduced as in any DDP step; the base optimizer
   updates w with them. Batch-norm running statistics move in the first pass only (momentum 0 in
   the second), so they describe the weights that are kept, not the perturbed ones.

Both passes run in bf16 autocast on CUDA, like a plain step; the norm stays on the device (no sync).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from pytorch_optimizer import SAM
from torch import nn

from fasttricks.recipes import SamConfig
from fasttricks.runtime.devices import autocast


def wrap(base: torch.optim.Optimizer, cfg: SamConfig) -> SAM:
    """``base`` inside SAM: parameter groups and state stay ``base``'s own objects."""
    return SAM(base.param_groups, lambda *_, **__: base, rho=cfg.rho, adaptive=cfg.adaptive)


def step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer: SAM, criterion: nn.Module,
         grad_clip: float | None = None) -> torch.Tensor:
    """One SAM step; returns the loss at the unperturbed weights (as a plain step reports it)."""
    optimizer.zero_grad(set_to_none=True)
    # DDP decides in the forward whether the backward all-reduces: both go inside no_sync
    with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
        with autocast(images.device):
            loss = criterion(model(images), targets)
        loss.backward()
    optimizer.first_step(zero_grad=True)
    with _running_stats_frozen(model), autocast(images.device):
        perturbed = criterion(model(images), targets)
    perturbed.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.second_step()
    return loss.detach()


@contextmanager
def _running_stats_frozen(model: nn.Module):
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
