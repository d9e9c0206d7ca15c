"""Layer freezing: the paper's 'first half' on timm models, and frozen means frozen — weights and
batch-norm statistics bit-identical after training steps, the rest moving."""

import pytest
import timm
import torch
import torch.nn as nn

from fasttricks.models import freezing
from fasttricks.models.factory import create_model
from fasttricks.recipes import ModelConfig, OptimizerConfig, StageConfig
from fasttricks.training.step import create_optimizer, training_step


def test_first_half_of_efficientnet_b1_is_what_the_2022_winner_froze():
    net = timm.create_model("efficientnet_b1", num_classes=10)
    expected = ["conv_stem", "bn1"] + [f"blocks.{s}.{b}" for s, n in enumerate([2, 3, 3, 3]) for b in range(n)]
    assert freezing.first_half(net) == expected
    assert expected[-1] == "blocks.3.2" and len(expected) - 2 == 11  # 11 of 23 blocks


def test_first_half_of_a_resnet_and_a_deep_stem():
    assert freezing.first_half(timm.create_model("resnet50"))[-1] == "layer3.0"  # 8 of 16 bottlenecks
    stem, blocks = freezing.block_names(timm.create_model("test_resnet"))
    assert stem[0] == "conv1" and blocks[0] == "layer1.0"  # conv1 is a Sequential of plain layers


def test_unknown_prefixes_are_a_clear_error():
    net = timm.create_model("test_efficientnet")
    with pytest.raises(ValueError, match="no module named blockz.0"):
        freezing.resolve(net, ["blockz.0"])
    with pytest.raises(ValueError, match="first_half"):
        freezing.first_half(nn.Linear(2, 2))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_frozen_weights_and_batch_norm_statistics_do_not_move(weight_decay):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    frozen = freezing.resolve(model.net, "first_half")
    freezing.freeze(model.net, frozen)
    model.train()
    bn = model.net.bn1
    assert not bn.training  # frozen batch norms stay in eval mode through model.train()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.5, weight_decay=weight_decay))
    optimizer = create_optimizer(model, stage.optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    for i in range(3):
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        training_step(model, x, torch.arange(8) % 10, optimizer, nn.CrossEntropyLoss(), stage)
    after = model.net.state_dict()
    is_frozen = {k: any(k == p or k.startswith(p + ".") for p in frozen) for k in after}
    assert any(is_frozen.values()) and not all(is_frozen.values())
    for k in after:
        if is_frozen[k]:
            assert torch.equal(after[k], before[k]), f"frozen {k} moved"
    moved = [k for k in after
             if not is_frozen[k] and after[k].is_floating_point() and not torch.equal(after[k], before[k])]
    assert "classifier.weight" in moved and any("running_mean" in k for k in moved)


def test_unfreeze_restores_training():
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    freezing.freeze(model.net, ["bn1"])
    freezing.unfreeze(model.net)
    model.train()
    assert model.net.bn1.training and all(p.requires_grad for p in model.parameters())


def test_unfreeze_restores_what_the_model_kept_fixed():
    net = timm.create_model("test_efficientnet", num_classes=10)
    net.conv_head.weight.requires_grad_(False)  # a parameter the model keeps fixed on its own
    freezing.freeze(net, ["conv_stem", "conv_head"])
    assert not net.conv_stem.weight.requires_grad
    freezing.unfreeze(net)
    assert net.conv_stem.weight.requires_grad and not net.conv_head.weight.requires_grad


def test_a_vits_pos_embed_and_cls_token_get_no_weight_decay():
    model = create_model(ModelConfig(arch="test_vit"), 10)
    optimizer = create_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.net.pos_embed) in no_decay and id(model.net.cls_token) in no_decay
    assert id(model.net.blocks[0].attn.qkv.weight) not in no_decay


@pytest.mark.parametrize("arch,stem,half_ends_with,count", [
    ("efficientnet_b1", ["conv_stem", "bn1"], ["blocks.3.1", "blocks.3.2"], 23),
    ("resnet50", ["conv1", "bn1", "act1", "maxpool"], ["layer2.3", "layer3.0"], 16),
    # ConvNeXt-T's 3-3-9-3 blocks: a stage's downsampling layer goes with its first block
    ("convnext_tiny", ["stem"], ["stages.2.downsample", "stages.2.blocks.0", "stages.2.blocks.1",
                                 "stages.2.blocks.2"], 18),
    # a ViT's stem: the patch embedding, and the position embedding and class token (parameters)
    ("vit_base_patch16_224", ["patch_embed", "pos_drop", "patch_drop", "norm_pre", "cls_token", "pos_embed"],
     ["blocks.4", "blocks.5"], 12),
])
def test_first_half_is_the_stem_and_half_of_timms_own_blocks_for_each_family(arch, stem, half_ends_with, count):
    with torch.device("meta"):  # the structure alone
        net = timm.create_model(arch, num_classes=10)
    found_stem, groups = freezing.blocks(net)
    assert found_stem == stem and len(groups) == count
    half = freezing.first_half(net)
    assert half[:len(stem)] == stem and half[-len(half_ends_with):] == half_ends_with
    assert freezing.resolve(net, "first_half") == half


@pytest.mark.parametrize("arch", ["test_convnext", "test_vit"])
def test_frozen_layer_norms_embeddings_and_blocks_do_not_move_in_a_layer_norm_network(arch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch), 10)
    frozen = freezing.resolve(model.net, "first_half")
    freezing.freeze(model.net, frozen)
    norms = [n for n, m in model.net.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
             and any(n == p or n.startswith(p + ".") for p in frozen)]
    assert norms  # frozen parts hold LayerNorms
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    stage = StageConfig(optimizer=OptimizerConfig(name="sgd", lr=0.5, weight_decay=1e-4))
    optimizer = create_optimizer(model, stage.optimizer)
    for i in range(2):
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        training_step(model, x, torch.arange(4), optimizer, nn.CrossEntropyLoss(), stage)
    after = model.net.state_dict()
    is_frozen = {k: any(k == p or k.startswith(p + ".") for p in frozen) for k in after}
    if arch == "test_vit":
        assert is_frozen["pos_embed"] and is_frozen["cls_token"]
    assert all(torch.equal(after[k], before[k]) for k in after if is_frozen[k])
    assert any(not torch.equal(after[k], before[k]) for k in after if not is_frozen[k])
    freezing.unfreeze(model.net)
    assert all(p.requires_grad for p in model.net.parameters())
