"""Seeded noise in the ε-ball: the random start of PGD and FGSM-RS, and N-FGSM's noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def noise_like(x: torch.Tensor, kind: str, generator: Generators) -> torch.Tensor:
    """Noise drawn in logical (NCHW) order, then laid out like ``x``: the same draws whatever
    the memory format, so channels_last changes no result. ``generator`` may be one per image
    (evaluation: each image's start is then its own, whatever batch it falls in)."""
    def draw(shape, g):
        noise = torch.empty(shape, device=x.device, dtype=x.dtype)
        return noise.uniform_(-1, 1, generator=g) if kind == "uniform" else noise.normal_(generator=g)

    if isinstance(generator, Sequence):
        noise = torch.stack([draw(x.shape[1:], g) for g in generator])
    else:
        noise = draw(x.shape, generator)
    return torch.empty_like(x).copy_(noise)
