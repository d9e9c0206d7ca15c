"""In-batch mixing with soft targets: CutMix (Yun et al. 2019) and the paper's Foreground-CutMix.

Both pair image i with image i-1 of the batch (the batch order is already random), work on the
whole batch with masks and one ``grid_sample`` (no per-sample Python loop, no host sync), and
return (images, targets as class probabilities, mask of the pixels that came from elsewhere).

- CutMix: a box of the partner pasted into image i; the target is the area-weighted mix of the
  two labels, the weight being the box's actual (clipped) area fraction.
- Foreground-CutMix: a part of image i (area and aspect drawn from ranges, optionally rescaled)
  pasted onto the partner, the background, at a random place; the image takes image i's label
  alone. It imitates objects placed on unrelated backgrounds (the behavioural benchmark's images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttricks.recipes import MixingConfig


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids as probability rows; a scatter, since F.one_hot reads the ids' range back to the host."""
    if labels.dim() != 1:
        return labels
    return torch.zeros(labels.shape[0], num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
        cfg: MixingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = cutmix if cfg.kind == "cutmix" else foreground_cutmix
    return fn(images, one_hot(labels, num_classes), cfg)


def _apply(images: torch.Tensor, cfg: MixingConfig) -> torch.Tensor:
    """Which images are mixed: a coin per image, or one for the batch."""
    n = images.shape[0] if cfg.per_sample else 1
    return (torch.rand(n, device=images.device) < cfg.p).expand(images.shape[0])


def _box_mask(top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """B x 1 x H x W boolean masks of the boxes [top, top+h) x [left, left+w) (per image)."""
    ys = torch.arange(height, device=top.device).view(1, -1, 1)
    xs = torch.arange(width, device=top.device).view(1, 1, -1)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + h).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + w).view(-1, 1, 1)))
    return inside.unsqueeze(1)


def cutmix(images: torch.Tensor, targets: torch.Tensor, cfg: MixingConfig):
    b, _, height, width = images.shape
    dev = images.device
    alpha = torch.full((), cfg.alpha, device=dev)  # a fill: torch.tensor(x, device) copies and waits
    # validate_args=False: the argument check reads alpha back to the host, a sync per step
    lam = torch.distributions.Beta(alpha, alpha, validate_args=False).sample((b,))
    cut = torch.sqrt(1 - lam)
    h, w = (cut * height).long(), (cut * width).long()
    cy, cx = (torch.rand(b, device=dev) * height).long(), (torch.rand(b, device=dev) * width).long()
    top, left = (cy - h // 2).clamp(0, height), (cx - w // 2).clamp(0, width)
    bottom, right = (cy + h - h // 2).clamp(0, height), (cx + w - w // 2).clamp(0, width)
    mask = _box_mask(top, left, bottom - top, right - left, height, width) & _apply(images, cfg).view(-1, 1, 1, 1)
    pasted = mask.flatten(1).float().mean(1, keepdim=True)  # the clipped box's true area fraction
    out = _like(torch.where(mask, images.roll(1, 0), images), images)
    return out, (1 - pasted) * targets + pasted * targets.roll(1, 0), mask


def foreground_cutmix(images: torch.Tensor, targets: torch.Tensor, cfg: MixingConfig):
    b, _, height, width = images.shape
    dev = images.device

    def u(lo, hi):
        return torch.empty(b, device=dev).uniform_(lo, hi)

    area = u(*cfg.fg_area) * height * width
    aspect = torch.exp(u(math.log(cfg.fg_ratio[0]), math.log(cfg.fg_ratio[1])))
    scale = u(*cfg.fg_resize)
    # the part of image i, in its own pixels
    src_h = torch.sqrt(area / aspect).round().clamp(1, height)  # whole pixels: at scale 1 the
    src_w = torch.sqrt(area * aspect).round().clamp(1, width)  # paste is an exact copy
    # where it lands on the background, after rescaling (clipped to the image)
    dst_h = (src_h * scale).round().clamp(1, height)
    dst_w = (src_w * scale).round().clamp(1, width)
    src_top, src_left = torch.floor(u(0, 1) * (height - src_h + 1)), torch.floor(u(0, 1) * (width - src_w + 1))
    dst_top, dst_left = torch.floor(u(0, 1) * (height - dst_h + 1)), torch.floor(u(0, 1) * (width - dst_w + 1))
    # Output pixel x maps to source x_s = src_left + (x - dst_left) / s (likewise y); as an affine
    # map of grid_sample's normalised coordinates (align_corners=False): u_s = a·u + t.
    a_x, a_y = src_w / dst_w, src_h / dst_h
    t_x = a_x - 1 + (2 * (src_left - dst_left * a_x) + 1 - a_x) / width
    t_y = a_y - 1 + (2 * (src_top - dst_top * a_y) + 1 - a_y) / height
    zero = torch.zeros_like(a_x)
    theta = torch.stack([torch.stack([a_x, zero, t_x], 1), torch.stack([zero, a_y, t_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    foreground = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = (_box_mask(dst_top.long(), dst_left.long(), dst_h.long(), dst_w.long(), height, width)
            & _apply(images, cfg).view(-1, 1, 1, 1))
    out = torch.where(mask, foreground, images.roll(1, 0))
    applied = mask.flatten(1).any(1, keepdim=True)
    # unmixed images stay themselves, with their own label
    return _like(torch.where(applied.view(-1, 1, 1, 1), out, images), images), targets, mask


def _like(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``out`` in ``images``' memory layout: a channels_last batch stays channels_last (the model's
    convolutions are fastest in it; torch.where and grid_sample may hand back NCHW)."""
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out
