"""GPU augmentation inside the batch: heavy augmentation (`heavy`), AugMix (`augmix`) and CutMix /
Foreground-CutMix (`mixing`)."""

from __future__ import annotations

import torch
from torch import nn

from fasttricks.augment.augmix import AugMix
from fasttricks.augment.heavy import HeavyAugmentation
from fasttricks.recipes import StageConfig


def stage_augmentation(stage: StageConfig, device: torch.device, compile: bool = False,
                       pixel_scale: float = 1.0) -> nn.Module | None:
    """The stage's on-device augmentation, before mixing: heavy augmentation (compiled when asked;
    its sizes in pixels times ``pixel_scale``), then AugMix (eager: its Gamma draws stay outside the
    compiled graph). None when it has neither."""
    parts = []
    if stage.augment:
        heavy = HeavyAugmentation(stage.augment, pixel_scale).to(device)
        parts.append(heavy.compiled() if compile else heavy)
    if stage.augmix:
        parts.append(AugMix(stage.augmix))
    return None if not parts else parts[0] if len(parts) == 1 else nn.Sequential(*parts)
