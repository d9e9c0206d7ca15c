"""The paper's "heavy augmentation" on a whole batch on the device: shift, rotation, elastic
deformation, brightness and contrast, motion blur, cutout, Gaussian noise and ISO noise, each
with its own per-image probability and per-image parameters (albumentations 1.x semantics and
defaults, as the paper used). Images are float in [0, 1] in and out.

Kornia does motion blur and cutout, and the geometry's building blocks. Shift, rotation and
elastic deformation are one resampling of the image: one sampling grid (Kornia's affine
normalisation plus an elastic displacement field) and one ``grid_sample``, instead of Kornia's two
warps; the displacement field is drawn on a grid 4x coarser than the image (it is smooth at the
scale of sigma anyway), which makes its Gaussian smoothing 16x cheaper than Kornia's
full-resolution one — elastic was the costliest op on the GPU (benchmarks/augment_throughput.py).
Brightness/contrast and the two noises are written here as a few batched tensor ops, because
Kornia's versions differ from albumentations' (its RandomBrightness adds a different quantity, its
RandomGaussianNoise has one fixed std and does not clamp) and ISO noise is not in Kornia.

Probabilities: each op applies to each image with probability p, but it is computed only on the
images it applies to (``apply_to_some``): a random subset of ⌊B·p⌋ or ⌈B·p⌉ images, gathered,
transformed and scattered back. Kornia >= 0.9 and a ``torch.where`` on per-image coins compute the
op on the whole batch and blend, so at albumentations' default p = 0.5 half of the work was thrown
away; the noises, at p = 1 the costliest ops after the geometry (benchmarks/augment_throughput.py),
now cost half. The difference from independent coins: the number of images an op touches varies
by at most one around B·p instead of binomially, which no training run can tell apart. The
geometry keeps per-image coins and a ``torch.where``: its three ops share one resampling, which
runs unless all three coins miss (87.5% of images at the defaults), so a subset would save little.
Neither way needs a Python loop over samples or a host sync.

Randomness: all draws come from torch's RNG; the caller seeds it per step (``seeded``), so a batch's
augmentation is a function of (seed, epoch, step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import kornia.augmentation as K
import kornia.color
import kornia.filters
import kornia.geometry.conversions as KC
import kornia.geometry.transform as KG
import torch
import torch.nn.functional as F
from torch import nn

from fasttricks.recipes import AugmentConfig
from fasttricks.seeding import AUGMENT, stream_seed


def apply_to_some(x: torch.Tensor, p: float, op) -> torch.Tensor:
    """``op`` applied to a random subset of the batch (each image with probability ``p``), the other
    images returned unchanged; ``op`` sees only the subset. The subset's size is ⌊B·p⌋, plus one
    with probability frac(B·p) (one draw from the CPU generator: known on the host, no sync)."""
    b = x.shape[0]
    if p <= 0:
        return x
    if p >= 1:
        return op(x)
    k = int(b * p) + int(torch.rand(()).item() < b * p - int(b * p))
    if k == 0:
        return x
    chosen = torch.randperm(b, device=x.device)[:k]
    return x.index_copy(0, chosen, op(x.index_select(0, chosen)))


def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
    return (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p)


def _uniform(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(lo, hi)


def brightness_contrast(x: torch.Tensor, p: float, brightness: float, contrast: float) -> torch.Tensor:
    """albumentations' RandomBrightnessContrast on [0, 1] images: x·α + β, α ∈ 1±contrast,
    β ∈ ±brightness (brightness relative to the maximum value, 1)."""
    def op(x):
        return (x * _uniform(x, 1 - contrast, 1 + contrast) + _uniform(x, -brightness, brightness)).clamp_(0, 1)
    return apply_to_some(x, p, op)


def gauss_noise(x: torch.Tensor, p: float, var: tuple[float, float]) -> torch.Tensor:
    """albumentations' GaussNoise: per image a variance from ``var`` on the 0-255 scale, per
    pixel and channel N(0, σ); clamped to [0, 1]."""
    def op(x):
        return (x + torch.randn_like(x) * (_uniform(x, *var).sqrt_() / 255)).clamp_(0, 1)
    return apply_to_some(x, p, op)


def iso_noise(x: torch.Tensor, p: float, color_shift: tuple[float, float],
              intensity: tuple[float, float]) -> torch.Tensor:
    """Camera sensor noise with the math of albumentations' ISONoise (≤ 1.4.18): in HLS, hue
    jittered by N(0, color_shift·360·intensity) degrees per pixel, luminance raised by
    Poisson(σ_L·intensity·255)/255·(1 − L) per pixel, σ_L the image's luminance std."""
    return apply_to_some(x, p, lambda x: _iso_noise(x, color_shift, intensity))


def _iso_noise(x: torch.Tensor, color_shift: tuple[float, float], intensity: tuple[float, float]) -> torch.Tensor:
    hls = kornia.color.rgb_to_hls(x)  # H in radians [0, 2π), L and S in [0, 1]
    hue, lum, sat = hls[:, 0:1], hls[:, 1:2], hls[:, 2:3]
    shift, strength = _uniform(x, *color_shift), _uniform(x, *intensity)
    lum_std = lum.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    noise_l = torch.poisson((lum_std * strength * 255).expand_as(lum).contiguous())
    noise_h = torch.randn_like(hue) * (shift * 360 * strength) * (math.pi / 180)
    hue = torch.remainder(hue + noise_h, 2 * math.pi)
    lum = lum + noise_l / 255 * (1 - lum)
    return kornia.color.hls_to_rgb(torch.cat([hue, lum.clamp(0, 1), sat], dim=1)).clamp_(0, 1)


def elastic_field(b: int, h: int, w: int, alpha: float, sigma: float, kernel_size: int,
                  device: torch.device) -> torch.Tensor:
    """(B, H, W, 2) displacements in normalised coordinates with the statistics of Kornia's
    elastic transform (U(-1, 1) noise, Gaussian-smoothed with ``sigma`` pixels, times ``alpha``),
    drawn on a grid f = ⌊sigma / 1.5⌋ times coarser and upsampled bilinearly. Smoothing n x n
    white noise over s pixels leaves a std proportional to 1/s; on the coarse grid s is sigma/f,
    hence the division by f."""
    f = max(1, int(sigma // 1.5))
    coarse = torch.empty(b, 2, -(-h // f), -(-w // f), device=device).uniform_(-1, 1)
    k = max(3, (kernel_size // f) | 1)
    field = kornia.filters.gaussian_blur2d(coarse, (k, k), (sigma / f, sigma / f), border_type="constant")
    field = F.interpolate(field * (alpha / f), size=(h, w), mode="bilinear", align_corners=False)
    return field.permute(0, 2, 3, 1)


def resample(x: torch.Tensor, matrix: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` warped by the (B, 2, 3) pixel affine ``matrix`` (source to output, as Kornia's
    ``warp_affine`` takes it), its sampling grid displaced by ``field`` (normalised coordinates),
    in one ``grid_sample``; borders reflected."""
    b, c, h, w = x.shape
    norm = KC.normalize_homography(KC.convert_affinematrix_to_homography(matrix), (h, w), (h, w))
    grid = F.affine_grid(torch.linalg.inv(norm)[:, :2], [b, c, h, w], align_corners=True)
    if field is not None:
        grid = grid + field
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


class HeavyAugmentation(nn.Module):
    """The whole heavy augmentation as one module; move it ``.to(device)`` with the batch (Kornia
    samples its parameters where the module lives)."""

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        self.cfg = cfg
        mb, co = cfg.motion_blur, cfg.cutout
        # p=1 inside Kornia: ``apply_to_some`` chooses the images (cfg's p)
        self.kornia = nn.ModuleDict({
            "motion_blur": K.RandomMotionBlur(kernel_size=mb.kernel, angle=(-180.0, 180.0), direction=(-1.0, 1.0),
                                              border_type="reflect", p=1.0),
            "cutout": K.RandomErasing(scale=co.scale, ratio=co.ratio, value=0.0, p=1.0),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x = self._geometry(x)
        bc = c.brightness_contrast
        x = brightness_contrast(x, bc.p, bc.brightness, bc.contrast)
        x = self._kornia("motion_blur", x)
        x = self._kornia("cutout", x)
        x = gauss_noise(x, c.gauss_noise.p, c.gauss_noise.var)
        x = iso_noise(x, c.iso_noise.p, c.iso_noise.color_shift, c.iso_noise.intensity)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Shift, rotation (as albumentations' ShiftScaleRotate) and elastic deformation, each with
        its own coin, as one resampling; borders reflected, as albumentations' default
        BORDER_REFLECT_101 (black corners would be a cue no test image has). The elastic field is
        added to the affine grid rather than composed with it: an isotropic random field rotated is
        the same random field."""
        sh, ro, el = self.cfg.shift, self.cfg.rotate, self.cfg.elastic
        if sh.p == 0 and ro.p == 0 and el.p == 0:
            return x
        b, _, h, w = x.shape
        dev = x.device
        shift, rotate, elastic = (_coin(x, op.p).flatten() for op in (sh, ro, el))
        angle = torch.empty(b, device=dev).uniform_(-ro.limit, ro.limit) * rotate
        offset = torch.empty(b, 2, device=dev).uniform_(-sh.limit, sh.limit) * torch.tensor([w, h], device=dev)
        centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=dev).expand(b, 2)
        matrix = KG.get_rotation_matrix2d(centre, angle, torch.ones(b, 2, device=dev))
        matrix = torch.cat([matrix[..., :2], matrix[..., 2:] + (offset * shift[:, None])[..., None]], dim=-1)
        field = (elastic_field(b, h, w, el.alpha, el.sigma, el.kernel_size, dev) * elastic.view(-1, 1, 1, 1)
                 if el.p > 0 else None)
        out = resample(x, matrix, field)
        return torch.where((shift | rotate | elastic).view(-1, 1, 1, 1), out.clamp_(0, 1), x)

    def _kornia(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return apply_to_some(x, getattr(self.cfg, name).p, lambda x: self.kornia[name](x).clamp_(0, 1))


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    return stream_seed(seed, epoch, step, AUGMENT, rank)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG (CPU and ``device``) seeded with ``seed`` inside, restored after: the
    augmentation of a step is reproducible without disturbing dropout's stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
