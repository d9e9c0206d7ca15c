"""The paper's "heavy augmentation" on a whole batch on the device: shift, scale and rotation,
elastic deformation, brightness and contrast, motion blur, cutout, Gaussian noise and ISO noise.
Each op is albumentations 1.2.1's (July 2022, current in mid-2022; the paper cites albumentations,
and 1.3.0 of September 2022 has the same code and defaults for these ops) with its defaults, its own per-image
probability and per-image parameters: ShiftScaleRotate, ElasticTransform, RandomBrightnessContrast,
MotionBlur, Cutout, GaussNoise, ISONoise. tests/test_heavy.py runs albumentations 1.2.1 itself,
per image on the CPU, against each op. Images are float in [0, 1] in and out; albumentations'
sizes in pixels are multiplied by ``pixel_scale`` (1 on ImageNet crops).

Written here rather than taken from Kornia: Kornia's modules draw one motion-blur kernel size per
batch and read it back, draw erased boxes on the CPU, and have neither albumentations' elastic
transform (a random affine first), nor its brightness, its Gaussian noise (one std per image,
clamped) or ISO noise. Kornia gives the filters and the colour conversions; OpenCV draws the
motion-blur lines, as albumentations does, once, into a table of kernels.

The geometry is one resampling: ShiftScaleRotate's and the elastic transform's affine maps
compose into one, and the elastic field displaces the sampling points, so one ``grid_sample``
replaces albumentations' two warps and a remap. The field is drawn on a grid ⌊sigma/1.5⌋ times
coarser than the image (it is smooth at the scale of sigma anyway), which makes its Gaussian
smoothing far cheaper than at full resolution: elastic was the costliest op on the GPU
(benchmarks/augment_throughput.py).

Probabilities: each op applies to each image with probability p, but it is computed only on the
images it applies to (``apply_to_some``): a random subset of ⌊B·p⌋ or ⌈B·p⌉ images, gathered,
transformed and scattered back (⌈B·p⌉ always computed, the last kept by a coin, so that no count
is read back to the host). Kornia >= 0.9 and a ``torch.where`` on per-image coins compute the
op on the whole batch and blend, so at albumentations' default p = 0.5 half of the work was thrown
away; the noises, at p = 1 the costliest ops after the geometry (benchmarks/augment_throughput.py),
now cost half. The difference from independent coins: the number of images an op touches varies
by at most one around B·p instead of binomially, which no training run can tell apart. The
geometry keeps per-image coins and a ``torch.where``: its two ops share one resampling, which
runs unless both coins miss (75% of images at the defaults), so a subset would save little.
Neither way needs a Python loop over samples or a host sync.

Randomness: all draws come from torch's RNG; the caller seeds it per step (``seeded``), so a batch's
augmentation is a function of (seed, epoch, step).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import kornia.color
import kornia.filters
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fasttricks.recipes import AugmentConfig
from fasttricks.runtime.seeding import AUGMENT, stream_seed

OPS = tuple(AugmentConfig.model_fields)  # the ops, in the order they run


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
    lum_std = lum.flatten(1).std(dim=1, unbiased=False).view(-1, 1, 1, 1)
    noise_l = torch.poisson((lum_std * strength * 255).expand_as(lum).contiguous())
    noise_h = torch.randn_like(hue) * (shift * 360 * strength) * (math.pi / 180)
    hue = torch.remainder(hue + noise_h, 2 * math.pi)
    lum = lum + noise_l / 255 * (1 - lum)
    return kornia.color.hls_to_rgb(torch.cat([hue, lum.clamp(0, 1), sat], dim=1)).clamp_(0, 1)


def motion_blur(x: torch.Tensor, p: float, sizes: tuple[int, ...], lines: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
    """albumentations' MotionBlur: per image, a kernel size from ``sizes``, then a line between two
    cells of that square drawn uniformly (a vertical line's ends distinct), normalised; correlated
    with the image, borders reflected (cv2.filter2D's BORDER_REFLECT_101). The line is anywhere in
    the kernel, so the blur also shifts the image by up to half a kernel, as 1.2.1's does."""
    def op(x):
        kernels, _ = line_kernels(x.shape[0], sizes, lines, offsets)
        return kornia.filters.filter2d(x, kernels, border_type="reflect").clamp_(0, 1)
    return apply_to_some(x, p, op)


def motion_sizes(kernel: tuple[int, int]) -> tuple[int, ...]:
    return tuple(range(kernel[0] | 1, kernel[1] + 1, 2))


@functools.lru_cache(maxsize=8)
def line_table(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(every line kernel of every size, drawn by OpenCV's ``cv2.line`` as albumentations draws it,
    normalised and zero-padded to the largest size: (N, K, K); the index of each size's first).
    Indexed by the ends: offset + ((x0·k + y0)·k + x1)·k + y1. A table, because rasterising
    cv2.line's pixels on the device would have to copy its tie-breaking; sizes up to 11 hold 24,309
    kernels, 12 MB."""
    big = sizes[-1]
    kernels, offsets = [], []
    for k in sizes:
        offsets.append(len(kernels))
        for x0, y0, x1, y1 in itertools.product(range(k), repeat=4):
            line = np.zeros((k, k), np.uint8)
            cv2.line(line, (x0, y0), (x1, y1), 1, thickness=1)
            kernels.append(np.pad(line.astype(np.float32) / line.sum(), (big - k) // 2))
    return torch.from_numpy(np.stack(kernels)), torch.tensor(offsets)


def line_kernels(b: int, sizes: tuple[int, ...], lines: torch.Tensor, offsets: torch.Tensor):
    """(B kernels drawn as albumentations 1.2.1's MotionBlur draws one, each image's kernel size)."""
    dev = lines.device
    which = torch.randint(len(sizes), (b,), device=dev)
    k = sizes[0] + 2 * which
    u = torch.rand(5, b, device=dev)
    x0, x1, y0, y1_free = ((u[i] * k).long() for i in range(4))
    y1_other = (y0 + 1 + (u[4] * (k - 1)).long()) % k  # random.sample(range(k), 2): y1 != y0
    y1 = torch.where(x0 == x1, y1_other, y1_free)
    return lines[offsets[which] + ((x0 * k + y0) * k + x1) * k + y1], k


def cutout(x: torch.Tensor, p: float, holes: int, h_size: int, w_size: int, fill: float = 0.0) -> torch.Tensor:
    """albumentations' Cutout: per image ``holes`` boxes filled with ``fill``, each centred on a
    point drawn from {0…H}×{0…W} and clipped to the image (so h_size × w_size px but at the bottom
    and right edges), drawn on the device; overlapping holes merge."""
    def op(x):
        b, _, h, w = x.shape
        dev = x.device
        top = (torch.randint(0, h + 1, (b, holes), device=dev) - h_size // 2).clamp(0, h)
        left = (torch.randint(0, w + 1, (b, holes), device=dev) - w_size // 2).clamp(0, w)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        in_rows = ((rows >= top[..., None]) & (rows < (top + h_size)[..., None])).to(x.dtype)  # (B, holes, H)
        in_cols = ((cols >= left[..., None]) & (cols < (left + w_size)[..., None])).to(x.dtype)
        inside = torch.bmm(in_rows.transpose(1, 2), in_cols) > 0  # (B, H, W): in some hole
        return torch.where(inside.unsqueeze(1), fill, x)
    return apply_to_some(x, p, op)


def shift_scale_rotate_matrix(angle: torch.Tensor, zoom: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                              h: int, w: int) -> torch.Tensor:
    """(B, 3, 3) pixel maps, source to output, of albumentations' ShiftScaleRotate given its draws
    (angle in degrees, zoom, shifts as fractions of the width and the height): OpenCV's
    getRotationMatrix2D about (W/2 − 0.5, H/2 − 0.5), then the shift."""
    rad = angle.deg2rad()
    a, s = zoom * rad.cos(), zoom * rad.sin()
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    m = _eye(angle.shape[0], angle.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, s, (1 - a) * cx - s * cy + dx * w
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = -s, a, s * cx + (1 - a) * cy + dy * h
    return m


def draw_shift_scale_rotate(b: int, shift: float, scale: float, rotate: float, device: torch.device):
    """ShiftScaleRotate's draws, per image: angle in ±rotate, zoom in 1 ± scale, x and y shifts in ±shift."""
    angle = torch.empty(b, device=device).uniform_(-rotate, rotate)
    zoom = torch.empty(b, device=device).uniform_(1 - scale, 1 + scale)
    dx, dy = torch.empty(2, b, device=device).uniform_(-shift, shift)
    return angle, zoom, dx, dy


def elastic_affine_matrix(moves: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 3, 3) the random affine that albumentations' ElasticTransform applies first, given its
    draws ``moves`` (B, 3, 2), U(±alpha_affine) px: the map that moves three corners of the central
    square (half side ⌊min(H, W)/3⌋) by them, as cv2.getAffineTransform solves it. The square's
    centre is (⌊H/2⌋, ⌊W/2⌋) read as (x, y), albumentations' order, which matters only for images
    that are not square."""
    half = max(1, min(h, w) // 3)
    cx, cy = float(h // 2), float(w // 2)
    # corners p0 = (cx+half, cy+half), p1 = (cx+half, cy-half), p2 = (cx-half, cy-half): p0 - p1 is
    # along y and p1 - p2 along x, so the linear part's columns are differences of the moves
    col_x, col_y = (moves[:, 1] - moves[:, 2]) / (2 * half), (moves[:, 0] - moves[:, 1]) / (2 * half)
    m = _eye(moves.shape[0], moves.device)
    m[:, :2, 0] += col_x
    m[:, :2, 1] += col_y
    m[:, :2, 2] = moves[:, 1] - col_x * (cx + half) - col_y * (cy - half)
    return m


def _eye(b: int, device: torch.device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(b, 3, 3).clone()


def elastic_field(b: int, h: int, w: int, alpha: float, sigma: float, device: torch.device) -> torch.Tensor:
    """(B, H, W, 2) displacements in pixels with the statistics of albumentations' (U(−1, 1) noise,
    smoothed by a Gaussian of ``sigma`` px truncated at 4 sigma as scipy's, times ``alpha``), drawn
    on a grid f = ⌊sigma / 1.5⌋ times coarser and upsampled bilinearly: smoothing white noise over
    s cells leaves a std proportional to 1/s, and on the coarse grid s is sigma/f, hence the
    division by f. Edges are replicated (scipy reflects): the coarse grid can be smaller than the
    kernel, which reflection cannot pad."""
    f = max(1, int(sigma // 1.5))
    coarse = torch.empty(b, 2, -(-h // f), -(-w // f), device=device).uniform_(-1, 1)
    k = 2 * max(1, int(4 * sigma + 0.5) // f) + 1
    # Kornia's gaussian_blur2d checks sigma > 0 with a host read; its kernel and filter do not
    g = kornia.filters.get_gaussian_kernel1d(k, torch.full((1, 1), sigma / f, device=device))
    field = kornia.filters.filter2d_separable(coarse, g, g, border_type="replicate")
    field = F.interpolate(field * (alpha / f), size=(h, w), mode="bilinear", align_corners=False)
    return field.permute(0, 2, 3, 1)


def resample(x: torch.Tensor, matrix: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` warped by the (B, 2, 3) or (B, 3, 3) pixel affine ``matrix`` (source to output, as
    cv2.warpAffine and Kornia's ``warp_affine`` take it), then remapped by ``field``: output(p) =
    warped(p + field(p)), albumentations' cv2.remap; one ``grid_sample``, bilinear, borders
    reflected as BORDER_REFLECT_101."""
    b, c, h, w = x.shape
    inverse = _invert_affine(matrix)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    points = torch.stack([xs, ys], dim=-1).expand(b, h, w, 2)
    if field is not None:
        points = points + field
    source = points @ inverse[:, None, :, :2].transpose(-1, -2) + inverse[:, None, None, :, 2]
    # align_corners=True: pixel centres 0 and W-1 are -1 and 1
    grid = torch.stack([source[..., 0] * (2 / max(w - 1, 1)) - 1, source[..., 1] * (2 / max(h - 1, 1)) - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _invert_affine(m: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) inverse of an affine map, written out: torch.linalg's inverse checks its input on
    the host, which waits for the device."""
    a, b_, tx = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    c, d, ty = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * d - b_ * c
    ia, ib, ic, id_ = d / det, -b_ / det, -c / det, a / det
    return torch.stack([torch.stack([ia, ib, -(ia * tx + ib * ty)], -1),
                        torch.stack([ic, id_, -(ic * tx + id_ * ty)], -1)], 1)


class HeavyAugmentation(nn.Module):
    """The whole heavy augmentation as one module. Its only state is the motion-blur line table (a
    buffer, so that ``.to(device)`` moves it once); every draw is made on the batch's device.
    ``pixel_scale`` multiplies the sizes given in pixels (data.pixel_scale)."""

    def __init__(self, cfg: AugmentConfig, pixel_scale: float = 1.0):
        super().__init__()
        self.cfg, self.pixel_scale = cfg, pixel_scale
        self.sizes = motion_sizes(cfg.motion_blur.kernel)
        lines, offsets = line_table(self.sizes) if cfg.motion_blur.p > 0 else (torch.zeros(1, 1, 1), torch.zeros(1))
        self.register_buffer("lines", lines.clone(), persistent=False)
        self.register_buffer("line_offsets", offsets.long(), persistent=False)

    def compiled(self, backend: str = "inductor") -> nn.Module:
        """The whole augmentation as one compiled graph (it has no break): inductor fuses the
        pointwise ops and draws the noise inside the kernels, so values differ from eager's, the
        distribution does not. ``backend``: torch.compile's (the benchmarks' CPU rehearsal traces
        with aot_eager)."""
        return torch.compile(self, fullgraph=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, px = self.cfg, self.pixel_scale
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x = self._geometry(x)
        bc = c.brightness_contrast
        x = brightness_contrast(x, bc.p, bc.brightness, bc.contrast)
        x = motion_blur(x, c.motion_blur.p, self.sizes, self.lines, self.line_offsets)
        co = c.cutout
        x = cutout(x, co.p, co.num_holes, max(1, round(co.max_h_size * px)), max(1, round(co.max_w_size * px)),
                   co.fill_value)
        x = gauss_noise(x, c.gauss_noise.p, c.gauss_noise.var)
        x = iso_noise(x, c.iso_noise.p, c.iso_noise.color_shift, c.iso_noise.intensity)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        """ShiftScaleRotate, then ElasticTransform (its affine, then its field), each with its own
        coin, as one resampling: the two affine maps compose into one, and the field displaces the
        output's pixels before it. Inside the image this is albumentations' two warps; near the
        edges albumentations reflects twice, we once, and we interpolate once instead of twice."""
        ssr, el, px = self.cfg.shift_scale_rotate, self.cfg.elastic, self.pixel_scale
        if ssr.p == 0 and el.p == 0:
            return x
        b, _, h, w = x.shape
        dev = x.device
        moved, deformed = _coin(x, ssr.p).view(-1, 1, 1), _coin(x, el.p).view(-1, 1, 1)
        eye = _eye(b, dev)
        ssr_draws = draw_shift_scale_rotate(b, ssr.shift, ssr.scale, ssr.rotate, dev)
        first = torch.where(moved, shift_scale_rotate_matrix(*ssr_draws, h, w), eye)
        moves = torch.empty(b, 3, 2, device=dev).uniform_(-el.alpha_affine * px, el.alpha_affine * px)
        second = torch.where(deformed, elastic_affine_matrix(moves, h, w), eye)
        field = (elastic_field(b, h, w, el.alpha * px, el.sigma * px, dev) * deformed.unsqueeze(-1)
                 if el.p > 0 else None)
        out = resample(x, second @ first, field)
        return torch.where((moved | deformed).view(-1, 1, 1, 1), out.clamp_(0, 1), x)


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
