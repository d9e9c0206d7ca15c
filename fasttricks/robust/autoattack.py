"""Robust accuracy under AutoAttack (Croce & Hein 2020), the attack RobustBench reports, through
torchattacks' ``AutoAttack`` (standard version: APGD-CE, APGD-T, FAB-T, Square, each run on the
images the previous ones did not break).

PGD-k alone overstates a model that masks its gradients, the failure mode of one-step adversarial
training; AutoAttack's Square is gradient-free and its APGD adapts its step, so a masked model
scores what it is worth. What torchattacks' standard version is, recorded with every figure
(``describe``): its APGD-CE, APGD-T and FAB-T run 10 iterations each (Croce & Hein's original
runs 100) and Square 5,000 queries; APGD-T and FAB-T target the 9 classes ranked just below the
true one, as the original does (torchattacks targets ``n_classes - 1`` classes, so we pass at most
10, else an ImageNet model would be attacked towards 999 targets).

Seeding: torchattacks seeds the global RNG with its ``seed`` at the start of each attack, so its
random draws depend on which images share a call. We therefore call it on fixed chunks of
``CHUNK`` images (consecutive in the evaluated subset), each seeded by its first image's index,
and deal whole chunks to ranks: the figure depends neither on the batch size nor on the number of
processes. The caller's RNG state is restored afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import torch
from torch import nn

from fasttricks.data.loader import ValLoader
from fasttricks.errors import UserError
from fasttricks.recipes import AutoAttackConfig
from fasttricks.runtime.distributed import dist_info, sum_over_ranks
from fasttricks.runtime.seeding import AUTOATTACK, stream_seed

CHUNK = 100  # images per torchattacks call; part of the figure's definition (see the module doc)
TARGETS = 9  # target classes of APGD-T and FAB-T in the standard version
INSTALL = "pip install --no-deps torchattacks==3.5.1"


class AutoAttackMissing(UserError):
    pass


def require() -> str:
    """torchattacks' version; a clear error naming the install line when it is missing.
    ``--no-deps``: its metadata pins requests~=2.25.1 (for downloads it never imports), which
    conflicts with everything else; it needs only torch, numpy and scipy, all present."""
    if importlib.util.find_spec("torchattacks") is None:
        raise AutoAttackMissing(f"AutoAttack needs the torchattacks package: {INSTALL}")
    return importlib.metadata.version("torchattacks")


def describe(cfg: AutoAttackConfig) -> dict:
    """What a figure was measured with, recorded in summaries and eval reports (the image count
    of each split sits beside its figure)."""
    return {"attack": "autoattack", "version": cfg.version, "norm": cfg.norm, "eps": cfg.eps,
            "images_asked": cfg.images, "library": f"torchattacks {require()}", "chunk": CHUNK,
            "iterations": "APGD-CE, APGD-T, FAB-T: 10 each; Square: 5000 queries", "target_classes": TARGETS}


def chosen_images(n: int, images: int | None, seed: int = 0) -> np.ndarray:
    """The evaluated images' indices in a split of ``n``, sorted: all, or a seeded subset of ``images``."""
    if images is None or images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0xA7A7]).choice(n, size=images, replace=False))


def my_chunks(indices: np.ndarray) -> list[np.ndarray]:
    """This rank's chunks: every world-th chunk of ``CHUNK`` consecutive indices, from its rank on."""
    rank, world = dist_info()
    chunks = [indices[i:i + CHUNK] for i in range(0, len(indices), CHUNK)]
    return chunks[rank::world]


def attack_chunk(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: AutoAttackConfig,
                 num_classes: int, first_index: int) -> torch.Tensor:
    """torchattacks' AutoAttack on one chunk, seeded by the chunk's first image index."""
    import torchattacks

    seed = stream_seed(0, 0, int(first_index), AUTOATTACK)
    attack = torchattacks.AutoAttack(model, norm="Linf" if cfg.norm == "linf" else "L2", eps=float(cfg.eps),
                                     version=cfg.version, n_classes=min(num_classes, TARGETS + 1), seed=seed)
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # torchattacks reseeds the global RNG
        # contiguous: the loader's batches are channels_last, and FAB reshapes gradients with .view
        return attack(images.float().contiguous(), labels)


def robust_top1(model: nn.Module, loader: ValLoader, cfg: AutoAttackConfig, device: torch.device,
                num_classes: int) -> dict:
    """Robust top-1 (in %) under AutoAttack on the split ``loader`` reads, and the image count.
    Each process attacks its whole chunks; the counts are summed over ranks."""
    require()
    indices = chosen_images(len(loader.loader.indices), cfg.images)
    mine = my_chunks(indices)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device, dtype=torch.long)  # robust hits, images
    try:
        if mine:
            batches = loader.single_process(np.concatenate(mine), batch_size=CHUNK)
            for chunk, (images, labels) in zip(mine, batches, strict=True):
                adversarial = attack_chunk(model, images, labels, cfg, num_classes, chunk[0])
                with torch.no_grad():
                    hits = (model(adversarial).argmax(dim=1) == labels).sum()
                counts += torch.stack([hits, counts.new_tensor(labels.shape[0])])
    finally:
        model.train(was_training)
    hits, seen = sum_over_ranks(counts).tolist()
    return {"top1": 100.0 * hits / max(seen, 1), "images": seen}
