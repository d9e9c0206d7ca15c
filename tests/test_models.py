import pytest
import torch
from safetensors.torch import save_file

from fasttricks.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model
from fasttricks.models.weights import WeightsError, load_weights
from fasttricks.recipes import ModelConfig


def test_model_takes_unit_range_images_and_normalises_them_itself():
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_resnet"), num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    cfg = model.net.pretrained_cfg  # timm's own mean/std for the architecture
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std))
    assert model(x).shape == (2, 7)
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}  # mean/std not saved


def test_unknown_architecture_names_the_option():
    with pytest.raises(ValueError, match="model.arch"):
        create_model(ModelConfig(arch="no_such_net"), 10)


def test_weights_round_trip_and_the_classifier_is_dropped_when_classes_differ(tmp_path, capsys):
    src = create_model(ModelConfig(arch="test_resnet"), 10)
    save_file(src.net.state_dict(), str(tmp_path / "w.safetensors"))
    same = create_model(ModelConfig(arch="test_resnet", weights=str(tmp_path / "w.safetensors")), 10)
    for k, v in src.net.state_dict().items():
        assert torch.equal(v, same.net.state_dict()[k])
    assert "classifier" not in capsys.readouterr().err
    other = create_model(ModelConfig(arch="test_resnet", weights=str(tmp_path / "w.safetensors")), 3)
    assert other.net.get_classifier().out_features == 3
    said = capsys.readouterr().err  # never without a word
    assert "classifier (10 outputs)" in said and "3 classes" in said and "not loaded" in said
    assert torch.equal(other.net.conv1[0].weight, src.net.conv1[0].weight)


def test_torch_checkpoints_load_with_wrappers_and_module_prefixes(tmp_path):
    src = create_model(ModelConfig(arch="test_resnet"), 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.net.state_dict().items()}, "epoch": 3},
               tmp_path / "ckpt.pth")
    dst = create_model(ModelConfig(arch="test_resnet", weights=str(tmp_path / "ckpt.pth")), 10)
    assert torch.equal(dst.net.fc.weight, src.net.fc.weight)


class Payload:  # anything that is not tensors and containers
    pass


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        create_model(ModelConfig(arch="test_resnet", weights=str(tmp_path / "evil.pth")), 10)


def test_mismatched_weights_list_the_first_mismatches(tmp_path):
    other = create_model(ModelConfig(arch="test_efficientnet"), 10)
    save_file(other.net.state_dict(), str(tmp_path / "w.safetensors"))
    net = create_model(ModelConfig(arch="test_resnet"), 10).net
    with pytest.raises(WeightsError) as e:
        load_weights(net, tmp_path / "w.safetensors")
    assert "missing" in str(e.value) and "unexpected" in str(e.value) and "conv1.0.weight" in str(e.value)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(net, tmp_path / "nope.safetensors")


def test_madrylab_robustness_checkpoints_load_without_attacker_and_normaliser(tmp_path):
    src = create_model(ModelConfig(arch="test_resnet"), 10)
    net_state = src.net.state_dict()
    ckpt = {"model": {**{f"module.model.{k}": v for k, v in net_state.items()},
                      **{f"module.attacker.model.{k}": v + 1 for k, v in net_state.items()},
                      "module.normalizer.new_mean": torch.zeros(3, 1, 1),
                      "module.attacker.normalize.new_std": torch.ones(3, 1, 1)},
            "epoch": 89, "schedule": {"last_epoch": 89}}
    torch.save(ckpt, tmp_path / "robust.pt")
    dst = create_model(ModelConfig(arch="test_resnet", weights=str(tmp_path / "robust.pt")), 10)
    for k, v in net_state.items():
        assert torch.equal(dst.net.state_dict()[k], v), k  # the model copy, not the attacker's


def test_weights_recorded_as_another_architecture_are_refused_though_every_tensor_fits(tmp_path):
    """tf_efficientnet_b1 and efficientnet_b1 share every key and shape but not the padding or the
    batch-norm eps: loading one's weights into the other would compute something else silently."""
    import json

    from fasttricks.models.weights import save_weights

    tf = create_model(ModelConfig(arch="tf_efficientnet_b1"), 10)
    assert tf.net.state_dict().keys() == create_model(ModelConfig(arch="efficientnet_b1"), 10).net.state_dict().keys()
    ours = tmp_path / "ours.safetensors"
    save_weights(ours, tf.net, {"arch": "tf_efficientnet_b1", "num_classes": 10})
    hub = tmp_path / "snapshot"  # a timm repository as the Hugging Face cache holds it
    hub.mkdir()
    save_file(tf.net.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architecture": "tf_efficientnet_b1", "num_classes": 10}))
    for path in (ours, hub / "model.safetensors"):
        with pytest.raises(WeightsError, match=r"tf_efficientnet_b1 weights, but the model is efficientnet_b1.*"
                                               r"model.arch=tf_efficientnet_b1"):
            create_model(ModelConfig(arch="efficientnet_b1", weights=str(path)), 10)
        again = create_model(ModelConfig(arch="tf_efficientnet_b1", weights=str(path)), 10)
        assert torch.equal(again.net.conv_stem.weight, tf.net.conv_stem.weight)


def test_pretrained_tag_from_a_local_file_goes_through_timm_and_keeps_the_tags_normalisation(tmp_path):
    """model.pretrained + model.weights: timm's own loader reads the file (pretrained_cfg_overlay),
    drops the 1000-class classifier for the 10 toy classes, and the model normalises as the tag says
    (test_resnet.r160_in1k: mean and std 0.5, not ImageNet's)."""
    import timm

    tag_weights = timm.create_model("test_resnet", num_classes=1000)
    save_file(tag_weights.state_dict(), str(tmp_path / "r160.safetensors"))
    cfg = ModelConfig(arch="test_resnet", pretrained="r160_in1k", weights=str(tmp_path / "r160.safetensors"))
    assert cfg.pretrained_name() == "test_resnet.r160_in1k"
    model = create_model(cfg, 10)
    assert model.net.pretrained_cfg["file"] == str(tmp_path / "r160.safetensors")
    assert torch.equal(model.net.conv1[0].weight, tag_weights.conv1[0].weight)
    assert model.net.get_classifier().out_features == 10
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5] and model.std.flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(WeightsError, match="test_efficientnet weights, but the model is test_resnet"):
        save_file(create_model(ModelConfig(arch="test_efficientnet"), 10).net.state_dict(),
                  str(tmp_path / "snap.safetensors"))
        (tmp_path / "config.json").write_text('{"architecture": "test_efficientnet"}')
        create_model(ModelConfig(arch="test_resnet", pretrained=True, weights=str(tmp_path / "snap.safetensors")), 10)


def test_a_tag_of_another_architecture_is_refused_with_the_fix():
    from fasttricks.recipes import RecipeError, validate

    with pytest.raises(RecipeError, match=r"model.*tag of tf_efficientnet_b1, but model.arch is efficientnet_b1.*"
                                          r"model.arch=tf_efficientnet_b1"):
        validate({"name": "x", "stages": [{}], "model": {"pretrained": "tf_efficientnet_b1.ns_jft_in1k"}})
    assert ModelConfig(arch="tf_efficientnet_b1", pretrained=True).pretrained_name() == "tf_efficientnet_b1"
    with pytest.raises(ValueError, match="timm has no model 'test_resnet.no_such_tag'"):
        create_model(ModelConfig(arch="test_resnet", pretrained="no_such_tag"), 10)


def test_offline_without_the_cached_weights_is_one_line_naming_the_tag_the_cache_and_the_fix(
        tmp_path, monkeypatch, toy_data):
    """HF_HUB_OFFLINE with an empty cache: exit 2 and one line, before any run folder is written."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from fasttricks.cli import app

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "baseline", "--data", str(toy_data), "--out", str(out),
                                      "--set", "model.arch=test_resnet", "--set", "model.pretrained=r160_in1k"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "test_resnet.r160_in1k" in said and str(tmp_path / "hub") in said and "model.weights=FILE" in said
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.rglob("*.safetensors"))
