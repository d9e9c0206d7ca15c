"""Heavy augmentation: each op does something at p=1 and nothing at p=0, stays in [0, 1], and a
seed fixes the whole batch's augmentation."""

import kornia.geometry.transform as KG
import pytest
import torch

from fasttricks.augment.heavy import (
    OPS,
    HeavyAugmentation,
    apply_to_some,
    brightness_contrast,
    cutout,
    gauss_noise,
    iso_noise,
    line_kernels,
    line_table,
    resample,
    seeded,
)
from fasttricks.recipes import AugmentConfig, RecipeError, load_recipe

CPU = torch.device("cpu")


def _only(op: str, p: float) -> AugmentConfig:
    """Every op off but ``op`` at probability ``p``."""
    return AugmentConfig(**{name: {"p": p if name == op else 0.0} for name in OPS})


def _images(n=6, size=48):
    g = torch.Generator().manual_seed(0)
    # smooth images with structure (a blurred random field), like photographs
    x = torch.nn.functional.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size,
                                        mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", OPS)
def test_each_op_changes_every_image_at_p1_and_none_at_p0(op):
    x = _images()
    with seeded(0, CPU):
        on = HeavyAugmentation(_only(op, 1.0))(x)
    with seeded(0, CPU):
        off = HeavyAugmentation(_only(op, 0.0))(x)
    assert torch.equal(off, x)
    changed = (on - x).abs().flatten(1).amax(1)
    assert (changed > 1e-3).all(), f"{op} left some images unchanged: {changed}"
    assert on.min() >= 0 and on.max() <= 1
    assert on.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", ["brightness_contrast", "motion_blur", "cutout", "gauss_noise", "iso_noise"])
def test_at_p_half_an_op_changes_half_the_batch_and_leaves_the_rest_bit_identical(op):
    x = _images(n=8)
    with seeded(3, CPU):
        out = HeavyAugmentation(_only(op, 0.5))(x)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    untouched = (out == x).flatten(1).all(1)
    assert changed.sum() == 4 and untouched.sum() == 4  # ⌊8 · 0.5⌋ = 4 exactly, the others bit-identical


def test_apply_to_some_computes_only_the_chosen_images_each_with_probability_p():
    seen = []

    def op(x):
        seen.append(x.shape[0])
        return x + 1

    x = torch.zeros(3, 1, 1, 1)
    picks = torch.zeros(3)
    trials = 3000
    with seeded(0, CPU):
        for _ in range(trials):
            picks += apply_to_some(x, 0.3, op).flatten()
    assert seen == [1] * trials  # B·p = 0.9: ⌈0.9⌉ = 1 image computed, always the same shape
    assert picks.sum() / trials == pytest.approx(0.9, rel=0.05)  # ... and kept with probability 0.9
    assert torch.allclose(picks / trials, torch.full((3,), 0.3), atol=0.03)  # every image: p


def test_the_same_seed_gives_the_same_batch_and_another_seed_does_not():
    aug = HeavyAugmentation(AugmentConfig())
    x = _images()
    runs = []
    for seed in (1, 1, 2):
        with seeded(seed, CPU):
            runs.append(aug(x))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_seeding_does_not_disturb_the_global_stream():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(1, CPU):
        HeavyAugmentation(AugmentConfig())(_images())
    assert torch.equal(torch.rand(3), expected)


def test_one_resampling_equals_kornias_affine_warp():
    x = _images()
    b = x.shape[0]
    centre = torch.tensor([[23.5, 23.5]]).expand(b, 2)
    matrix = KG.get_rotation_matrix2d(centre, torch.linspace(-40, 40, b), torch.ones(b, 2))
    matrix[..., 2] += torch.linspace(-3, 3, b)[:, None]
    expected = KG.warp_affine(x, matrix, (48, 48), mode="bilinear", padding_mode="reflection", align_corners=True)
    torch.testing.assert_close(resample(x, matrix), expected, atol=1e-5, rtol=0)


def test_motion_blur_draws_a_kernel_size_per_image_each_a_line_of_that_size():
    torch.manual_seed(0)
    sizes = (3, 5, 7)
    kernels, k = line_kernels(600, sizes, *line_table(sizes))
    counts = torch.bincount(k)[list(sizes)]
    assert (counts > 150).all(), counts  # each odd size about a third, within one batch
    for kernel, size in zip(kernels, k, strict=True):
        pad = (7 - int(size)) // 2
        inside = kernel[pad:7 - pad, pad:7 - pad]
        assert inside.sum() == pytest.approx(1) and kernel.sum() == pytest.approx(1)  # nothing outside its size
        assert (kernel > 0).sum() >= 2  # a line, never a point: a vertical line's ends differ


def test_cutout_erases_up_to_eight_holes_of_eight_pixels_per_image():
    x = torch.rand(200, 1, 32, 32) * 0.9 + 0.1  # no zero pixels before erasing
    torch.manual_seed(0)
    erased = cutout(x, 1.0, 8, 8, 8) == 0
    count = erased.sum((1, 2, 3))
    assert (count > 0).all() and (count <= 8 * 64).all()
    # every erased pixel lies in an 8 x 8 square that is all erased (squares clipped at the bottom and
    # right edges count as whole): full[i, j] says the square whose top-left is (i, j) is
    F = torch.nn.functional
    full = F.avg_pool2d(F.pad(erased.float(), (0, 7, 0, 7), value=1.0), 8, stride=1) == 1
    covered = F.max_pool2d(F.pad(full.float(), (7, 0, 7, 0)), 8, stride=1) > 0
    assert not (erased & ~covered).any()


def test_the_old_shift_and_rotate_keys_are_refused_with_the_new_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [{epochs: 1, augment: {shift: {p: 0.5}}}]\n")
    with pytest.raises(RecipeError, match="shift_scale_rotate"):
        load_recipe(recipe)


def test_brightness_contrast_is_albumentations_affine_map():
    x = torch.full((4, 3, 8, 8), 0.5)
    torch.manual_seed(0)
    out = brightness_contrast(x, 1.0, 0.2, 0.2)
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))  # one alpha/beta per image
    assert ((per_image[:, 0] >= 0.5 * 0.8 - 0.2) & (per_image[:, 0] <= 0.5 * 1.2 + 0.2)).all()


def test_gauss_noise_std_follows_the_variance_range():
    x = torch.full((64, 3, 32, 32), 0.5)
    torch.manual_seed(0)
    std = (gauss_noise(x, 1.0, (10.0, 50.0)) - x).flatten(1).std(1) * 255
    assert std.min() > 10 ** 0.5 * 0.9 and std.max() < 50 ** 0.5 * 1.1


def test_iso_noise_only_brightens_and_keeps_gray_images_nearly_gray():
    x = _images(n=8)
    torch.manual_seed(0)
    out = iso_noise(x, 1.0, (0.01, 0.05), (0.1, 0.5))
    lum = lambda t: t.amax(1) + t.amin(1)  # noqa: E731  (2 x HLS lightness)
    assert (lum(out) >= lum(x) - 1e-4).all()
    gray = x.mean(1, keepdim=True).expand_as(x).contiguous()
    out_gray = iso_noise(gray, 1.0, (0.01, 0.05), (0.1, 0.5))
    assert (out_gray.amax(1) - out_gray.amin(1)).max() < 1e-4  # no saturation: hue noise cannot colour


@pytest.mark.gpu
def test_cuda_batched_ops_stay_in_range_and_match_in_distribution():
    x = _images(n=64)
    for op in OPS:
        cfg = _only(op, 1.0)
        with seeded(0, CPU):
            cpu = HeavyAugmentation(cfg)(x)
        with seeded(0, torch.device("cuda")):
            gpu = HeavyAugmentation(cfg).cuda()(x.cuda()).cpu()
        assert gpu.min() >= 0 and gpu.max() <= 1
        # different RNG streams per device: compare the mean absolute change, over 64 images
        assert abs((gpu - x).abs().mean() - (cpu - x).abs().mean()) < 0.02, op


@pytest.mark.gpu
def test_the_whole_augmentation_runs_on_cuda_without_leaving_the_device():
    x = _images(n=16).cuda()
    with seeded(0, torch.device("cuda")):
        out = HeavyAugmentation(AugmentConfig()).cuda()(x)
    assert out.is_cuda and out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_the_compiled_augmentation_is_one_graph_seeded_in_range_and_distributed_as_eager():
    """How training runs it on CUDA (model.compile), here with inductor on the CPU (~30 s): the
    noise is drawn inside the fused kernels, so values differ from eager, but not the distribution."""
    import torch._dynamo

    torch._dynamo.reset()
    augment = HeavyAugmentation(AugmentConfig())
    compiled = augment.compiled()  # fullgraph: a graph break would raise
    x = _images(n=64, size=32)
    outs = []
    for seed in (0, 0, 1):
        with seeded(seed, CPU):
            outs.append(compiled(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert outs[0].min() >= 0 and outs[0].max() <= 1
    eager = []
    for seed in (0, 1):
        with seeded(seed, CPU):
            eager.append((augment(x) - x).abs().mean())
    changed = torch.stack([(o - x).abs().mean() for o in outs[1:]])
    assert abs(changed.mean() - torch.stack(eager).mean()) < 0.03, (changed, eager)
