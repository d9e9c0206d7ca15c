"""Models: timm networks by name, wrapped so that they take [0, 1] images and normalise
themselves (the attack and the augmentations work in pixel space), and safe weight loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fasttricks.errors import InputError, UserError
from fasttricks.progress import console
from fasttricks.recipes import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(UserError, ValueError):
    """A weights file that cannot be loaded into the model; the message says why."""


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
        net = _pretrained(cfg, tagged, num_classes, kwargs) if tagged else \
            timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise InputError(f"model.arch / model.pretrained: timm has no model {tagged or cfg.arch!r} "
                             f"(see timm.list_models() and timm.list_pretrained())") from None
        raise
    if cfg.weights and not tagged:  # with a tag, timm has read the file already
        load_weights(net, cfg.weights)
    pretrained = getattr(net, "pretrained_cfg", {}) or {}
    return Classifier(net, mean or pretrained.get("mean", IMAGENET_MEAN), std or pretrained.get("std", IMAGENET_STD))


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


def weights_file(path: str | os.PathLike) -> Path:
    """The weights a path stands for: a run folder means its ``final.safetensors``, a checkpoint
    folder its ``model.safetensors``; a file is itself. Every command that takes weights reads
    them through here, so ``eval runs/x`` and ``--set model.weights=runs/x`` both work."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "final.safetensors", path / "model.safetensors"):
            if candidate.is_file():
                return candidate
        raise WeightsError(f"{path} holds neither final.safetensors (a finished run) nor model.safetensors "
                           f"(a checkpoint folder)")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch checkpoint read with
    ``weights_only=True`` (never an arbitrary unpickle). Wrappers ``state_dict``/``model`` and
    ``module.`` prefixes (DataParallel/DDP) are removed; MadryLab robustness checkpoints are
    recognised by their ``module.model.`` keys."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is not a readable safetensors file ({e}); a half-written or foreign "
                               f"file?") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path} cannot be read as a torch checkpoint with weights_only=True "
                               f"(only tensors and plain containers are accepted): {e}") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a mapping of names to tensors")
    if any(k.startswith("module.model.") for k in state):
        return _from_robustness(state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _from_robustness(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MadryLab ``robustness`` checkpoint holds the network twice (``module.model.*`` and
    ``module.attacker.model.*``) and its normaliser; keep the network once, under its own names.
    Our model normalises with the timm architecture's mean/std, which for the ImageNet models
    robustness trains are the same ImageNet statistics as its normaliser's."""
    return {k.removeprefix("module.model."): v for k, v in state.items() if k.startswith("module.model.")}


def recorded_architecture(path: str | os.PathLike) -> str | None:
    """The timm architecture a weights file says it holds: our safetensors metadata, or the
    ``config.json`` that timm's Hugging Face repositories keep beside their weights (a file in
    the hub cache). None when it says nothing."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("fasttricks")
            if meta:
                return json.loads(meta).get("arch")
        except Exception:  # unreadable files are reported by read_state_dict, with their reason
            return None
    config = path.parent / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("architecture")
        except (OSError, ValueError):
            return None
    return None


def _check_architecture(own: str | None, path: str | os.PathLike) -> None:
    """Same keys and shapes do not make the same network: timm's ``tf_`` EfficientNets use TF
    "same" padding and batch-norm eps 1e-3, and the other variants load their weights without a
    complaint and compute something else. Weights that name their architecture must match."""
    recorded = recorded_architecture(path)
    if recorded and own and recorded != own:
        raise WeightsError(f"{path} holds {recorded} weights, but the model is {own}: the tensors would load "
                           f"and compute something else (padding, normalisation). Set model.arch={recorded}")


def load_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into the timm network ``net``. The classifier is skipped when its shape
    differs (fine-tuning to other classes); any other mismatch is an error listing the first ones,
    and so are weights recorded as another architecture."""
    _check_architecture((getattr(net, "pretrained_cfg", None) or {}).get("architecture"), path)
    state = read_state_dict(path)
    own = net.state_dict()
    classifier = _classifier_prefix(net)
    if classifier:
        dropped = [k for k in state if k.startswith(classifier + ".") and k in own and own[k].shape != state[k].shape]
        if dropped:
            console.print(f"[yellow]{path}: its classifier ({state[dropped[0]].shape[0]} outputs) does not fit this "
                          f"model's {own[dropped[0]].shape[0]} classes and is not loaded: the classifier starts from "
                          f"random weights (fine-tuning to other classes)", soft_wrap=True)  # (paths stay whole)
        for k in dropped:
            del state[k]
    missing = [k for k in own if k not in state and not (classifier and k.startswith(classifier + "."))]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                 if keys]
        raise WeightsError(f"{path} does not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(state, strict=False)


def _classifier_prefix(net: nn.Module) -> str | None:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) else None
