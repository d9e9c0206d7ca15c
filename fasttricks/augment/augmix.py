"""AugMix (Hendrycks et al. 2020) on a whole batch on the device, every image with its own chains.

Each image gets ``width`` chains of 1 to 3 ops (``depth``); each op is drawn from AugMix's own
list (autocontrast, equalize, posterize, solarize, rotate, shear x/y, translate x/y: the paper
leaves out the colour, contrast, brightness and sharpness ops because they overlap ImageNet-C's
corruptions) at a level drawn uniformly in [0.1, severity] on a 0-10 scale, with a random sign for
the geometric ops. The chains are mixed with Dirichlet(alpha) weights, and the mixture with the
original image by a Beta(alpha, alpha) weight m: ``(1 - m) x + m sum_k w_k chain_k(x)``. Mixing is
done in [0, 1] pixel space; the normalisation is affine and the weights sum to one, so this is the
paper's mixing of normalised images.

Why by hand: Kornia has no AugMix, and torchvision's applies one op chain to the whole batch. Here
every slot (chain k, position d) of every image draws its own op; a slot runs each op on the whole
batch and keeps, per image, the one it drew (``torch.where``), so there is no Python loop over
images, no gather of variable size and no host sync. The geometric ops are one per-image affine
map and one ``grid_sample`` per slot (torchvision's pixel-centre convention, zero fill). Equalize,
posterize and solarize are Kornia's batched functions with per-image parameters; autocontrast is
two reductions.

``draw`` makes every random number of a call and ``augmix`` applies them, so a test can replay the
same draws image by image with torchvision's functional ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.enhance
import torch
import torch.nn.functional as F
from torch import nn

from fasttricks.recipes import AugMixConfig

OPS = ("autocontrast", "equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
       "translate_y")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass
class Draws:
    """Every random number of one AugMix call; (B, width, max depth) for the slots."""

    op: torch.Tensor  # long, index into OPS
    level: torch.Tensor  # float in [0.1, severity]
    sign: torch.Tensor  # ±1, for the geometric ops
    depth: torch.Tensor  # (B, width) long: how many of a chain's slots apply
    weights: torch.Tensor  # (B, width) Dirichlet(alpha)
    m: torch.Tensor  # (B,) Beta(alpha, alpha): the mixture's share


def draw(batch: int, cfg: AugMixConfig, device: torch.device) -> Draws:
    """Draws for ``batch`` images from torch's RNG on ``device`` (seeded by the caller)."""
    slots = (batch, cfg.width, cfg.depth[1])
    concentration = torch.full((batch, cfg.width + 2), cfg.alpha, device=device)
    # the rate as a device tensor: a Python 1.0 would become torch.tensor(1.0, device), a blocking copy
    gamma = torch.distributions.Gamma(concentration, torch.ones_like(concentration), validate_args=False).sample()
    weights = gamma[:, :cfg.width] / gamma[:, :cfg.width].sum(1, keepdim=True)  # Dirichlet from Gammas
    m = gamma[:, -2] / (gamma[:, -2] + gamma[:, -1])  # Beta(a, a) from two Gammas
    return Draws(op=torch.randint(len(OPS), slots, device=device),
                 level=0.1 + (cfg.severity - 0.1) * torch.rand(slots, device=device),
                 sign=torch.randint(2, slots, device=device).float() * 2 - 1,
                 depth=torch.randint(cfg.depth[0], cfg.depth[1] + 1, (batch, cfg.width), device=device),
                 weights=weights, m=m)


def augmix(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    """AugMix of float images in [0, 1] with the given draws."""
    mixture = torch.zeros_like(images)
    for k in range(draws.op.shape[1]):
        chain = images
        for d in range(draws.op.shape[2]):
            applied = apply_ops(chain, draws.op[:, k, d], draws.level[:, k, d], draws.sign[:, k, d])
            chain = torch.where((draws.depth[:, k] > d).view(-1, 1, 1, 1), applied, chain)
        mixture = mixture + draws.weights[:, k].view(-1, 1, 1, 1) * chain
    m = draws.m.view(-1, 1, 1, 1)
    return (1 - m) * images + m * mixture


def apply_ops(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Image i gets ``OPS[op[i]]`` at ``level[i]`` (and ``sign[i]``)."""
    out = torch.where(_is(op, *GEOMETRIC).view(-1, 1, 1, 1), warp(x, affine_for(op, level, sign, x.shape[-2:])), x)
    steps = level.mul(0.1)  # the level as a fraction of its maximum (AugMix's 0-10 scale)
    bits = 4 - (steps * 4).trunc()  # AugMix: 4 - int_parameter(level, 4)
    threshold = (256 - (steps * 256).trunc()) / 255  # 256 - int_parameter(level, 256), 8-bit scale
    pixel = {"autocontrast": autocontrast(x), "equalize": kornia.enhance.equalize(x),
             "posterize": kornia.enhance.posterize(x, bits.to(torch.uint8)),
             "solarize": torch.where(x >= threshold.view(-1, 1, 1, 1), 1 - x, x)}
    for name, value in pixel.items():
        out = torch.where(_is(op, name).view(-1, 1, 1, 1), value, out)
    return out


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel of each image stretched to [0, 1]; a flat channel is left alone (PIL, torchvision)."""
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, ((x - low) / span.clamp_min(1e-12)).clamp(0, 1), x)


def affine_for(op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(B, 2, 3) maps from output to input pixel coordinates (origin at the top-left corner, pixel
    centres at +0.5), identity for non-geometric ops. AugMix's magnitudes: rotation
    ``int(level * 3)`` degrees about the centre, shear ``level * 0.03``, translation
    ``int(level * side / 30)`` pixels."""
    h, w = size
    steps = level.mul(0.1)
    angle = torch.deg2rad(sign * (steps * 30).trunc())
    shear = sign * steps * 0.3
    shift_x, shift_y = sign * (steps * w / 3).trunc(), sign * (steps * h / 3).trunc()
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    rows = {  # [a, b, c, d, e, f]: input = (a u + b v + c, d u + e v + f)
        "rotate": (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy),
        "shear_x": (one, shear, zero, zero, one, zero),
        "shear_y": (one, zero, zero, shear, one, zero),
        "translate_x": (one, zero, -shift_x, zero, one, zero),
        "translate_y": (one, zero, zero, zero, one, -shift_y),
    }
    matrix = torch.stack((one, zero, zero, zero, one, zero), 1)
    for name, row in rows.items():
        matrix = torch.where(_is(op, name).view(-1, 1), torch.stack(row, 1), matrix)
    return matrix.view(-1, 2, 3)


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling at ``matrix @ (u, v, 1)`` for each output pixel centre, zeros outside."""
    h, w = x.shape[-2:]
    v, u = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                          torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    points = torch.stack((u, v, torch.ones_like(u)), -1).view(1, h * w, 3)
    # scale by the inverse half-size, a product with Python numbers: torch.tensor([w / 2, h / 2],
    # device=...) would be a host-to-device copy, which waits on CUDA (18 per step with the JSD loss)
    source = points @ matrix.to(x.dtype).transpose(1, 2)  # (B, HW, 2) in pixels
    grid = torch.stack((source[..., 0] * (2 / w), source[..., 1] * (2 / h)), -1) - 1
    return F.grid_sample(x, grid.view(-1, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)


def _is(op: torch.Tensor, *names: str) -> torch.Tensor:
    """(B,) bool: which images drew one of ``names`` (comparisons with Python ints: a tensor of
    indices would be a host-to-device copy, which waits on CUDA)."""
    hit = op == OPS.index(names[0])
    for name in names[1:]:
        hit = hit | (op == OPS.index(name))
    return hit


class AugMix(nn.Module):
    """The stage's AugMix: ``forward(x)`` returns one AugMix view of each image; with the JSD loss,
    the clean batch followed by two independent views (3B images, the order timm's
    ``JsdCrossEntropy`` splits)."""

    def __init__(self, cfg: AugMixConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [augmix(x, draw(x.shape[0], self.cfg, x.device)) for _ in range(2 if self.cfg.jsd else 1)]
        return torch.cat([x, *views]) if self.cfg.jsd else views[0]
