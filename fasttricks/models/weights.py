"""Weights files: which file a path stands for, safe reading (safetensors, or torch with
``weights_only=True``), loading into a timm network with its architecture checked, and the
``info`` (architecture, classes, frozen layers, test size) a file carries in its metadata."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fasttricks.atomic import atomic_path
from fasttricks.errors import UserError
from fasttricks.progress import console


class WeightsError(UserError, ValueError):
    """A weights file that cannot be loaded into the model; the message says why."""


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


class WriteFault(UserError, OSError):
    """A file could not be written (a full disk, a quota, an I/O error); what was there is kept."""


@contextmanager
def writing(path: Path):
    """Turn the ways a write fails (OSError, safetensors' and torch.save's own errors, which wrap
    the system's message) into one ``WriteFault`` naming ``path``."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, WriteFault) or (isinstance(e, RuntimeError) and "writ" not in str(e).lower()):
            raise  # a RuntimeError that is not about writing is a bug: its traceback is wanted
        raise WriteFault(f"could not write {path}: {str(e).strip()[:300]}") from None


def save_weights(path: str | os.PathLike, net: nn.Module, info: dict) -> None:
    """The network's tensors with ``info`` (JSON) in the safetensors metadata, atomically."""
    with writing(Path(path)):
        write_weights(path, net, info)


def write_weights(path: str | os.PathLike, net: nn.Module, info: dict) -> None:
    """``save_weights`` without its ``WriteFault`` wrapping, for a caller that wraps a larger write."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"fasttricks": json.dumps(info)})


def read_info(path: str | os.PathLike) -> dict:
    """The ``info`` saved with ``save_weights``."""
    path = weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise WeightsError(f"{path} is not a safetensors file: {e}") from None
    if "fasttricks" not in meta:
        raise WeightsError(f"{path} was not written by fasttricks (no model description in its metadata)")
    return json.loads(meta["fasttricks"])


def update_info(path: str | os.PathLike, changes: dict) -> dict:
    """Rewrite a weights file's ``info`` with ``changes`` merged in (atomically); returns it."""
    info = {**read_info(path), **changes}
    with atomic_path(path) as tmp:
        save_file(load_file(str(path)), str(tmp), metadata={"fasttricks": json.dumps(info)})
    return info


def check_data_fits(info: dict, weights: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """The data's class list is the one the model was trained on (older files record only the count)."""
    from fasttricks.data.classes import ClassListError, check_model_classes, data_classes

    classes = data_classes(data_dir)
    if "classes" in info:
        check_model_classes(info["classes"], weights, classes, data_dir)
    elif info["num_classes"] != len(classes):
        raise ClassListError(f"{weights} has {info['num_classes']} classes but {data_dir} has {len(classes)}")
