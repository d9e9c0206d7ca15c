"""The paper's "heavy augmentation" on a whole batch on the device: shift, rotation, elastic
deformation, brightness and contrast, motion blur, cutout, Gaussian noise and ISO noise, each
with its own per-image probability and per-image parameters (albumentations 1.x semantics, as the
paper used; its defaults for brightness/contrast, motion blur and the noises, not yet for elastic
deformation, cutout and the shift/rotation, which the README lists). Images are float in [0, 1]
in and out.

Kornia provides the motion-blur kernels, the filters and the geometry's building blocks; motion
blur and cutout draw their parameters here, per image and on the device (Kornia's modules draw one
kernel size per batch and read it back, and draw the erased boxes on the CPU). Shift, rotation and
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
transformed and scattered back (⌈B·p⌉ always computed, the last kept by a coin, so that no count
is read back to the host). Kornia >= 0.9 and a ``torch.where`` on per-image coins compute the
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
    images returned unchanged; ``op`` sees only the subset. The subset holds ⌈B·p⌉ images, the last
    of them kept with probability 1 − (⌈B·p⌉ − B·p) by a coin drawn on the device: a fixed size
    known on the host, so no value is read back (and a compiled op sees one shape)."""
    b = x.shape[0]
    if p <= 0:
        return x
    if p >= 1:
        return op(x)
    expected = b * p
    k = max(1, math.ceil(expected - 1e-9))
    chosen = torch.randperm(b, device=x.device)[:k]
    subset = x.index_select(0, chosen)
    out = op(subset)
    last_kept = expected - (k - 1)  # in (0, 1]
    if last_kept < 1 - 1e-9:
        keep = torch.cat([torch.ones(k - 1, dtype=torch.bool, device=x.device),
                          torch.rand(1, device=x.device) < last_kept])
        out = torch.where(keep.view(-1, 1, 1, 1), out, subset)
    return x.index_copy(0, chosen, out)


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


def motion_blur(x: torch.Tensor, p: float, kernel: tuple[int, int]) -> torch.Tensor:
    """Kornia's RandomMotionBlur (line kernel of a random angle in ±180° and direction in ±1,
    reflected borders) with the kernel size drawn per image, as albumentations' MotionBlur draws
    it, where Kornia draws one size for the whole batch and reads it back to the host. Each odd
    size in ``kernel`` is equally likely; smaller kernels are zero-padded to the largest, which
    leaves their result unchanged, so one per-image filter covers the batch."""
    def op(x):
        kernels, _, _, _ = motion_kernels(x.shape[0], kernel, x.device)
        return kornia.filters.filter2d(x, kernels, border_type="reflect").clamp_(0, 1)
    return apply_to_some(x, p, op)


def motion_kernels(b: int, kernel: tuple[int, int], device: torch.device):
    """(kernels (B, K, K) with K the largest odd size, each image's size, angle, direction)."""
    sizes = list(range(kernel[0] | 1, kernel[1] + 1, 2))
    angle = torch.empty(b, device=device).uniform_(-180, 180)
    direction = torch.empty(b, device=device).uniform_(-1, 1)
    which = torch.randint(len(sizes), (b,), device=device)
    big = sizes[-1]
    kernels = sum(torch.where(which.view(-1, 1, 1) == i,
                              F.pad(kornia.filters.get_motion_kernel2d(k, angle, direction), [(big - k) // 2] * 4), 0.0)
                  for i, k in enumerate(sizes))
    return kernels, sizes[0] + 2 * which, angle, direction


def cutout(x: torch.Tensor, p: float, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Kornia's RandomErasing (one box per image filled with 0: area a fraction U(scale) of the
    image, aspect ratio U(ratio[0], 1) or U(1, ratio[1]) with equal odds when the range spans 1,
    position uniform), its parameters drawn on the device: Kornia draws them on the CPU and copies
    the boxes over, a copy that waits for the device."""
    def op(x):
        b, _, h, w = x.shape
        dev = x.device
        area = torch.empty(b, device=dev).uniform_(*scale) * (h * w)
        if ratio[0] < 1 < ratio[1]:
            aspect = torch.where(torch.rand(b, device=dev) < 0.5, torch.empty(b, device=dev).uniform_(ratio[0], 1),
                                 torch.empty(b, device=dev).uniform_(1, ratio[1]))
        else:
            aspect = torch.empty(b, device=dev).uniform_(*ratio)
        hh = torch.round((area * aspect).sqrt()).clamp(1, h)
        ww = torch.round((area / aspect).sqrt()).clamp(1, w)
        top = torch.floor(torch.rand(b, device=dev) * (h - hh + 1))
        left = torch.floor(torch.rand(b, device=dev) * (w - ww + 1))
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + hh).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + ww).view(-1, 1, 1)))
        return torch.where(inside.unsqueeze(1), 0.0, x)
    return apply_to_some(x, p, op)


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
    # Kornia's gaussian_blur2d checks sigma > 0 with a host read; its kernel and filter do not
    g = kornia.filters.get_gaussian_kernel1d(k, torch.full((1, 1), sigma / f, device=device))
    field = kornia.filters.filter2d_separable(coarse, g, g, border_type="constant")
    field = F.interpolate(field * (alpha / f), size=(h, w), mode="bilinear", align_corners=False)
    return field.permute(0, 2, 3, 1)


def resample(x: torch.Tensor, matrix: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` warped by the (B, 2, 3) pixel affine ``matrix`` (source to output, as Kornia's
    ``warp_affine`` takes it), its sampling grid displaced by ``field`` (normalised coordinates),
    in one ``grid_sample``; borders reflected."""
    b, c, h, w = x.shape
    norm = KC.normalize_homography(KC.convert_affinematrix_to_homography(matrix), (h, w), (h, w))
    # inv_ex: the inverse without torch.linalg's host-side error check (an affine map always inverts)
    grid = F.affine_grid(torch.linalg.inv_ex(norm).inverse[:, :2], [b, c, h, w], align_corners=True)
    if field is not None:
        grid = grid + field
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


class HeavyAugmentation(nn.Module):
    """The whole heavy augmentation as one module (it holds no state: every draw is made on the
    batch's device)."""

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        self.cfg = cfg

    def compiled(self) -> nn.Module:
        """The whole augmentation as one compiled graph (it has no break): inductor fuses the
        pointwise ops and draws the noise inside the kernels, so values differ from eager's, the
        distribution does not."""
        return torch.compile(self, fullgraph=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x = self._geometry(x)
        bc = c.brightness_contrast
        x = brightness_contrast(x, bc.p, bc.brightness, bc.contrast)
        x = motion_blur(x, c.motion_blur.p, c.motion_blur.kernel)
        x = cutout(x, c.cutout.p, c.cutout.scale, c.cutout.ratio)
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
        # built by fills, not torch.tensor(list, device): a copy from host memory waits for the device
        offset = torch.empty(b, 2, device=dev).uniform_(-sh.limit, sh.limit)
        offset[:, 0] *= w
        offset[:, 1] *= h
        centre = torch.full((b, 2), (w - 1) / 2, device=dev)
        centre[:, 1] = (h - 1) / 2
        matrix = KG.get_rotation_matrix2d(centre, angle, torch.ones(b, 2, device=dev))
        matrix = torch.cat([matrix[..., :2], matrix[..., 2:] + (offset * shift[:, None])[..., None]], dim=-1)
        field = (elastic_field(b, h, w, el.alpha, el.sigma, el.kernel_size, dev) * elastic.view(-1, 1, 1, 1)
                 if el.p > 0 else None)
        out = resample(x, matrix, field)
        return torch.where((shift | rotate | elastic).view(-1, 1, 1, 1), out.clamp_(0, 1), x)


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
