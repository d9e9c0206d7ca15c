"""Per-step learning rate and per-epoch training resolution, as pure functions of the position
in the stage, so a resumed run recomputes exactly what the uninterrupted one used."""

from __future__ import annotations

import math

import numpy as np

from fasttricks.recipes import ResolutionConfig, ScheduleConfig


def lr_factor(cfg: ScheduleConfig, epoch: float, epochs: int) -> float:
    """Multiplier of the peak lr at fractional ``epoch`` (epoch index + step / steps per epoch)."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** sum(epoch >= e for e in cfg.step_epochs)
    span = max(epochs - cfg.warmup_epochs, 1e-8)
    t = min(max((epoch - cfg.warmup_epochs) / span, 0.0), 1.0)
    if cfg.name == "linear":
        return 1 - (1 - cfg.final_factor) * t
    return cfg.final_factor + (1 - cfg.final_factor) * 0.5 * (1 + math.cos(math.pi * t))


def resolution_at(cfg: ResolutionConfig, epoch: int) -> int:
    """FFCV ImageNet recipe's progressive resizing: interpolate, round to ``multiple``, and never
    leave [min, max] (rounding could otherwise step outside when they are not multiples)."""
    if epoch >= cfg.end_ramp:
        res = float(cfg.max)
    elif epoch <= cfg.start_ramp:
        res = float(cfg.min)
    else:
        res = float(np.interp(epoch, [cfg.start_ramp, cfg.end_ramp], [cfg.min, cfg.max]))
    res = int(round(res / cfg.multiple)) * cfg.multiple
    return int(min(max(res, cfg.min), cfg.max))
