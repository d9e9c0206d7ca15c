"""One training step, and what a stage steps with: its optimizer and its loss.

The hot path: a batch already on the device and augmented goes through the attack (when the stage
has one), forward and backward in autocast, and the optimizer step, with no host-device sync."""

from __future__ import annotations

import timm.optim
import torch
from timm.loss import JsdCrossEntropy
from torch import nn

from fasttricks.recipes import OptimizerConfig, StageConfig
from fasttricks.robust.pgd import pgd
from fasttricks.runtime import distributed
from fasttricks.runtime.devices import autocast
from fasttricks.training import sam


def training_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                  optimizer: torch.optim.Optimizer, criterion: nn.Module, stage: StageConfig,
                  generator: torch.Generator | None = None, attack_model: nn.Module | None = None) -> torch.Tensor:
    """One step on a batch already on the device, in [0, 1]: the PGD attack (when the stage has
    one), forward and backward in autocast, optimizer step. Returns the loss as a device tensor
    (no sync). Under DDP, ``model`` is the wrapper and ``attack_model`` the module inside it: the
    attack's input gradients then trigger no gradient all-reduce."""
    if stage.adversarial is not None:
        attack_model = model if attack_model is None else attack_model  # (a compiled module has no truth value)
        distributed.sync_buffers(attack_model)
        images = pgd(attack_model, images, targets, stage.adversarial, generator=generator)
    if stage.optimizer.sam is not None:
        return sam.step(model, images, targets, optimizer, criterion, stage.grad_clip)
    with autocast(images.device):
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if stage.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
    optimizer.step()
    return loss.detach()


def create_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """timm's factory: no weight decay on biases and norm parameters, frozen parameters left out;
    inside SAM when the stage asks for it."""
    if cfg.weight_decay == 0:  # timm then takes model.parameters(), frozen ones included
        model = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        base = timm.optim.create_optimizer_v2(model, "nesterov" if cfg.nesterov else "momentum", lr=cfg.lr,
                                              weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        # fused: one kernel per step, and the step count stays a device tensor (the foreach Adam reads a
        # CPU step counter back each step, which the no-sync guard cannot tell from a device sync)
        base = timm.optim.create_optimizer_v2(model, cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                              betas=tuple(cfg.betas), fused=True)
    return sam.wrap(base, cfg.sam) if cfg.sam is not None else base


def criterion_for(stage: StageConfig) -> nn.Module:
    """Cross-entropy with the stage's label smoothing; with AugMix's JSD, timm's JsdCrossEntropy
    (cross-entropy on the clean third of the batch plus the consistency term)."""
    if stage.augmix is not None and stage.augmix.jsd:
        return JsdCrossEntropy(num_splits=3, alpha=stage.augmix.jsd_weight, smoothing=stage.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=stage.label_smoothing)

