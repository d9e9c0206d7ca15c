"""CutMix and Foreground-CutMix mean what they say: whose pixels end up where, and with which label."""

import pytest
import torch

from fasttricks.augment.mixing import cutmix, foreground_cutmix, mix, one_hot
from fasttricks.recipes import MixingConfig

FG = MixingConfig(kind="foreground_cutmix", p=1.0)
CM = MixingConfig(kind="cutmix", p=1.0)


def _batch(n=8, size=24, classes=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % classes


def _find(patch, image):
    """Offset where ``patch`` occurs exactly in ``image`` (C x H x W), or None."""
    _, h, w = patch.shape
    for top in range(image.shape[1] - h + 1):
        for left in range(image.shape[2] - w + 1):
            if torch.allclose(image[:, top:top + h, left:left + w], patch, atol=1e-5):
                return top, left
    return None


def test_foreground_cutmix_pastes_a_part_of_i_on_its_partner_and_keeps_is_label():
    torch.manual_seed(0)
    x, y = _batch()
    out, targets, mask = foreground_cutmix(x, one_hot(y, 8), FG)
    assert torch.equal(targets, one_hot(y, 8))  # the pasted part's source label, alone
    for i in range(len(x)):
        m = mask[i, 0]
        background = x[(i - 1) % len(x)]
        assert torch.equal(out[i][:, ~m], background[:, ~m])  # outside the box: the background image
        rows, cols = m.nonzero(as_tuple=True)
        patch = out[i][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert m.sum() == patch.shape[1] * patch.shape[2]  # a box
        assert _find(patch, x[i]) is not None  # inside: an exact part of image i
    area = mask.flatten(1).float().mean(1)
    assert (area >= 0.08).all() and (area <= 0.55).all()  # fg_area (0.1, 0.5), rounded to pixels


def test_foreground_cutmix_rescales_the_part_when_asked():
    torch.manual_seed(0)
    x, y = _batch()
    small = foreground_cutmix(x, one_hot(y, 8), FG.model_copy(update={"fg_resize": (0.5, 0.5)}))[2]
    same = foreground_cutmix(x, one_hot(y, 8), FG)[2]
    assert small.flatten(1).float().mean() < same.flatten(1).float().mean() * 0.5


def test_cutmix_targets_are_the_box_area_fractions():
    torch.manual_seed(0)
    x, y = _batch()
    out, targets, mask = cutmix(x, one_hot(y, 8), CM)
    frac = mask.flatten(1).float().mean(1)
    partner = y.roll(1)
    for i in range(len(x)):
        assert targets[i, y[i]] == pytest.approx(1 - frac[i].item(), abs=1e-6)
        assert targets[i, partner[i]] == pytest.approx(frac[i].item(), abs=1e-6)
        m = mask[i, 0]
        assert torch.equal(out[i][:, m], x[(i - 1) % len(x)][:, m])
        assert torch.equal(out[i][:, ~m], x[i][:, ~m])
    assert torch.allclose(targets.sum(1), torch.ones(len(x)))


@pytest.mark.parametrize("kind", ["cutmix", "foreground_cutmix"])
def test_probability_zero_and_per_batch_coins(kind):
    x, y = _batch()
    torch.manual_seed(0)
    out, targets, mask = mix(x, y, 8, MixingConfig(kind=kind, p=0.0))
    assert torch.equal(out, x) and torch.equal(targets, one_hot(y, 8)) and not mask.any()


def test_per_batch_coin_mixes_all_images_or_none():
    x, y = _batch()
    outcomes = set()
    for seed in range(10):
        torch.manual_seed(seed)
        touched = mix(x, y, 8, MixingConfig(kind="foreground_cutmix", p=0.5, per_sample=False))[2].flatten(1).any(1)
        assert touched.all() or not touched.any()  # (every pasted part has at least one pixel)
        outcomes.add(bool(touched.all()))
    assert outcomes == {True, False}


def test_channels_last_batches_stay_usable():
    x, y = _batch()
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = mix(x, y, 8, FG)[0]
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kind", ["cutmix", "foreground_cutmix"])
def test_mixing_keeps_a_channels_last_batch_channels_last(kind):
    images = torch.rand(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out, _, _ = mix(images, torch.arange(6) % 3, 3, MixingConfig(kind=kind, p=1.0))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
