"""AugMix on the batch: the batched ops equal a per-image reference (torchvision's functional ops,
PIL's 8-bit semantics) given the same draws; the draws have AugMix's distributions; the JSD loss
sees the clean batch and two views."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from fasttricks.augment.augmix import OPS, AugMix, augmix, draw
from fasttricks.recipes import AugMixConfig, RecipeError, validate
from fasttricks.runtime import syncguard


def images(b=6, h=40, w=48, seed=0):
    """Smooth shapes plus noise, quantised to 8 bits (as decoded JPEGs are)."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([torch.sin(6 * u + c) * torch.cos(4 * v - c) for c in range(3)]) * 0.35 + 0.5
    x = base + 0.15 * torch.rand(b, 3, h, w, generator=g) * torch.rand(b, 3, 1, 1, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def reference_op(img: torch.Tensor, name: str, level: float, sign: float) -> torch.Tensor:
    """One op on one image, written from AugMix's definitions with torchvision's functional ops."""
    h, w = img.shape[-2:]
    bilinear = InterpolationMode.BILINEAR
    if name == "rotate":
        return TF.rotate(img, sign * int(level * 30 / 10), interpolation=bilinear)
    if name in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(sign * level * 0.3 / 10))
        shear = [degrees, 0.0] if name == "shear_x" else [0.0, degrees]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0],
                         interpolation=bilinear)
    if name in ("translate_x", "translate_y"):
        shift = [sign * int(level * w / 3 / 10), 0] if name == "translate_x" else [0, sign * int(level * h / 3 / 10)]
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear)
    if name == "autocontrast":
        return TF.autocontrast(img)
    if name == "solarize":  # PIL's threshold on the 8-bit scale, the image kept in float
        return TF.solarize(img, (256 - int(level * 256 / 10)) / 255)
    as8 = (img * 255).to(torch.uint8)  # PIL's 8-bit levels (truncated, as PIL converts)
    if name == "equalize":
        return TF.equalize(as8).float() / 255
    if name == "posterize":
        return TF.posterize(as8, 4 - int(level * 4 / 10)).float() / 255
    raise AssertionError(name)


def reference_augmix(x: torch.Tensor, d) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        mixture = torch.zeros_like(x[i])
        for k in range(d.op.shape[1]):
            chain = x[i]
            for s in range(int(d.depth[i, k])):
                chain = reference_op(chain, OPS[int(d.op[i, k, s])], float(d.level[i, k, s]), float(d.sign[i, k, s]))
            mixture += float(d.weights[i, k]) * chain
        out.append((1 - float(d.m[i])) * x[i] + float(d.m[i]) * mixture)
    return torch.stack(out)


@pytest.mark.parametrize("first", [0, 4])  # which ops start the chains: pixel ops, geometric ops
def test_batched_augmix_equals_a_per_image_reference_given_the_same_draws(first):
    x = images()
    torch.manual_seed(1)
    cfg = AugMixConfig(severity=10)
    d = draw(x.shape[0], cfg, x.device)
    d.op[:, :, 0] = (torch.arange(x.shape[0]).view(-1, 1) + 2 * torch.arange(3) + first) % len(OPS)  # every op
    d.depth[:, 0] = 1  # one chain of each image is a single op: its result is checked alone below
    batched = augmix(x, d)
    expected = reference_augmix(x, d)
    assert batched.shape == x.shape
    diff = (batched - expected).abs()
    # The two resamplings differ by ~1e-6 (the same maths, other float rounding). Equalize and
    # posterize truncate to 8-bit levels, so a pixel sitting on a level after an integer translation
    # can land one level apart: a wrong op, draw or weight would move whole images by far more.
    assert diff.max() <= 2 / 255
    assert (diff < 1e-4).flatten(1).float().mean(1).min() > 0.8
    single = d.weights.clone()
    single[:, 0], single[:, 1:], d.m[:] = 1.0, 0.0, 1.0  # the output is then chain 0 alone: one op
    d.weights = single
    one_op = augmix(x, d)
    for i in range(x.shape[0]):
        name = OPS[int(d.op[i, 0, 0])]
        ref = reference_op(x[i], name, float(d.level[i, 0, 0]), float(d.sign[i, 0, 0]))
        close = ((one_op[i] - ref).abs() < 1e-4).float().mean()
        assert close > 0.995, (name, close)
        assert not torch.equal(one_op[i], x[i]), name  # every op changes these images at severity 10


def test_draws_follow_augmix_distributions_and_depths():
    torch.manual_seed(0)
    cfg = AugMixConfig(width=3, depth=(1, 3), severity=3, alpha=1.0)
    d = draw(20000, cfg, torch.device("cpu"))
    assert torch.allclose(d.weights.sum(1), torch.ones(20000))
    assert d.weights.mean(0).sub(1 / 3).abs().max() < 0.01  # Dirichlet(1, 1, 1): mean 1/3 each
    assert d.weights[:, 0].var().sub(1 / 18).abs() < 0.003  # its variance (a0 - a)a / (a0^2 (a0 + 1)) = 1/18
    assert abs(d.m.mean() - 0.5) < 0.01 and abs(d.m.var() - 1 / 12) < 0.003  # Beta(1, 1) is uniform
    assert set(d.depth.unique().tolist()) == {1, 2, 3}
    assert d.level.min() >= 0.1 and d.level.max() <= 3
    counts = torch.bincount(d.op.flatten(), minlength=len(OPS)).float()
    assert counts.div(counts.sum()).sub(1 / len(OPS)).abs().max() < 0.01


def test_augmix_is_seeded_in_range_and_never_syncs():
    x = images()
    torch.manual_seed(3)
    a = AugMix(AugMixConfig())(x)
    torch.manual_seed(3)
    with syncguard.no_host_sync():
        b = AugMix(AugMixConfig())(x)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.01
    torch.manual_seed(3)
    jsd = AugMix(AugMixConfig(jsd=True))(x)
    assert jsd.shape[0] == 3 * x.shape[0] and torch.equal(jsd[:6], x)
    assert not torch.equal(jsd[6:12], jsd[12:])  # two independent views


def test_jsd_with_mixing_or_pgd_is_refused_naming_both():
    for clash in ({"mixing": {"kind": "cutmix"}}, {"adversarial": {}}):
        with pytest.raises(RecipeError, match=f"augmix.jsd.*{next(iter(clash))}"):
            validate({"name": "x", "stages": [{"augmix": {"jsd": True}, **clash}]})
    with pytest.raises(RecipeError, match="depth"):
        validate({"name": "x", "stages": [{"augmix": {"depth": [2, 1]}}]})


def test_with_identical_views_the_jsd_loss_is_the_clean_cross_entropy():
    """train's criterion for augmix.jsd: cross-entropy on the clean third plus 12 x the JSD of the
    three predictions, which vanishes when the views agree with the clean batch."""
    from fasttricks.recipes import StageConfig
    from fasttricks.training.step import criterion_for as _criterion

    stage = StageConfig(augmix={"jsd": True}, label_smoothing=0.1)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    loss = _criterion(stage)(torch.cat([logits] * 3), labels)
    assert torch.allclose(loss, ce, atol=1e-5)
    assert _criterion(stage)(torch.cat([logits, logits + torch.randn(4, 5), logits]), labels) > ce + 1e-3


def test_show_augs_draws_an_augmix_stage(toy_data, tmp_path):
    from fasttricks.augment.preview import augment_grid
    from fasttricks.recipes import load_recipe

    recipe = load_recipe("baseline", ["overrides/toy"], ["stages.0.augmix={jsd: true}"])
    out = augment_grid(recipe, toy_data, tmp_path / "augs.png", n=4, device=torch.device("cpu"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
