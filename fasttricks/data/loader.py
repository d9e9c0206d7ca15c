"""FFCV loaders: training (seeded random-resized crop + flip at this epoch's resolution) and
validation (resize R, centre crop C). Batches come out as float NCHW channels_last in [0, 1] on
the training device; normalisation is the model's job (`fasttricks.models`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from fasttricks.data.crops import CentreCropDecoder, SeededRandomResizedCropFlip
from fasttricks.errors import InputError, InputMissing
from fasttricks.runtime.distributed import default_workers, dist_info

ORDERS = ("random", "quasi_random", "sequential")


class SeededOrder(TraversalOrder):
    """Random order keyed by (seed, epoch), split into disjoint per-rank shards the way
    ``DistributedSampler`` does (padded by wrapping around), and able to start ``skip`` samples
    into the epoch so that a run resumed mid-epoch sees the batches it would have seen."""

    skip = 0

    def sample_order(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
        rank, world = dist_info() if self.distributed else (0, 1)
        if world > 1:
            total = -(-len(order) // world) * world
            order = np.resize(order, total)[rank::world]
        return self._from_skip(order)

    def _from_skip(self, order: np.ndarray) -> np.ndarray:
        if self.loader.drop_last:  # FFCV trims by its batch count, which ignores the skip
            order = order[:len(order) // self.loader.batch_size * self.loader.batch_size]
        return order[self.skip:]


class SeededBlockOrder(SeededOrder):
    """``quasi_random``, for a beton larger than memory (read with ``os_cache: false``): the file is
    read in contiguous blocks of ``BLOCK`` samples, whole blocks in a random order and samples
    shuffled within windows of ``WINDOW`` blocks, so reads stay sequential-ish while batches mix.
    Unlike FFCV's own, it is keyed by (seed, epoch), resumable mid-epoch, and works under several
    processes: the block order is dealt out to the ranks block by block (whole blocks, so no two
    ranks read the same pages), and a rank with fewer samples than the others repeats its own
    first ones, so every rank has the same number of steps (a rank left with no block at all, when
    there are fewer blocks than ranks, reads from the whole order). Batches mix classes only if the
    beton was written in random order (``build-beton --shuffle``, checked by the loader)."""

    BLOCK, WINDOW = 512, 16  # 8,192 samples (~1.5 GB of ImageNet at FFCV's settings) mixed at a time

    def sample_order(self, epoch: int):
        indices = np.asarray(self.indices)
        starts = np.random.default_rng([self.seed, epoch, 0xB10C]).permutation(np.arange(0, len(indices), self.BLOCK))
        rank, world = dist_info() if self.distributed else (0, 1)
        mine = starts[rank::world]  # shard before mixing, so that a window never spans two ranks
        order = np.concatenate([indices[s:s + self.BLOCK] for s in (mine if len(mine) else starts)])
        if world > 1:
            sizes = [sum(min(self.BLOCK, len(indices) - s) for s in starts[r::world]) for r in range(world)]
            order = np.resize(order, max(sizes))
        rng = np.random.default_rng([self.seed, epoch, 0xB10C, rank])
        span = self.BLOCK * self.WINDOW
        for w in range(0, len(order), span):
            order[w:w + span] = rng.permutation(order[w:w + span])
        return self._from_skip(order)


class ShardOrder(TraversalOrder):
    """Validation order: file order, every ``world``-th sample from ``rank``, no padding, so the
    shards are disjoint, cover the split once, and summed counts equal one process's."""

    def sample_order(self, epoch: int):
        rank, world = dist_info() if self.distributed else (0, 1)
        return np.asarray(self.indices)[rank::world]


class TrainLoader:
    """The training loader of one stage. ``epoch(e, res)`` yields (images, labels)."""

    def __init__(self, beton: str | os.PathLike, *, batch_size: int, resolution: int, seed: int,
                 device: torch.device, workers: int = 0, order: str = "random", os_cache: bool = True,
                 distributed: bool = False, drop_last: bool = True, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), indices: np.ndarray | None = None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        if order == "quasi_random":
            _check_written_shuffled(beton)
        self.device, self.batch_size = device, batch_size
        self.decoder = SeededRandomResizedCropFlip((resolution, resolution), seed=seed, scale=scale,
                                                   ratio=ratio)
        self.loader = Loader(str(beton), batch_size=batch_size, num_workers=workers or default_workers(),
                             order=OrderOption.SEQUENTIAL,
                             os_cache=os_cache, drop_last=drop_last, distributed=distributed, seed=seed,
                             indices=indices, pipelines={"image": [self.decoder, *_to_device(device)],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(), *_to_device(device, False)]})
        self.order = None
        if order != "sequential":  # ours: seeded, resumable, sharded (FFCV's QUASI_RANDOM is none of them)
            self.order = (SeededOrder if order == "random" else SeededBlockOrder)(self.loader)
            self.loader.traversal_order = self.order
            self.loader.first_traversal_order = self.order.sample_order(0)
        if len(self.loader) == 0:
            raise InputError(f"{beton} holds fewer images per process than one batch ({batch_size}); "
                             "lower the batch size")

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, resolution: int, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches at ``resolution``, starting after ``skip_batches`` batches."""
        if skip_batches and self.order is None:
            raise InputError("resuming inside an epoch needs order: random")
        self.decoder.output_size = (resolution, resolution)
        self.decoder.set_epoch(epoch)
        if self.order is not None:
            self.order.skip = skip_batches * self.batch_size
        self.loader.next_epoch = epoch
        for images, labels in self.loader:
            yield _to_float(images), labels.to(torch.long, copy=True)


def _check_written_shuffled(beton: str | os.PathLike) -> None:
    from fasttricks.data.manifest import BuildError, read_manifest

    if not read_manifest(beton).get("options", {}).get("shuffle"):
        raise BuildError(f"data.order quasi_random reads {beton} in contiguous blocks, and it was written in folder "
                         f"(class) order, so each batch would hold a few classes; rebuild it with "
                         f"`fasttricks build-beton ... --shuffle`, or use data.order random")


def sample_indices(beton: str | os.PathLike, count: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``count`` sample indices (all of them when the beton holds fewer),
    sorted: a loader over it reads a short epoch to the end instead of abandoning a long one
    (FFCV's loader thread is not meant to be dropped mid-epoch)."""
    from fasttricks.data.manifest import read_manifest

    total = read_manifest(beton)["images"]
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng([seed, 0xB4]).choice(total, size=count, replace=False))


class ValLoader:
    """Validation batches (resize R, centre crop C) in file order, every image once. The size can
    change between passes (``set_size``) without building a new loader: FFCV compiles a loader's
    pipeline on its first pass, about a second each, which a FixRes sweep would pay per size."""

    def __init__(self, beton: str | os.PathLike, *, batch_size: int, resize: int, crop: int,
                 device: torch.device, workers: int = 0, distributed: bool = False,
                 indices: np.ndarray | None = None):
        self.beton = Path(beton)
        self._args = dict(batch_size=batch_size, device=device, workers=workers, distributed=distributed)
        self.decoder = CentreCropDecoder(resize, crop)  # checks the size
        self.loader = Loader(str(beton), batch_size=batch_size, num_workers=workers or default_workers(),
                             order=OrderOption.SEQUENTIAL, drop_last=False, distributed=distributed, indices=indices,
                             pipelines={"image": [self.decoder, *_to_device(device)],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(), *_to_device(device, False)]})
        if distributed:  # FFCV's own pads the shards (DistributedSampler), counting some images twice
            self.loader.traversal_order = ShardOrder(self.loader)
            self.loader.first_traversal_order = self.loader.traversal_order.sample_order(0)

    def set_size(self, resize: int, crop: int) -> None:
        self.decoder.set_size(resize, crop)

    def subset(self, indices: np.ndarray) -> ValLoader:
        """A loader of the same split and settings over ``indices`` only (FixRes' held-out halves)."""
        return ValLoader(self.beton, resize=self.decoder.resize, crop=self.decoder.crop, indices=indices, **self._args)

    def single_process(self, indices: np.ndarray, batch_size: int) -> ValLoader:
        """A loader of the same split and size over ``indices`` in this process alone, in batches
        of ``batch_size`` (AutoAttack's chunks, which it deals to ranks itself)."""
        args = {**self._args, "distributed": False, "batch_size": batch_size}
        return ValLoader(self.beton, resize=self.decoder.resize, crop=self.decoder.crop, indices=indices, **args)

    def sample_indices(self) -> np.ndarray:
        """The split's indices of this process's images, in the order its batches hold them."""
        return np.asarray(self.loader.traversal_order.sample_order(0))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield _to_float(images), labels.to(torch.long, copy=True)



def _to_device(device: torch.device, image: bool = True) -> list:
    ops = [ToTensor()] if image else []
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    if image:
        ops.append(ToTorchImage(channels_last=True))
    return ops


def _to_float(images: torch.Tensor) -> torch.Tensor:
    # A new tensor: FFCV reuses its batch buffers a few iterations later.
    return images.float().div_(255)


def beton_paths(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The betons of a data folder: train and val required, val_clutter when present."""
    data_dir = Path(data_dir)
    paths = {split: data_dir / f"{split}.beton" for split in ("train", "val", "val_clutter")}
    for split in ("train", "val"):
        if not paths[split].is_file():
            raise InputMissing(f"{paths[split]} is missing: a data folder holds train.beton and "
                               f"val.beton made by `fasttricks build-beton` (or use --data toy)")
    if not paths["val_clutter"].is_file():
        del paths["val_clutter"]
    return paths
