import pytest
import torch
from safetensors.torch import save_file

from fasttricks.models import IMAGENET_MEAN, IMAGENET_STD, WeightsError, create_model, load_weights
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

    from fasttricks.checkpoint import save_weights

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
