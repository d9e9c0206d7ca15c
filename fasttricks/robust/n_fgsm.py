"""N-FGSM (de Jorge et al. 2022, "Make Some Noise: Reliable and Efficient Single-Step Adversarial
Training"): one signed-gradient step, at FGSM's cost, without FGSM's catastrophic overfitting.

From x, a start x0 = clip(x + η) with η uniform in [-k·ε, k·ε] (k = ``noise_factor``, 2 in the
paper: noise larger than the threat), then x_adv = clip(x0 + α·sign(∇x0 L)) with α = ε by default,
and no projection back to the ε-ball (the paper finds the projection is what lets FGSM collapse).
clip keeps images in [0, 1]. The same contract as ``adversarial.pgd``: the noise from the step's
seeded generator, input gradients only, the model in eval mode by default, no host sync."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from fasttricks.recipes import AdversarialConfig
from fasttricks.runtime.devices import autocast


def n_fgsm(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, cfg: AdversarialConfig,
           generator, use_autocast: bool) -> torch.Tensor:
    """The N-FGSM example of ``images`` (called by ``adversarial.pgd`` inside its mode and gradient
    guards, which dispatches on ``cfg.method``)."""
    from fasttricks.robust.noise import noise_like  # the draw order every attack shares

    x = images.detach()
    half_width = torch.full((), cfg.noise_factor * cfg.eps, device=x.device, dtype=x.dtype)
    alpha = torch.full((), cfg.step_size, device=x.device, dtype=x.dtype)
    start = torch.clamp(x + noise_like(x, "uniform", generator) * half_width, 0, 1).requires_grad_(True)
    with autocast(x.device) if use_autocast else nullcontext():
        loss = F.cross_entropy(model(start).float(), targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [start])
    with torch.no_grad():
        return torch.clamp(start + alpha * grad.sign(), 0, 1).detach()
