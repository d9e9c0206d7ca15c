"""Accuracy of a model on a validation beton, and ``fasttricks eval`` on a saved model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from fasttricks.data.loader import ValLoader, beton_paths
from fasttricks.evaluation.memory import Chunks
from fasttricks.models.factory import Classifier, classifier_for
from fasttricks.models.weights import check_data_fits, read_info, weights_file
from fasttricks.recipes import AdversarialConfig, AutoAttackConfig
from fasttricks.robust.autoattack import chosen_images
from fasttricks.robust.autoattack import describe as describe_autoattack
from fasttricks.robust.autoattack import robust_top1 as autoattack_top1
from fasttricks.robust.pgd import image_generators, pgd
from fasttricks.runtime.devices import autocast
from fasttricks.runtime.distributed import sum_over_ranks


def accuracy(model: nn.Module, batches: Iterable, device: torch.device,
             attack: AdversarialConfig | None = None, chunks: Chunks | None = None) -> dict[str, float]:
    """Top-1 and top-5 (in %) and the image count; with ``attack``, on the PGD versions of the
    images (attacked and evaluated in fp32, the evaluation standard). Counts stay on the device
    until the end, then are summed over ranks: under several processes each evaluates its shard.
    Each image's random start comes from a generator seeded by its index in the split (a
    ``ValLoader`` knows them; for other batches, the position in the sequence), never the global
    RNG: the same weights give the same robust accuracy at any batch size and on any number of
    processes. The attack runs on chunks of each batch that fit the device's memory (``chunks``,
    evaluation/memory.py), which changes no result."""
    chunks = chunks or Chunks()
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.long)  # top-1 hits, top-5 hits, images
    order = batches.sample_indices() if hasattr(batches, "sample_indices") else None
    offset = 0
    for images, labels in batches:
        n = labels.shape[0]
        if attack is not None:
            ids = order[offset:offset + n] if order is not None else range(offset, offset + n)
            images = chunks.run(lambda x, y, i: pgd(model, x, y, attack, use_autocast=False,
                                                    generator=image_generators(device, i)), images, labels, list(ids))
        offset += n
        with torch.no_grad(), autocast(device) if attack is None else nullcontext():
            logits = model(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), counts.new_tensor(labels.shape[0])])
    model.train(was_training)
    c1, c5, seen = sum_over_ranks(counts).tolist()
    return {"top1": 100.0 * c1 / max(seen, 1), "top5": 100.0 * c5 / max(seen, 1), "images": seen}


def val_loaders(data_dir: str | os.PathLike, *, resize: int, crop: int, batch_size: int, device: torch.device,
                workers: int = 0, distributed: bool = False) -> dict[str, ValLoader]:
    """A loader for ``val`` and, when present, ``val_clutter``; with ``distributed``, this rank's shard."""
    return {split: ValLoader(path, batch_size=batch_size, resize=resize, crop=crop, device=device, workers=workers,
                             distributed=distributed)
            for split, path in beton_paths(data_dir).items() if split != "train"}


def evaluate_splits(model: nn.Module, loaders: dict[str, ValLoader], device: torch.device,
                    attack: AdversarialConfig | None = None, autoattack: AutoAttackConfig | None = None,
                    num_classes: int | None = None, attack_images: int | None = None) -> dict[str, dict]:
    """Accuracy on each split; with ``attack`` also robust accuracy under PGD (``robust_top1``),
    with ``autoattack`` under AutoAttack (``autoattack_top1``, needs ``num_classes``). The robust
    figures are taken on a seeded subset of ``attack_images`` (``autoattack.images``) per split
    when given; clean accuracy always on the whole split."""
    results = {}
    for split, loader in loaders.items():
        results[split] = accuracy(model, loader, device)
        if attack is not None:
            chosen = chosen_images(len(loader.loader.indices), attack_images)
            subset = loader if len(chosen) == len(loader.loader.indices) else loader.subset(chosen)
            chunks = Chunks()
            robust = accuracy(model, subset, device, attack, chunks)
            results[split].update(robust_top1=robust["top1"], robust_top5=robust["top5"],
                                  robust_images=robust["images"], robust_chunks=chunks.picked)
        if autoattack is not None and split in autoattack.splits:
            robust = autoattack_top1(model, loader, autoattack, device, num_classes)
            results[split].update(autoattack_top1=robust["top1"], autoattack_images=robust["images"])
    return results


def as_row(results: dict[str, dict]) -> dict:
    """``evaluate_splits``' results as flat metrics: ``val_top1``, ``val_top5``, and
    ``val_robust_top1`` when there was an attack (likewise for every split)."""
    row = {}
    for split, m in results.items():
        row[f"{split}_top1"], row[f"{split}_top5"] = m["top1"], m["top5"]
        for key in ("robust_top1", "autoattack_top1"):
            if key in m:
                row[f"{split}_{key}"] = m[key]
    return row


def load_classifier(weights: str | os.PathLike, device: torch.device) -> tuple[Classifier, dict]:
    """A saved fasttricks model: ``final.safetensors``, a checkpoint's ``model.safetensors``, or the
    run or checkpoint folder that holds it."""
    weights = weights_file(weights)
    info = read_info(weights)
    model = classifier_for(info, weights)
    return model.to(device).to(memory_format=torch.channels_last), info


def eval_command(weights: Path, data_dir: Path, *, crop: int | None, resize: int | None, batch_size: int,
                 device: torch.device, workers: int = 0,
                 attack: AdversarialConfig | AutoAttackConfig | None = None, attack_images: int | None = None) -> dict:
    """``fasttricks eval``: with only ``crop`` given, resize keeps the model's crop/resize ratio.
    ``attack``: PGD or AutoAttack, on a seeded subset of ``attack_images`` per split when given."""
    model, info = load_classifier(weights, device)
    check_data_fits(info, weights, data_dir)
    crop = crop or info["val_crop"]
    resize = resize or round(crop * info["val_resize"] / info["val_crop"])
    loaders = val_loaders(data_dir, resize=resize, crop=crop, batch_size=batch_size, device=device, workers=workers)
    auto = None
    if isinstance(attack, AutoAttackConfig):  # every split present, as for PGD
        auto = attack.model_copy(update={"images": attack_images, "splits": list(loaders)})
    pgd_attack = attack if isinstance(attack, AdversarialConfig) else None
    results = evaluate_splits(model, loaders, device, pgd_attack, auto, num_classes=info["num_classes"],
                              attack_images=attack_images)
    report = {"weights": str(weights), "resize": resize, "crop": crop, **results}
    if auto is not None:
        report["attack"] = describe_autoattack(auto)
    elif attack is not None:
        report["attack"] = attack.model_dump()
    return report
