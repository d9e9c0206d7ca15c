"""Weight averaging: the mean of checkpoints, and batch-norm statistics recomputed for the batch
norms that are not frozen (frozen ones keep theirs)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from fasttricks.cli import app
from fasttricks.models.averaging import average_files, average_state_dicts, recalibrate_batch_norm
from fasttricks.models.factory import create_model
from fasttricks.models.weights import WeightsError, read_info, save_weights
from fasttricks.recipes import ModelConfig


def _net(seed):
    torch.manual_seed(seed)
    return create_model(ModelConfig(arch="test_efficientnet"), 10).net


def test_average_of_two_states_is_their_mean_and_integer_buffers_come_from_the_last():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    b = {k: (v + 7 if not v.is_floating_point() else v) for k, v in b.items()}
    avg = average_state_dicts([a, b])
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(v, b[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_averaging_files_of_different_architectures_is_refused_naming_them(tmp_path):
    info = {"arch": "test_efficientnet", "num_classes": 10}
    save_weights(tmp_path / "a.safetensors", _net(0), info)
    torch.manual_seed(0)
    other = create_model(ModelConfig(arch="test_resnet"), 10).net
    save_weights(tmp_path / "b.safetensors", other, {**info, "arch": "test_resnet"})
    with pytest.raises(WeightsError, match="b.safetensors.*not the same architecture"):
        average_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                  nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x)


def test_recalibration_recomputes_free_batch_norms_as_the_batch_average_and_keeps_frozen_ones():
    torch.manual_seed(0)
    model = _Tiny()
    frozen_bn, free_bn = model.body[1], model.body[4]
    for bn in (frozen_bn, free_bn):
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(2, 5)
    before = frozen_bn.running_mean.clone(), frozen_bn.running_var.clone()
    batches = [torch.rand(8, 3, 5, 5) + i for i in range(3)]
    seen = recalibrate_batch_norm(model, model, batches, frozen=["body.0", "body.1"])
    assert seen == 24
    assert torch.equal(frozen_bn.running_mean, before[0]) and torch.equal(frozen_bn.running_var, before[1])
    # what the free batch norm saw: its input, with the frozen one normalising by its own statistics
    with torch.no_grad():
        model.eval()
        inputs = [model.body[:4](x) for x in batches]
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(free_bn.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(free_bn.running_var, variances, rtol=1e-5, atol=1e-6)
    assert free_bn.momentum == 0.1 and not model.training


def test_average_command_writes_the_mean_and_recomputes_statistics_on_the_data(toy_data, tmp_path):
    torch.manual_seed(0)
    info = {"arch": "test_efficientnet", "num_classes": 10, "val_crop": 40, "val_resize": 48,
            "frozen": ["conv_stem", "bn1"]}
    a, b = _net(0), _net(1)
    save_weights(tmp_path / "a.safetensors", a, info)
    save_weights(tmp_path / "b.safetensors", b, info)
    runner = CliRunner()
    result = runner.invoke(app, ["average", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--out", str(tmp_path / "avg.safetensors"), "--data", str(toy_data),
                                 "--bn-batches", "2", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert "recomputed on 64 images" in result.output
    avg, sa, sb = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("avg", "a", "b"))
    torch.testing.assert_close(avg["conv_stem.weight"], (sa["conv_stem.weight"] + sb["conv_stem.weight"]) / 2)
    torch.testing.assert_close(avg["bn1.running_mean"], (sa["bn1.running_mean"] + sb["bn1.running_mean"]) / 2)
    mean_of_stats = (sa["bn2.running_mean"] + sb["bn2.running_mean"]) / 2
    assert not torch.allclose(avg["bn2.running_mean"], mean_of_stats)  # recomputed, not averaged
    assert read_info(tmp_path / "avg.safetensors")["averaged_from"][0].endswith("a.safetensors")
    again = runner.invoke(app, ["average", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                "--out", str(tmp_path / "avg.safetensors")])
    assert again.exit_code == 2 and "exists" in again.output
    one = runner.invoke(app, ["average", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "x.safetensors")])
    assert one.exit_code == 2 and "at least two" in one.output and not (tmp_path / "x.safetensors").exists()


def test_averaging_a_layer_norm_network_recomputes_no_statistics_and_reads_no_batch():
    """A ViT has no batch norm: recalibration has nothing to recompute, and draws no batch for it."""
    from fasttricks.models.averaging import recalibrate_batch_norm
    from fasttricks.models.factory import create_model
    from fasttricks.recipes import ModelConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_vit"), 10)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    drawn = []

    def batches():
        drawn.append(1)
        yield torch.rand(2, 3, 32, 32)

    assert recalibrate_batch_norm(model, model.net, batches()) == 0 and drawn == []
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
