"""One rule for every per-step random stream: a seed derived from counters, so a draw is a
function of (run seed, epoch, step, which stream) and of nothing that happened before."""

from __future__ import annotations

import numpy as np

AUGMENT, ATTACK, EVAL_ATTACK, AUTOATTACK = 1, 2, 3, 4  # stream ids: augmentation/mixing, PGD random start,
# robust evaluation, AutoAttack's chunks


def stream_seed(seed: int, epoch: int, step: int, stream: int, rank: int = 0) -> int:
    """A 63-bit seed (torch.manual_seed's range) from NumPy's SeedSequence hash of the counters.
    Each process of a multi-process run draws its own stream (rank 0's is the single-process one)."""
    counters = [seed, epoch, step, stream] + ([rank] if rank else [])
    return int(np.random.SeedSequence(counters).generate_state(1, np.uint64)[0]) >> 1
