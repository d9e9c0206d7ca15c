import json
import shutil

import numpy as np
import pytest
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor
from PIL import Image
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.data import beton
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.manifest import BuildError

RAW = BetonOptions(write_mode="raw", workers=2)


_LOADERS = []  # kept alive: collecting FFCV's compiled decoders makes numba print a KeyError (crops.py)


def _read_all(path, decoder):
    loader = Loader(str(path), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    _LOADERS.append(loader)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=False)
    return torch.cat(images).numpy(), torch.cat(labels).flatten().numpy()


def _folder(root, classes=("b_dog", "a_cat", "c_eel"), per_class=3, size=(20, 16)):
    """Images whose pixels encode (class, index), so a round trip can be checked exactly."""
    rng = np.random.default_rng(0)
    expected = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
            expected[f"{name}/{i}.png"] = arr
    return expected


def test_round_trip_every_image_reads_back_with_folder_order_labels(tmp_path):
    expected = _folder(tmp_path / "src")
    m = build_beton(tmp_path / "src", tmp_path / "out.beton", RAW, show_progress=False)
    assert m.classes == ["a_cat", "b_dog", "c_eel"]  # sorted names give the label ids
    assert m.images == 9 and m.skipped == []
    images, labels = _read_all(tmp_path / "out.beton", SimpleRGBImageDecoder())
    for img, label, rel in zip(images, labels, m.files, strict=True):
        assert m.classes[label] == rel.split("/")[0]
        np.testing.assert_array_equal(img, expected[rel])
    manifest = json.loads((tmp_path / "out.beton.json").read_text())
    assert manifest["images"] == 9 and manifest["options"]["write_mode"] == "raw"
    assert manifest["source"] == str((tmp_path / "src").resolve())


def _dirty_folder(root):
    good = root / "good"
    bad = root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(good / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(good / "palette.gif")
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)])).save(good / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(good / "sixteen.png")
    Image.fromarray(rgb[:1, :1]).save(good / "one_pixel.png")
    Image.fromarray(rgb).save(good / "odd.JPEG", quality=90)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image at all")
    full = bad / "full.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full)
    (bad / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    (bad / "notes.txt").write_text("ignored: not an image extension")


def test_dirty_folder_converts_what_it_can_and_skips_the_rest_with_reasons(tmp_path):
    _dirty_folder(tmp_path / "src")
    m = build_beton(tmp_path / "src", tmp_path / "out.beton", RAW, show_progress=False)
    assert sorted(m.files) == sorted(f"good/{n}" for n in
                                     ["gray.png", "cmyk.jpg", "palette.gif", "alpha.png", "sixteen.png",
                                      "one_pixel.png", "odd.JPEG"])
    reasons = {s["file"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg"}
    assert reasons["bad/empty.jpg"] == "empty file"
    assert reasons["bad/text.jpg"] == "not an image"
    assert "truncated" in reasons["bad/truncated.jpg"]
    images, labels = _read_all(tmp_path / "out.beton", CenterCropRGBImageDecoder((8, 8), ratio=1.0))
    assert len(images) == 7 and set(labels) == {1}  # 'bad' is class 0 and kept none
    gray = images[m.files.index("good/gray.png")]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = np.asarray(beton.to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]


def test_limit_keeps_a_seeded_subset_and_max_res_downscales(tmp_path):
    _folder(tmp_path / "src", per_class=10, size=(64, 32))
    m = build_beton(tmp_path / "src", tmp_path / "a.beton", BetonOptions(write_mode="raw", limit=7, max_res=16),
                    show_progress=False)
    again = build_beton(tmp_path / "src", tmp_path / "b.beton", BetonOptions(write_mode="raw", limit=7),
                        show_progress=False)
    assert m.images == 7 and m.files == again.files
    from ffcv.reader import Reader

    meta = Reader(str(tmp_path / "a.beton")).metadata
    assert meta["f0"]["width"].max() == 16 and meta["f0"]["height"].max() == 8  # fields are f0, f1


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_bad_sources_are_clear_errors(tmp_path, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "no_images":
        (src / "cls").mkdir()
        (src / "cls" / "readme.txt").write_text("x")
    with pytest.raises(BuildError, match=str(src)):
        build_beton(src, tmp_path / "out.beton", RAW, show_progress=False)
    assert not (tmp_path / "out.beton").exists()


def test_all_files_bad_is_an_error_not_an_empty_beton(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(BuildError, match="no readable image"):
        build_beton(tmp_path / "src", tmp_path / "out.beton", RAW, show_progress=False)


def test_existing_output_needs_overwrite(tmp_path):
    _folder(tmp_path / "src")
    out = tmp_path / "out.beton"
    out.write_bytes(b"precious")
    with pytest.raises(BuildError, match="--overwrite"):
        build_beton(tmp_path / "src", out, RAW, show_progress=False)
    assert out.read_bytes() == b"precious"
    build_beton(tmp_path / "src", out, RAW, overwrite=True, show_progress=False)
    assert out.stat().st_size > 100


def test_a_file_that_breaks_during_the_write_fails_the_build_without_hanging_or_leaving_output(
        tmp_path, monkeypatch):
    _folder(tmp_path / "src")
    (tmp_path / "src" / "a_cat" / "0.png").write_bytes(b"garbage now")
    monkeypatch.setattr(beton, "check_image", lambda path, max_res=None: None)  # the check saw it intact
    with pytest.raises(BuildError, match="a_cat/0.png"):
        build_beton(tmp_path / "src", tmp_path / "out.beton", RAW, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no beton, no temporary, no manifest


def test_invalid_options_name_the_option(tmp_path):
    with pytest.raises(BuildError, match="--write-mode"):
        build_beton(tmp_path, tmp_path / "o.beton", BetonOptions(write_mode="png"), show_progress=False)
    with pytest.raises(BuildError, match="--jpeg-quality"):
        build_beton(tmp_path, tmp_path / "o.beton", BetonOptions(jpeg_quality=0), show_progress=False)


def test_cli_reports_errors_in_one_line_with_nonzero_exit(tmp_path):
    result = CliRunner().invoke(app, ["build-beton", str(tmp_path / "nope"), str(tmp_path / "o.beton")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def _cli_build(tmp_path, *options):
    """build-beton from the command line on nine 32x32 images: (CLI result, manifest)."""
    _folder(tmp_path / "src", size=(32, 32))
    result = CliRunner().invoke(app, ["build-beton", str(tmp_path / "src"), str(tmp_path / "o.beton"), *options])
    assert result.exit_code == 0, result.output
    return result, json.loads((tmp_path / "o.beton.json").read_text())


def test_cli_builds_with_jpeg_options(tmp_path):
    _, manifest = _cli_build(tmp_path, "--write-mode", "jpg", "--jpeg-quality", "80", "--workers", "1")
    assert manifest["images"] == 9 and manifest["options"]["jpeg_quality"] == 80


def test_the_check_runs_the_writes_conversion_so_a_file_it_fails_on_is_skipped(tmp_path, monkeypatch):
    _folder(tmp_path / "src", classes=("a", "b"), per_class=2)
    real = beton.to_rgb

    def fails_on_a1(img):
        if getattr(img, "filename", "").endswith("a/1.png"):
            raise ValueError("conversion from XYZ to RGB not supported")
        return real(img)

    monkeypatch.setattr(beton, "to_rgb", fails_on_a1)
    m = build_beton(tmp_path / "src", tmp_path / "o.beton", RAW, show_progress=False)
    assert m.images == 3 and m.skipped == [{"file": "a/1.png", "reason": "unreadable: ValueError: conversion "
                                                                       "from XYZ to RGB not supported"}]


def test_a_side_over_ffcvs_uint16_is_skipped_unless_max_res_brings_it_under(tmp_path):
    _folder(tmp_path / "src", classes=("a",), per_class=1)
    Image.new("RGB", (70000, 200)).save(tmp_path / "src" / "a" / "wide.png")
    m = build_beton(tmp_path / "src", tmp_path / "o.beton", RAW, show_progress=False)
    assert m.images == 1 and "FFCV stores at most 65535" in m.skipped[0]["reason"]
    m = build_beton(tmp_path / "src", tmp_path / "o.beton", BetonOptions(write_mode="raw", workers=2, max_res=512),
                    overwrite=True, show_progress=False)
    assert m.images == 2 and not m.skipped
    Image.new("RGB", (70000, 20)).save(tmp_path / "src" / "a" / "thread.png")  # 512 x 0.15 px after --max-res
    m = build_beton(tmp_path / "src", tmp_path / "o.beton", BetonOptions(write_mode="raw", workers=2, max_res=512),
                    overwrite=True, show_progress=False)
    assert m.images == 2 and "less than one pixel thick" in m.skipped[0]["reason"]


def test_smart_mode_stores_large_images_as_jpeg_and_small_ones_raw(tmp_path):
    from ffcv.reader import Reader

    _folder(tmp_path / "src", classes=("small",), per_class=2, size=(16, 16))
    _folder(tmp_path / "src2", classes=("large",), per_class=2, size=(64, 64))
    shutil.move(tmp_path / "src2" / "large", tmp_path / "src" / "large")
    build_beton(tmp_path / "src", tmp_path / "o.beton", BetonOptions(write_mode="smart", workers=1,
                                                                     smart_threshold=32 * 32 * 3), show_progress=False)
    modes = Reader(str(tmp_path / "o.beton")).metadata["f0"]["mode"].tolist()
    assert modes == [0, 0, 1, 1]  # FFCV's image modes: 0 jpg, 1 raw; 'large' sorts first


def test_a_limited_build_extrapolates_the_size_of_the_whole_folder(tmp_path):
    result, manifest = _cli_build(tmp_path, "--write-mode", "raw", "--limit", "3", "--workers", "1")
    assert manifest["beton_bytes"] == (tmp_path / "o.beton").stat().st_size and manifest["source_images"] == 9
    assert "all 9 images at these settings: about" in result.output


def test_the_write_shows_one_rich_bar_and_no_tqdm_bar_of_ffcvs(tmp_path):
    import ffcv.writer

    _folder(tmp_path / "src", size=(16, 16))
    original = ffcv.writer.tqdm
    result = CliRunner().invoke(app, ["build-beton", str(tmp_path / "src"), str(tmp_path / "o.beton"),
                                      "--write-mode", "raw", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "writing o.beton" in result.output and "it/s]" not in result.output  # tqdm's signature
    assert ffcv.writer.tqdm is original  # put back after the write


def _overlapping_samples(path, hits: list[tuple[int, int]]) -> set[int]:
    """The samples whose metadata row or allocated bytes overlap one of the byte ranges ``hits``,
    worked out from FFCV's own reader (what a damaged range can change)."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    reader = Reader(str(path))
    row = reader.metadata.dtype.itemsize
    first_row = HeaderType.itemsize + reader.field_descriptors.nbytes
    touched = set()
    for start, end in hits:
        for i in range(reader.num_samples):
            if start < first_row + (i + 1) * row and end > first_row + i * row:
                touched.add(i)
        for sample, ptr, size in reader.alloc_table[["sample_id", "ptr", "size"]].tolist():
            if start < ptr + size and end > ptr:
                touched.add(int(sample))
    return touched


def test_random_overwrites_are_found_by_verify_beton_and_stop_training_in_one_line(toy_data, tmp_path):
    from fasttricks.data.checksums import damaged

    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    result = CliRunner().invoke(app, ["verify-beton", str(data)])
    assert result.exit_code == 0 and "all 400 images match their checksums" in " ".join(result.output.split())
    # 400 random 16-byte overwrites inside the train beton, its size unchanged
    path = data / "train.beton"
    size = path.stat().st_size
    rng = np.random.default_rng(7)
    hits = [(int(s), int(s) + 16) for s in rng.integers(4096, size - 16, 400)]
    touched = _overlapping_samples(path, hits)
    with open(path, "r+b") as f:
        for start, _ in hits:
            f.seek(start)
            f.write(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size and touched  # some images were hit (the rest fell in FFCV's free pages)
    assert set(damaged(path)) == touched  # exactly the images whose bytes changed
    result = CliRunner().invoke(app, ["verify-beton", str(path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{path}: image {min(touched)} (" in text and "damaged" in text
    # train checks a seeded sample (all 400 here) before any step, and writes nothing
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--override", "overrides/toy"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{path}: image" in text and "no longer match" in text and not out.exists()
