"""How many images an attacked evaluation takes at once, so that it never loses a run to an
out-of-memory error.

PGD in fp32 with input gradients keeps every activation of the forward: about 135 MB per 240-px
image for EfficientNet-B1 (measured on the CPU, #36), so a validation batch of 256 needs ~35 GB at
240 px and ~89 GB at 384, the test sizes a FixRes sweep reaches. The attack therefore runs on
chunks of a batch: on CUDA the chunk is sized from a probe (the peak memory of attacking two images
at this size) and the free memory; anywhere, an out-of-memory error halves the chunk and retries
the same images, and says so. Each image's random start is seeded by its index in the split
(robust/pgd.py), so the chunking never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fasttricks.progress import console

# the share of free memory a chunk may fill: the allocator's fragmentation and the evaluation's own
# tensors (logits, counts, the clean batch) need the rest
FREE_SHARE = 0.7
PROBE_IMAGES = 2


def images_for_budget(bytes_per_image: float, free_bytes: float, batch: int) -> int:
    """The largest chunk, at most ``batch``, whose attack fits ``FREE_SHARE`` of ``free_bytes``."""
    fits = int(FREE_SHARE * free_bytes // max(bytes_per_image, 1.0))
    return max(1, min(batch, fits))


def probe_bytes_per_image(attack_once: Callable[[torch.Tensor], object], images: torch.Tensor) -> float:
    """The peak CUDA memory one image of ``images``' size costs ``attack_once`` (measured on
    ``PROBE_IMAGES`` of them, above what was allocated before)."""
    device = images.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    attack_once(images[:PROBE_IMAGES])
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / min(PROBE_IMAGES, images.shape[0])


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclass
class Chunks:
    """The chunk size of one evaluation, chosen at its first batch and halved on each out-of-memory
    error; ``picked`` lists every size it took, in order (the first is the budget's)."""

    size: int | None = None
    picked: list[int] = field(default_factory=list)
    say: Callable[[str], None] = console.print

    def run(self, attack: Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor], images: torch.Tensor,
            labels: torch.Tensor, ids: list) -> torch.Tensor:
        """``attack(images, labels, ids)`` over ``images`` in chunks, concatenated."""
        if self.size is None:
            self._choose(lambda x: attack(x, labels[:x.shape[0]], ids[:x.shape[0]]), images)
        out, start = [], 0
        while start < images.shape[0]:
            end = start + self.size
            try:
                out.append(attack(images[start:end], labels[start:end], ids[start:end]))
            except RuntimeError as e:  # torch.OutOfMemoryError is one; other errors are re-raised
                if not is_out_of_memory(e) or self.size == 1:
                    raise
                self._shrink(images.device)
                continue
            start = end
        return torch.cat(out)

    def _choose(self, attack_once: Callable[[torch.Tensor], object], images: torch.Tensor) -> None:
        batch = images.shape[0]
        size = batch
        if images.device.type == "cuda":
            try:
                per_image = probe_bytes_per_image(attack_once, images)
                free, _ = torch.cuda.mem_get_info(images.device)
                size = images_for_budget(per_image, free, batch)
            except torch.OutOfMemoryError:  # not even the probe fits: start at one image
                torch.cuda.empty_cache()
                size = 1
        self.size = size
        self.picked.append(size)

    def _shrink(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.size = max(1, self.size // 2)
        self.picked.append(self.size)
        self.say(f"[yellow]robust evaluation ran out of memory: retrying with {self.size} images at a time")
