"""One class list for a whole data folder (fasttricks/data/classes.py, build-beton --classes-from):
a split that lacks a class keeps every id, a folder whose splits disagree and a model trained on
other classes are refused, and a parent folder given as a split is caught."""

import json
import shutil

import pytest
from test_beton import RAW, _folder, _read_all
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.classes import ClassListError, data_classes
from fasttricks.data.crops import CentreCropDecoder
from fasttricks.data.manifest import BuildError


def _betons(root, val_classes, classes_from=True):
    _folder(root / "train", classes=("a", "b", "c"))
    _folder(root / "val", classes=val_classes)
    train = build_beton(root / "train", root / "train.beton", RAW, show_progress=False)
    opts = BetonOptions(write_mode="raw", workers=2, classes_from=str(root / "train.beton") if classes_from else None)
    val = build_beton(root / "val", root / "val.beton", opts, show_progress=False)
    return train, val


def test_a_split_lacking_a_class_keeps_the_train_splits_ids(tmp_path):
    train, val = _betons(tmp_path, val_classes=("a", "c"))
    assert val.classes == train.classes == ["a", "b", "c"]
    _, labels = _read_all(tmp_path / "val.beton", CentreCropDecoder(16, 16))
    assert sorted(set(labels.tolist())) == [0, 2]  # 'c' is still 2, not shifted to 1
    assert data_classes(tmp_path) == ["a", "b", "c"]


def test_without_classes_from_the_shifted_ids_are_refused_naming_the_class(tmp_path):
    _betons(tmp_path, val_classes=("a", "c"), classes_from=False)
    with pytest.raises(ClassListError, match=r"val.beton does not use train.beton's class ids: it lacks 1 class.*: b"):
        data_classes(tmp_path)
    for command in (["train", "--recipe", "baseline"], ["fixres", str(tmp_path / "x.safetensors")]):
        result = CliRunner().invoke(app, [*command, "--data", str(tmp_path)])
        assert result.exit_code == 2 and "--classes-from" in result.output, result.output


def test_a_class_folder_unknown_to_the_list_is_an_error_naming_it(tmp_path):
    _folder(tmp_path / "train", classes=("a", "b"))
    _folder(tmp_path / "val", classes=("a", "zebra"))
    build_beton(tmp_path / "train", tmp_path / "train.beton", RAW, show_progress=False)
    opts = BetonOptions(write_mode="raw", classes_from=str(tmp_path / "train.beton"))
    with pytest.raises(BuildError, match="zebra"):
        build_beton(tmp_path / "val", tmp_path / "val.beton", opts, show_progress=False)
    assert not (tmp_path / "val.beton").exists()


def test_the_parent_folder_of_the_splits_is_refused_with_the_right_folder(tmp_path):
    _folder(tmp_path / "mydata" / "train", classes=("a", "b"))
    _folder(tmp_path / "mydata" / "val", classes=("a", "b"))
    result = CliRunner().invoke(app, ["build-beton", str(tmp_path / "mydata"), str(tmp_path / "o.beton")])
    assert result.exit_code == 2 and "split folders (train, val)" in result.output
    assert str(tmp_path / "mydata" / "train") in result.output and not (tmp_path / "o.beton").exists()


def test_a_model_is_not_evaluated_on_data_of_other_classes(toy_data, tmp_path):
    from fasttricks.models.factory import create_model
    from fasttricks.models.weights import save_weights
    from fasttricks.recipes import ModelConfig

    net = create_model(ModelConfig(arch="test_efficientnet"), 3).net
    info = {"arch": "test_efficientnet", "num_classes": 3, "classes": ["x", "y", "z"], "mean": [0.5] * 3,
            "std": [0.5] * 3, "val_resize": 48, "val_crop": 40}
    save_weights(tmp_path / "m.safetensors", net, info)
    for command in ("eval", "fixres"):
        result = CliRunner().invoke(app, [command, str(tmp_path / "m.safetensors"), "--data", str(toy_data)])
        assert result.exit_code == 2, result.output
        assert "trained on 3 classes" in result.output and "x, y, z" in result.output and "arrow" in result.output
    assert not (tmp_path / "fixres.csv").exists()


def test_image_folders_given_as_data_print_the_commands_that_compile_them(tmp_path):
    for split in ("train", "val"):
        _folder(tmp_path / "d" / split, classes=("a",))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "holds image folders, not betons" in result.output
    assert f"fasttricks build-beton {tmp_path / 'd' / 'train'} {tmp_path / 'd' / 'train'}.beton\n" in result.output
    assert (f"fasttricks build-beton {tmp_path / 'd' / 'val'} {tmp_path / 'd' / 'val'}.beton --classes-from "
            f"{tmp_path / 'd' / 'train.beton'}") in result.output


def test_make_toy_output_is_a_data_folder(tmp_path):
    out = tmp_path / "toy"
    result = CliRunner().invoke(app, ["make-toy", str(out), "--size", "16", "--train-per-class", "3",
                                      "--val-per-class", "1", "--clutter-per-class", "1"])
    assert result.exit_code == 0, result.output
    assert data_classes(out)[:2] == json.loads((out / "toy.json").read_text())["classes"][:2]
    assert {p.name for p in out.glob("*.beton")} == {"train.beton", "val.beton", "val_clutter.beton"}
    shutil.rmtree(out)
