"""Which layers a Brain-Score commitment offers, generated from the network.

"Many layers", as the 2022 winning entries committed: every stage and every block (timm's own
blocks, models/freezing.py), the convolutions (a transformer's attention and MLP) inside the
blocks of the second half (where V4 and IT layers are usually found), then the pooled features
before the classifier, which are also the behavioural read-out (the penultimate layer): the
global pool of a CNN, ConvNeXt's normalised pool (``head.drop``), a ViT's pooled token (``head_drop``).
"""

from __future__ import annotations

from torch import nn

from fasttricks.errors import InputError
from fasttricks.models.freezing import block_names

READOUTS = ("global_pool", "head.drop", "head_drop")  # EfficientNet and ResNet; ConvNeXt; ViT
READOUT = READOUTS[0]
# The 2022 winning entries' region map for EfficientNet-B1 (their region_layer_map/*.json).
WINNING_MAP_2022 = {"V1": "blocks.3.0", "V2": "blocks.3", "V4": "blocks.4.0.conv_pwl", "IT": "blocks.6.0.conv_pwl"}
# The same map as relative depth (block index / last block index) over EfficientNet-B1's 23 blocks:
# blocks.3.0 is block 8, blocks.3 ends with block 11, blocks.4.0 is 12 and blocks.6.0 is 21.
RELATIVE_DEPTH = {"V1": 8 / 22, "V2": 11 / 22, "V4": 12 / 22, "IT": 21 / 22}
# EfficientNet, ResNet, ConvNeXt (conv_dw, mlp), ViT (attn, mlp)
_SUB_LAYERS = ("conv_pw", "conv_dw", "conv_pwl", "conv1", "conv2", "conv3", "attn", "mlp")


def readout_layer(net: nn.Module) -> str:
    """The module whose output is the pooled features the classifier reads."""
    modules = dict(net.named_modules())
    found = next((name for name in READOUTS if name in modules), None)
    if found is None:
        raise InputError(f"{type(net).__name__} has none of the read-out modules {', '.join(READOUTS)} "
                         "(the pooled features before the classifier)")
    return found


def _stage_of(block: str) -> str:
    stage = block.rsplit(".", 1)[0]
    return stage.rsplit(".", 1)[0] if stage.endswith(".blocks") else stage  # ConvNeXt: stages.k, not its .blocks


def candidate_layers(net: nn.Module) -> list[str]:
    """Stages, blocks and second-half block convolutions in forward order, then the read-out."""
    modules = dict(net.named_modules())
    readout = readout_layer(net)
    _, blocks = block_names(net)
    second_half = set(blocks[len(blocks) // 2:])
    stage_of = {b: _stage_of(b) for b in blocks}
    layers = []
    for i, block in enumerate(blocks):
        layers.append(block)
        if block in second_half:
            layers += [f"{block}.{s}" for s in _SUB_LAYERS if f"{block}.{s}" in modules]
        stage = stage_of[block]
        last_of_stage = i + 1 == len(blocks) or stage_of[blocks[i + 1]] != stage
        # a stage's output is its last block's; a container of every block (a flat trunk) adds nothing
        if last_of_stage and len(set(stage_of.values())) > 1:
            layers.append(stage)
    return layers + [readout]


def default_region_map(arch: str, net: nn.Module) -> tuple[dict[str, str], str]:
    """(region → layer, how it was chosen). EfficientNet-B1 (either padding) gets the 2022 winning
    entry's map; any other network the block at the same relative depth as that map's layers."""
    layers = candidate_layers(net)
    if "efficientnet_b1" in arch and all(layer in layers for layer in WINNING_MAP_2022.values()):
        return dict(WINNING_MAP_2022), "the 2022 winning entry's map for EfficientNet-B1"
    _, blocks = block_names(net)
    mapping = {region: blocks[round(depth * (len(blocks) - 1))] for region, depth in RELATIVE_DEPTH.items()}
    return mapping, ("the blocks at the relative depths of the 2022 winning map (V1 8/22, V2 11/22, V4 12/22, "
                     f"IT 21/22 of the {len(blocks)} blocks)")
