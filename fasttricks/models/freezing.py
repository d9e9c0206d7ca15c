"""Layer freezing: the paper fine-tunes for behaviour with "the first half of the layers frozen,
batch-norm statistics included", keeping the V1-like early layers of the adversarial stage.

"First half" is defined on the network's blocks in forward order, for any timm model built as
stem modules followed by ``nn.Sequential`` stages of composite blocks (EfficientNet:
``blocks.<stage>.<block>``; ResNet: ``layer<k>.<block>``): the stem (every top-level module
before the first stage) plus the first ⌊N/2⌋ of the N blocks. For EfficientNet-B1 that is ``conv_stem``, ``bn1`` and
``blocks.0.0`` … ``blocks.3.2``, 11 of 23 blocks: what the 2022 winning submission froze.

A frozen module's parameters stop requiring gradients (the optimizer leaves them out), and each of
its batch norms is put in eval mode and kept there through later ``model.train()`` calls, so its
running statistics never move.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

from torch import nn

from fasttricks.errors import InputError

_NORMS = (nn.modules.batchnorm._BatchNorm,)
_BEFORE = "_fasttricks_requires_grad"


def block_names(net: nn.Module) -> tuple[list[str], list[str]]:
    """(stem module names, block names), both in forward (registration) order."""
    stem, blocks = [], []
    for name, child in net.named_children():
        # a Sequential of plain layers (a deep stem: conv, bn, act...) is not a stage of blocks
        if isinstance(child, nn.Sequential) and any(len(list(c.children())) for c in child):
            if all(isinstance(c, nn.Sequential) for c in child.children()):
                blocks += [f"{name}.{i}.{j}" for i, stage in enumerate(child) for j in range(len(stage))]
            else:
                blocks += [f"{name}.{i}" for i in range(len(child))]
        elif not blocks:
            stem.append(name)
    if not blocks:
        raise InputError(f"{type(net).__name__} has no nn.Sequential stages of blocks; "
                         "freeze it by module-name prefixes instead of first_half")
    return stem, blocks


def first_half(net: nn.Module) -> list[str]:
    stem, blocks = block_names(net)
    return stem + blocks[: len(blocks) // 2]


def resolve(net: nn.Module, spec: str | Sequence[str] | None) -> list[str]:
    """Module-name prefixes that ``spec`` ('first_half', a list of prefixes, or None) freezes."""
    if spec is None:
        return []
    if spec == "first_half":
        return first_half(net)
    names = {n for n, _ in net.named_modules()}
    unknown = [p for p in spec if p not in names]
    if unknown:
        raise InputError(f"freeze: no module named {', '.join(unknown)} in {type(net).__name__} "
                         f"(top-level modules: {', '.join(n for n, _ in net.named_children())})")
    return list(spec)


def freeze(net: nn.Module, prefixes: Sequence[str]) -> None:
    """Freeze the modules named by ``prefixes`` (and everything inside them)."""
    modules = dict(net.named_modules())
    for prefix in prefixes:
        module = modules[prefix]
        for p in module.parameters():
            if not hasattr(p, _BEFORE):  # what unfreeze restores (a model may keep some parameters fixed)
                setattr(p, _BEFORE, p.requires_grad)
            p.requires_grad_(False)
        for m in module.modules():
            if isinstance(m, _NORMS):
                _keep_in_eval(m)


def unfreeze(net: nn.Module) -> None:
    """Undo ``freeze``: each parameter gets back the requires_grad it had, not a blanket True."""
    for p in net.parameters():
        if hasattr(p, _BEFORE):
            p.requires_grad_(getattr(p, _BEFORE))
            delattr(p, _BEFORE)
    for m in net.modules():
        if "train" in m.__dict__:
            del m.train


def _keep_in_eval(module: nn.Module) -> None:
    # An instance-level override: the parent's train() reaches it through children(), and the
    # module keeps its class and state-dict keys (timm's FrozenBatchNorm2d would change both).
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()
