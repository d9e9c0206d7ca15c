"""Layer freezing: the paper fine-tunes for behaviour with "the first half of the layers frozen,
batch-norm statistics included", keeping the V1-like early layers of the adversarial stage.

"First half" is defined on the network's blocks in forward order, where a block is what timm itself
calls one: the fine-grained groups of the model's ``group_matcher`` (the groups timm's layer-wise
learning-rate decay uses), which every timm family defines. The stem (every top-level module before
the first block, and what the matcher calls the stem: a ViT's patch embedding, position embedding
and class token) plus the first ⌊N/2⌋ of the N blocks are frozen. EfficientNet: ``blocks.<stage>.<block>``,
for EfficientNet-B1 ``conv_stem``, ``bn1`` and ``blocks.0.0`` … ``blocks.3.2``, 11 of 23 blocks,
what the 2022 winning submission froze; ResNet: ``layer<k>.<block>``; ConvNeXt:
``stages.<k>.blocks.<j>``, a stage's downsampling layer belonging to its first block (2 of 4
stages would be no "half of the layers" for ConvNeXt's 3-3-9-3 or 3-3-27-3 stages); ViT:
``blocks.<k>``. A network without a matcher falls back to ``nn.Sequential`` stages of blocks.

A frozen module's parameters stop requiring gradients (the optimizer leaves them out), and each of
its batch norms is put in eval mode and kept there through later ``model.train()`` calls, so its
running statistics never move; a LayerNorm or GroupNorm has no statistics, only its frozen
parameters. A name may also be a parameter (a ViT's ``pos_embed`` and ``cls_token`` are not modules).
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence

from torch import nn

from fasttricks.errors import InputError

_NORMS = (nn.modules.batchnorm._BatchNorm,)
_BEFORE = "_fasttricks_requires_grad"
_HEAD = 99999  # timm's matchers put the final norm after the last block with this ordinal


def blocks(net: nn.Module) -> tuple[list[str], list[list[str]]]:
    """(stem names, blocks), each block the names of its modules (or parameters), in forward order."""
    if not hasattr(net, "group_matcher"):
        stem, names = _sequential_blocks(net)
        return stem, [[n] for n in names]
    return _matcher_blocks(net)


def block_names(net: nn.Module) -> tuple[list[str], list[str]]:
    """(stem names, one name per block: its last module, whose output is the block's)."""
    stem, groups = blocks(net)
    return stem, [group[-1] for group in groups]


def _matcher_blocks(net: nn.Module) -> tuple[list[str], list[list[str]]]:
    # By hand over timm's matcher spec: timm's group_with_matcher returns renumbered groups only,
    # without which of them are the stem and the head.
    spec = net.group_matcher(coarse=False)
    stem_re = re.compile(spec["stem"])
    specs = spec["blocks"] if isinstance(spec["blocks"], (list, tuple)) else [(spec["blocks"], None)]
    compiled = [(re.compile(regex), suffix) for regex, suffix in specs]
    stem, groups = [], {}
    for name, _ in net.named_parameters():
        if m := stem_re.match(name):
            stem.append(m.group(0))
            continue
        for regex, suffix in compiled:
            if m := regex.match(name):
                if suffix is None or suffix[0] != _HEAD:
                    key = tuple(int(g) for g in m.groups()) + tuple(suffix or ())
                    groups.setdefault(key, []).append(m.group(0))
                break
    if not groups:
        raise InputError(f"{type(net).__name__}: timm's group_matcher names no blocks; freeze it by module-name "
                         "prefixes instead of first_half")
    top = [name for name, _ in net.named_children()]
    first = next(i for i, name in enumerate(top) if any(g[0].split(".")[0] == name for g in groups.values()))
    known = {name for name, _ in net.named_modules()} | {name for name, _ in net.named_parameters()}
    stem = list(dict.fromkeys(top[:first] + [s for s in stem if s in known]))
    return stem, [list(dict.fromkeys(n for n in groups[k] if n in known)) for k in sorted(groups)]


def _sequential_blocks(net: nn.Module) -> tuple[list[str], list[str]]:
    """Stem modules and blocks of a network of ``nn.Sequential`` stages (no timm matcher)."""
    stem, names = [], []
    for name, child in net.named_children():
        # a Sequential of plain layers (a deep stem: conv, bn, act...) is not a stage of blocks
        if isinstance(child, nn.Sequential) and any(len(list(c.children())) for c in child):
            if all(isinstance(c, nn.Sequential) for c in child.children()):
                names += [f"{name}.{i}.{j}" for i, stage in enumerate(child) for j in range(len(stage))]
            else:
                names += [f"{name}.{i}" for i in range(len(child))]
        elif not names:
            stem.append(name)
    if not names:
        raise InputError(f"{type(net).__name__} has no nn.Sequential stages of blocks; "
                         "freeze it by module-name prefixes instead of first_half")
    return stem, names


def first_half(net: nn.Module) -> list[str]:
    stem, groups = blocks(net)
    return stem + [name for group in groups[: len(groups) // 2] for name in group]


def resolve(net: nn.Module, spec: str | Sequence[str] | None) -> list[str]:
    """Module-name prefixes that ``spec`` ('first_half', a list of prefixes, or None) freezes."""
    if spec is None:
        return []
    if spec == "first_half":
        return first_half(net)
    names = {n for n, _ in net.named_modules()} | {n for n, _ in net.named_parameters()}
    unknown = [p for p in spec if p not in names]
    if unknown:
        raise InputError(f"freeze: no module named {', '.join(unknown)} in {type(net).__name__} "
                         f"(top-level modules: {', '.join(n for n, _ in net.named_children())})")
    return list(spec)


def freeze(net: nn.Module, prefixes: Sequence[str]) -> None:
    """Freeze the modules named by ``prefixes`` (and everything inside them)."""
    modules, parameters = dict(net.named_modules()), dict(net.named_parameters())
    for prefix in prefixes:
        if prefix in parameters and prefix not in modules:  # a ViT's pos_embed, cls_token
            _freeze_parameters([parameters[prefix]])
            continue
        module = modules[prefix]
        _freeze_parameters(module.parameters())
        for m in module.modules():
            if isinstance(m, _NORMS):
                _keep_in_eval(m)


def _freeze_parameters(params) -> None:
    for p in params:
        if not hasattr(p, _BEFORE):  # what unfreeze restores (a model may keep some parameters fixed)
            setattr(p, _BEFORE, p.requires_grad)
        p.requires_grad_(False)


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
