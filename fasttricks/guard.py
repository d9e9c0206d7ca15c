"""The guard against catastrophic overfitting (``adversarial.guard``): one-step adversarial training
(FGSM, and N-FGSM less often) can collapse within an epoch, robust accuracy falling to near zero
while the training loss looks healthy (Wong et al. 2020; de Jorge et al. 2022). At each epoch's end
of a guarded stage the guard measures robust top-1 under PGD-k on a fixed, seeded subset of the
training set (test-time crops, each image's start seeded by its index, sharded and all-reduced: every
rank reads the same figure and takes the same decision). A fall of more than ``drop`` below the
stage's best so far is a collapse: the stage goes back to its previous epoch's checkpoint and trains
the rest with PGD. The decision is part of the run's state (``run.info["guard"]``), saved with every
checkpoint, so a resumed run continues with the attack the uninterrupted one used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fasttricks.data.loader import ValLoader
from fasttricks.recipes import AdversarialConfig, DataConfig, GuardConfig


def robust_top1(model: nn.Module, train_beton: Path, cfg: AdversarialConfig, data: DataConfig, *,
                device: torch.device, seed: int, distributed: bool) -> float:
    """Robust top-1 (a fraction) under PGD-``cfg.guard.steps`` at ``cfg``'s ε on the guard's images."""
    from fasttricks.evaluate import accuracy

    guard = cfg.guard
    images = ValLoader(train_beton, batch_size=data.val_batch_size, resize=data.val_resize, crop=data.val_crop,
                       device=device, workers=data.workers, distributed=distributed)
    n = len(images.loader.indices)
    subset = np.sort(np.random.default_rng([seed, 0x6A2D]).choice(n, size=min(n, guard.images), replace=False))
    attack = AdversarialConfig(norm=cfg.norm, eps=cfg.eps, steps=guard.steps)
    return accuracy(model, images.subset(subset), device, attack)["top1"] / 100


def collapsed(robust: float, best: float | None, guard: GuardConfig) -> bool:
    """A fall of more than ``drop`` below the best so far (never on the stage's first measurement)."""
    return best is not None and robust < best - guard.drop


def state_for(info: dict, stage: int) -> dict:
    """This stage's guard state in the run's state: its best robust top-1 so far and, after a
    collapse, the epoch it fell back at."""
    return info.setdefault("guard", {}).setdefault(str(stage), {"best": None, "fell_back_at_epoch": None})
