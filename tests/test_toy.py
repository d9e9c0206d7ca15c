import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from fasttricks.data import toy
from fasttricks.data.toy import CLASSES, ToyOptions, make_toy, render

TINY = ToyOptions(seed=3, size=32, train_per_class=2, val_per_class=1, clutter_per_class=1)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = make_toy(tmp_path / "a", TINY, show_progress=False)
    b = make_toy(tmp_path / "b", TINY, show_progress=False)
    c = make_toy(tmp_path / "c", ToyOptions(**{**TINY.__dict__, "seed": 4}), show_progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_is_an_imagefolder_per_split_with_balanced_classes(tmp_path):
    out = make_toy(tmp_path / "t", TINY, show_progress=False)
    assert json.loads((out / "toy.json").read_text())["classes"] == CLASSES == sorted(CLASSES)
    for split, per_class in TINY.counts().items():
        for name in CLASSES:
            files = list((out / split / name).glob("*.png"))
            assert len(files) == per_class
            assert Image.open(files[0]).size == (32, 32)


def _object_fraction(split: str, n: int = 40) -> float:
    opts = ToyOptions(size=64)
    return float(np.mean([render(i % len(CLASSES), split, i, opts, with_mask=True)[1].mean() for i in range(n)]))


def test_clutter_objects_are_smaller_than_centred_training_objects():
    train, clutter = _object_fraction("train"), _object_fraction("val_clutter")
    assert 0.15 < train < 0.6  # large and centred, as photographers frame objects
    assert clutter < 0.6 * train  # radius 0.2-0.3 against 0.3-0.42 of the side: about half the area


def test_existing_output_needs_overwrite_and_failures_leave_nothing(tmp_path, monkeypatch):
    out = make_toy(tmp_path / "t", TINY, show_progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_toy(out, TINY, show_progress=False)

    calls = {"n": 0}

    def failing_render(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(toy, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        make_toy(tmp_path / "broken", TINY, show_progress=False)
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary folder left behind


def test_the_photo_background_variant_changes_only_the_training_backgrounds_it_draws():
    plain, variant = ToyOptions(size=32), ToyOptions(size=32, train_photo_backgrounds=0.5)
    assert plain.key() == ("toy-seed0-size32-train_per_class160-val_per_class30-clutter_per_class100"
                           "-clutter_radius0.2-0.3")
    assert variant.key() != plain.key()
    for split in ("val", "val_clutter"):
        assert all(np.array_equal(render(i % 10, split, i, plain), render(i % 10, split, i, variant))
                   for i in range(10))
    changed = [not np.array_equal(render(i % 10, "train", i, plain), render(i % 10, "train", i, variant))
               for i in range(60)]
    assert 15 < sum(changed) < 45  # about half
    # the object is still drawn where the mask says, on whatever background
    img, mask = render(3, "train", next(i for i, c in enumerate(changed) if c), variant, with_mask=True)
    assert img.shape == (32, 32, 3) and mask.max() > 0.9


def test_the_first_sets_smaller_clutter_is_a_variant_with_its_own_cache_and_the_same_train_and_val():
    big, small = ToyOptions(size=32), ToyOptions(size=32, clutter_radius=(0.11, 0.2))
    assert small.key().endswith("-clutter_radius0.11-0.2") and big.key().endswith("-clutter_radius0.2-0.3")
    for split in ("train", "val"):
        assert np.array_equal(render(1, split, 5, small), render(1, split, 5, big))
    area = lambda opts: np.mean([render(1, "val_clutter", i, opts, with_mask=True)[1].mean()  # noqa: E731
                                 for i in range(20)])
    assert area(big) > 2 * area(small)  # (0.25 / 0.155)² ≈ 2.6 on average
