"""GPU augmentation inside the batch: heavy augmentation (``heavy``), AugMix (``augmix``), CutMix and
Foreground-CutMix (``mixing``), and the preview of a stage's batch. Imports runtime, recipes, data."""

from __future__ import annotations

import torch
from torch import nn

from fasttricks.augment.augmix import AugMix
from fasttricks.augment.heavy import HeavyAugmentation
from fasttricks.augment.mixing import mix
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


def augment_and_mix(images: torch.Tensor, labels: torch.Tensor, stage: StageConfig,
                    augment: nn.Module | None, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy augmentation and AugMix, then CutMix / Foreground-CutMix, on the device; targets become
    class probabilities when mixing (with AugMix's JSD the images are 3x the labels, see AugMix).
    Call inside ``seeded`` for reproducible draws."""
    if augment is not None:
        images = augment(images)
    if stage.mixing is not None:
        images, labels, _ = mix(images, labels, num_classes, stage.mixing)
    return images, labels
