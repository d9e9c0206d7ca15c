"""Accuracy of a model on a validation beton, and ``fasttricks eval`` on a saved model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from fasttricks.checkpoint import read_info
from fasttricks.data.loader import beton_paths, create_val_loader, iterate_val
from fasttricks.models import Classifier, create_model
from fasttricks.recipes import ModelConfig


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1 and top-5 (in %) and the image count. Counts stay on the device until the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, device=device, dtype=torch.long)
    seen = 0
    for images, labels in batches:
        with autocast(device):
            logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        seen += labels.shape[0]
    model.train(was_training)
    c1, c5 = correct.tolist()
    return {"top1": 100.0 * c1 / max(seen, 1), "top5": 100.0 * c5 / max(seen, 1), "images": seen}


def evaluate_splits(model: nn.Module, data_dir: str | os.PathLike, *, resize: int, crop: int,
                    batch_size: int, device: torch.device, workers: int = 0) -> dict[str, dict]:
    """Accuracy on ``val`` and, when present, ``val_clutter``."""
    results = {}
    for split, path in beton_paths(data_dir).items():
        if split == "train":
            continue
        loader = create_val_loader(path, batch_size=batch_size, resize=resize, crop=crop,
                                   device=device, workers=workers)
        results[split] = accuracy(model, iterate_val(loader), device)
    return results


def load_classifier(weights: str | os.PathLike, device: torch.device) -> tuple[Classifier, dict]:
    """A saved fasttricks model (``final.safetensors`` or a checkpoint's ``model.safetensors``)."""
    info = read_info(weights)
    model = create_model(ModelConfig(arch=info["arch"], weights=str(weights)), info["num_classes"])
    return model.to(device).to(memory_format=torch.channels_last), info


def eval_command(weights: Path, data_dir: Path, *, crop: int | None, resize: int | None, batch_size: int,
                 device: torch.device, workers: int = 0) -> dict:
    """``fasttricks eval``: with only ``crop`` given, resize keeps the model's crop/resize ratio."""
    model, info = load_classifier(weights, device)
    crop = crop or info["val_crop"]
    resize = resize or round(crop * info["val_resize"] / info["val_crop"])
    results = evaluate_splits(model, data_dir, resize=resize, crop=crop, batch_size=batch_size,
                              device=device, workers=workers)
    return {"weights": str(weights), "resize": resize, "crop": crop, **results}
