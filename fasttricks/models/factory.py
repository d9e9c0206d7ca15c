"""Models: timm networks by name, wrapped so that they take [0, 1] images and normalise
themselves (the attack and the augmentations work in pixel space), and safe weight loading."""

from __future__ import annotations

import os

import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from fasttricks.errors import InputError
from fasttricks.models.weights import WeightsError, _check_architecture, load_weights, weights_file
from fasttricks.recipes import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """``net((x - mean) / std)`` for x in [0, 1]. The mean and std are buffers that are not saved:
    the saved state is the timm network's own, loadable by plain timm."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def no_weight_decay(self) -> set[str]:
        """timm's list (a ViT's pos_embed, cls_token...) under our prefix: the optimizer factory asks
        the model it is given, and it is given this wrapper."""
        inner = getattr(self.net, "no_weight_decay", None)
        return {f"net.{name}" for name in inner()} if callable(inner) else set()


def create_model(cfg: ModelConfig, num_classes: int, mean=None, std=None) -> Classifier:
    """The timm model ``cfg.arch`` with ``num_classes`` outputs: random, from timm's pretrained
    weights (``cfg.pretrained``) or from ``cfg.weights``. It normalises with ``mean``/``std`` when
    given (a trained model's recorded ones), else with its pretrained config's."""
    kwargs = {k: v for k, v in (("drop_rate", cfg.drop_rate), ("drop_path_rate", cfg.drop_path_rate))
              if v is not None}
    tagged = cfg.pretrained_name()
    try:
        net = with_any_image_size(lambda **size: _pretrained(cfg, tagged, num_classes, {**kwargs, **size})
                                   if tagged else timm.create_model(cfg.arch, pretrained=False,
                                                                    num_classes=num_classes, **kwargs, **size))
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise InputError(f"model.arch / model.pretrained: timm has no model {tagged or cfg.arch!r} "
                             f"(see timm.list_models() and timm.list_pretrained())") from None
        raise
    if cfg.weights and not tagged:  # with a tag, timm has read the file already
        load_weights(net, cfg.weights)
    pretrained = getattr(net, "pretrained_cfg", {}) or {}
    return Classifier(net, mean or pretrained.get("mean", IMAGENET_MEAN), std or pretrained.get("std", IMAGENET_STD))


def with_any_image_size(create):
    """``create(dynamic_img_size=True)`` for networks with a position embedding (ViT and kin): it
    is then resized to each input's grid, as training at several resolutions and the FixRes sweep
    need (the weights keep the grid they were made at). A network that takes no such argument (every
    CNN) raises TypeError before building anything, and is created as it is."""
    try:
        return create(dynamic_img_size=True)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return create()


def patch_size(net: nn.Module) -> int:
    """The side of a patch for a network that cuts its input into patches (an input side must be a
    multiple of it), 1 for any other."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else 1


class PretrainedUnavailable(WeightsError):
    """Pretrained weights that are neither in the Hugging Face cache nor downloadable."""


def _pretrained(cfg: ModelConfig, name: str, num_classes: int, kwargs: dict) -> nn.Module:
    """timm's own loading of the tagged model ``name``: the hub and its cache, or the local file
    ``cfg.weights`` through ``pretrained_cfg_overlay`` (timm then adapts the classifier and any
    stem change as it would for downloaded weights, and reads the file with weights_only=True)."""
    overlay = None
    if cfg.weights:
        path = weights_file(cfg.weights)
        _check_architecture(cfg.arch, path)
        overlay = {"file": str(path)}
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except LocalEntryNotFoundError:
        raise PretrainedUnavailable(
            f"model.pretrained: the weights of {name} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and the hub cannot be reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}); download them once "
            f"where there is a network, or give the file: --set model.weights=FILE") from None


def classifier_for(info: dict, weights: str | os.PathLike | None = None) -> Classifier:
    """The model a trained run describes (``info`` from its weights), normalising as it was trained."""
    return create_model(ModelConfig(arch=info["arch"], weights=str(weights) if weights else None),
                        info["num_classes"], info.get("mean"), info.get("std"))


