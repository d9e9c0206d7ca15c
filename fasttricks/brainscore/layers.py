"""Which layers a Brain-Score commitment offers, generated from the network.

"Many layers", as the 2022 winning entries committed: every stage and every block, the
convolutions inside the blocks of the second half (where V4 and IT layers are usually found),
then the global pool, which is also the behavioural read-out (the penultimate layer).
"""

from __future__ import annotations

from torch import nn

from fasttricks.freezing import block_names

READOUT = "global_pool"
_SUB_LAYERS = ("conv_pw", "conv_dw", "conv_pwl", "conv1", "conv2", "conv3")  # EfficientNet, ResNet


def candidate_layers(net: nn.Module) -> list[str]:
    """Stages, blocks and second-half block convolutions in forward order, then the read-out."""
    modules = dict(net.named_modules())
    if READOUT not in modules:
        raise ValueError(f"{type(net).__name__} has no {READOUT!r} module for the behavioural read-out")
    _, blocks = block_names(net)
    second_half = set(blocks[len(blocks) // 2:])
    stage_of = {b: b.rsplit(".", 1)[0] for b in blocks}
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
    return layers + [READOUT]
