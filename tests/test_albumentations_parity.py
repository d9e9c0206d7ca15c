"""Each heavy-augmentation op against albumentations 1.2.1 itself (the release whose defaults the
recipes take, pinned in the dev extra), run per image on the CPU as the 2022 entries ran it.

Two kinds of check: given the same draws, the geometry and the motion blur produce albumentations'
pixels; over many images, each op's effect (a statistic per image) has albumentations'
distribution, by a two-sample Kolmogorov-Smirnov test, and the same test tells apart a setting
that is wrong by a third to a half, so a passing comparison means something.

albumentations works on uint8 images: OpenCV's ops round their results to integers, and the ops
written in numpy (ISO noise, Gaussian noise, brightness/contrast) truncate them, which darkens by
half a level on average. Ours stay float in [0, 1]; before a comparison their outputs are stored
as albumentations' would be (``STORED``). Training does not reproduce the truncation: a bias of
half a level out of 255 is an artefact of the storage, not of the augmentation."""

import random
from functools import cache

import albumentations as A
import albumentations.augmentations.geometric.functional as AG
import cv2
import kornia.filters
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.ndimage import gaussian_filter

from fasttricks.augment.heavy import (
    OPS,
    HeavyAugmentation,
    elastic_affine_matrix,
    elastic_field,
    line_kernels,
    line_table,
    resample,
    seeded,
    shift_scale_rotate_matrix,
)
from fasttricks.recipes import AugmentConfig

N, SIZE = 200, 96
CPU = torch.device("cpu")


@cache
def photos() -> np.ndarray:
    """(N, SIZE, SIZE, 3) uint8 images with structure at several scales, values in [20, 235] (so
    that a zero is a cutout hole and the noises are not clipped)."""
    rs = np.random.RandomState(0)
    images = []
    for _ in range(N):
        img = sum(w * cv2.resize(rs.rand(n, n, 3).astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
                  for n, w in ((4, 1.0), (12, 0.6), (32, 0.3)))
        img = (img - img.min()) / (img.max() - img.min())
        images.append(np.round(20 + 215 * img).astype(np.uint8))
    return np.stack(images)


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def theirs(transform) -> np.ndarray:
    random.seed(0)
    np.random.seed(0)
    return np.stack([transform(image=img)["image"] for img in photos()]).astype(np.float32)


# how albumentations stores each op's uint8 result
STORED = {"shift_scale_rotate": np.round, "elastic": np.round, "motion_blur": np.round, "cutout": np.round,
          "brightness_contrast": np.floor, "gauss_noise": np.floor, "iso_noise": np.floor}


def ours(op: str, pixel_scale: float = 1.0, **settings) -> np.ndarray:
    """Our ``op`` alone at p = 1 on the photos, stored as albumentations stores its result."""
    cfg = AugmentConfig(**{name: {"p": 1.0, **settings} if name == op else {"p": 0.0} for name in OPS})
    with seeded(0, CPU):
        out = HeavyAugmentation(cfg, pixel_scale)(_float(photos()))
    # 1e-3: a level reached exactly in float arithmetic (x·255 of x = k/255) stays that level
    return STORED[op](out.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255 + 1e-3).astype(np.float32)


def _per_image(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


STATISTICS = {
    "mean |change|": lambda out, inp: np.abs(_per_image(out - inp)).mean(1),
    "mean change": lambda out, inp: _per_image(out - inp).mean(1),
    "contrast ratio": lambda out, inp: _per_image(out).std(1) / _per_image(inp).std(1),
    "noise std": lambda out, inp: _per_image(out - inp).std(1),
    "erased fraction": lambda out, inp: (out == 0).all(-1).reshape(len(out), -1).mean(1),
}

# op: (albumentations' transform at its defaults, the statistics compared, a wrong setting of ours)
CASES = {
    "shift_scale_rotate": (lambda: A.ShiftScaleRotate(p=1), ["mean |change|"], {"rotate": 30}),
    "elastic": (lambda: A.ElasticTransform(p=1), ["mean |change|"], {"alpha_affine": 35}),
    "brightness_contrast": (lambda: A.RandomBrightnessContrast(p=1), ["mean change", "contrast ratio"],
                            {"brightness": 0.3, "contrast": 0.3}),
    "motion_blur": (lambda: A.MotionBlur(p=1), ["mean |change|"], {"kernel": (3, 5)}),
    "cutout": (lambda: A.Cutout(p=1), ["erased fraction"], {"max_h_size": 7, "max_w_size": 7}),
    "gauss_noise": (lambda: A.GaussNoise(p=1), ["noise std"], {"var": (10, 30)}),
    "iso_noise": (lambda: A.ISONoise(p=1), ["mean change", "mean |change|"], {"intensity": (0.1, 0.35)}),
}


def test_every_op_is_compared():
    assert set(CASES) == set(OPS) == set(STORED)


@pytest.mark.filterwarnings("ignore:Cutout has been deprecated")
@pytest.mark.parametrize("op", list(CASES))
def test_each_op_has_albumentations_effect_and_the_comparison_tells_a_wrong_setting(op):
    transform, names, wrong = CASES[op]
    inp = photos().astype(np.float32)
    reference = theirs(transform())
    right, off = ours(op), ours(op, **wrong)
    tells = {}
    for name in names:
        stat = STATISTICS[name]
        same = stats.ks_2samp(stat(right, inp), stat(reference, inp)).pvalue
        tells[name] = stats.ks_2samp(stat(off, inp), stat(reference, inp)).pvalue
        assert same > 0.01, f"{op}: {name} distributed unlike albumentations' (KS p = {same:.2g})"
    assert min(tells.values()) < 0.01, f"{op}: no statistic tells {wrong} from the defaults (KS p: {tells})"


def _smooth(n=4) -> np.ndarray:
    return photos()[:n].astype(np.float32) / 255


@pytest.mark.parametrize("angle, zoom, dx, dy", [(30, 1.05, 0.05, -0.03), (-44, 0.91, -0.06, 0.06), (0, 1, 0.03, 0)])
def test_shift_scale_rotate_given_its_draws_is_albumentations_warp(angle, zoom, dx, dy):
    images = _smooth()
    expected = np.stack([AG.shift_scale_rotate(img, angle, zoom, dx, dy, cv2.INTER_LINEAR, cv2.BORDER_REFLECT_101)
                         for img in images])
    n = len(images)
    m = shift_scale_rotate_matrix(torch.full((n,), float(angle)), torch.full((n,), zoom), torch.full((n,), dx),
                                  torch.full((n,), dy), SIZE, SIZE)
    got = resample(torch.from_numpy(images).permute(0, 3, 1, 2), m).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got - expected)  # OpenCV interpolates with 1/32-pixel fixed-point weights
    assert diff.mean() < 1e-3 and np.quantile(diff, 0.999) < 0.01, (diff.mean(), diff.max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elastic_given_its_draws_is_albumentations_affine_then_a_negligible_field(seed):
    img = _smooth(1)[0]
    expected = AG.elastic_transform(img, 1, 50, 50, cv2.INTER_LINEAR, cv2.BORDER_REFLECT_101, None,
                                    np.random.RandomState(seed))
    moves = np.random.RandomState(seed).uniform(-50, 50, size=(3, 2)).astype(np.float32)  # its first draws
    m = elastic_affine_matrix(torch.from_numpy(moves)[None], SIZE, SIZE)
    got = resample(torch.from_numpy(img).permute(2, 0, 1)[None], m)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got - expected)
    assert diff.mean() < 1e-3 and diff.max() < 0.01, (diff.mean(), diff.max())
    assert np.abs(expected - img).mean() > 0.02  # and the affine is no small change


@pytest.mark.parametrize("alpha, sigma", [(34, 4), (40, 8), (1, 50)])
def test_the_coarse_elastic_field_has_albumentations_magnitude_and_smoothness(alpha, sigma):
    torch.manual_seed(0)
    field = elastic_field(16, SIZE, SIZE, alpha, sigma, CPU)[..., 0].numpy()
    rs = np.random.RandomState(0)
    theirs_ = np.stack([gaussian_filter(rs.rand(SIZE, SIZE) * 2 - 1, sigma) * alpha for _ in range(16)])
    if sigma >= 50:  # albumentations' default: the field moves pixels by hundredths of a pixel
        assert field.std() < 0.02 and theirs_.std() < 0.02
        return
    assert abs(field.std() / theirs_.std() - 1) < 0.1, (field.std(), theirs_.std())

    def correlation(f, lag):
        a, c = f[:, :, :-lag], f[:, :, lag:]
        return (a * c).mean() / (a * a).mean()

    for lag in (2, 4, 8):  # as smooth: the same correlation at the same distance in pixels
        assert abs(correlation(field, lag) - correlation(theirs_, lag)) < 0.05, lag


def _kernel_key(kernel: np.ndarray) -> tuple:
    """A kernel's size class, cells and bounding box: what its blur depends on, up to position."""
    on = np.argwhere(kernel > 0)
    return int((kernel > 0).sum()), int(np.ptp(on[:, 0])), int(np.ptp(on[:, 1]))


def test_motion_blur_kernels_are_drawn_as_albumentations_draws_them():
    n = 6000
    random.seed(0)
    blur = A.MotionBlur(p=1)
    reference = [blur.get_params()["kernel"] for _ in range(n)]
    sizes = (3, 5, 7)
    lines, offsets = line_table(sizes)
    torch.manual_seed(0)
    kernels, k = line_kernels(n, sizes, lines, offsets)
    keys_theirs = [(len(kern),) + _kernel_key(kern) for kern in reference]
    keys_ours = [(int(size),) + _kernel_key(kern.numpy()) for kern, size in zip(kernels, k, strict=True)]
    names = sorted(set(keys_theirs) | set(keys_ours))
    table = np.array([[keys_ours.count(key) for key in names], [keys_theirs.count(key) for key in names]])
    assert stats.chi2_contingency(table).pvalue > 0.01
    # every kernel of ours is one of OpenCV's lines, normalised
    for kern, size in zip(kernels[:50], k[:50], strict=True):
        pad = (7 - int(size)) // 2
        inner = kern.numpy()[pad:7 - pad, pad:7 - pad]
        assert inner.sum() == pytest.approx(1) and kern.sum() == pytest.approx(1)


def test_motion_blur_given_its_kernel_is_albumentations_filter():
    images = _smooth()
    random.seed(1)
    blur = A.MotionBlur(p=1)
    for img in images:
        kernel = blur.get_params()["kernel"]
        expected = blur.apply(img, kernel=kernel)
        k = torch.from_numpy(kernel)[None]
        got = kornia.filters.filter2d(torch.from_numpy(img).permute(2, 0, 1)[None], k, border_type="reflect")
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Cutout has been deprecated")
def test_pixel_scale_shrinks_cutout_holes_as_albumentations_would_at_that_size():
    """data.pixel_scale 0.5 gives ours albumentations' holes of 4 px: the toy overrides' way to keep
    albumentations' pixel sizes in proportion on small images."""
    out = ours("cutout", pixel_scale=0.5)
    reference = theirs(A.Cutout(max_h_size=4, max_w_size=4, p=1))
    erased = STATISTICS["erased fraction"]
    inp = photos().astype(np.float32)
    assert stats.ks_2samp(erased(out, inp), erased(reference, inp)).pvalue > 0.01
